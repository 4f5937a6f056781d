"""What the audio benchmarks (``bench.audio_codec``, ``bench.audio_asr``) share.

* **Data**: the synth corpus's own audio samples (``xoron synth``: ``xoron_dist.synth.corpus`` writes the
  JSONL and WAV files, speaker = sample index mod 8), read back as ``xoron prep`` reads them
  (``data_prep.media.decode_audio``: mono int16 at 16 kHz). Training and held-out sets are two corpora
  with different synth seeds, so no held-out clip (nor its noise draw) was ever seen in training.
* **Spectral distance**: the project's ``MultiResolutionSTFTLoss`` (Parallel WaveGAN's spectral
  convergence + log-magnitude L1, mean over 3 resolutions; equals ``auraloss``'s, tested), per clip.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.media import Blob, decode_audio
from xoron_dist.config import SynthConfig
from xoron_dist.model.audio.encoder import batch_clips
from xoron_dist.model.speech.speaker import AAMSoftmaxHead
from xoron_dist.model.speech.vocoder import saved_vocoder_sizes
from xoron_dist.synth.corpus import speaker_of, synthesize
from xoron_dist.synth.sounds import SPEAKERS, render_events, sample_vowels, transcript

RATE = 16_000
NO_OTHER_KINDS = dict(text=0, image_caption=0, video_caption=0, audio_transcript=0, text_to_image=0,
                      text_to_video=0, text_to_speech=0)  # fmt: skip


@dataclass
class AudioSample:
    id: str
    kind: str
    prompt: str | None
    text: str
    audio: np.ndarray  # (samples,) int16 at RATE
    speaker: int  # index into xoron_dist.synth.sounds.SPEAKERS


def synth_audio(kind: str, count: int, seed: int) -> list[AudioSample]:
    """``count`` samples of ``kind`` ("audio_transcript" | "text_to_speech") of the synth corpus with ``seed``."""
    cfg = SynthConfig(seed=seed, audio_sample_rate=RATE, **{**NO_OTHER_KINDS, kind: count})
    with tempfile.TemporaryDirectory(prefix="xoron-bench-audio-") as tmp:
        out = Path(tmp)
        synthesize(cfg, out, progress=False)
        samples = []
        for line in (out / f"{kind}.jsonl").read_text().splitlines():
            record = json.loads(line)
            path = out / record["audio"]
            audio = decode_audio(Blob(record["audio"], "wav", path), RATE, 30.0)
            samples.append(AudioSample(record["id"], kind, record.get("prompt"), record["text"], audio,
                                       speaker_of(record["id"])))
    return samples


def int16_tensor(sample: AudioSample) -> torch.Tensor:
    return torch.from_numpy(sample.audio.astype(np.int16))


def float_wave(sample: AudioSample) -> torch.Tensor:
    return int16_tensor(sample).float() / 32768.0


def has_voice(sample: AudioSample) -> bool:
    return "vowel" in sample.text


def saved_overrides(saved: dict) -> list[str]:
    """The config overrides a bench file (``torch.save({"state_dict", "overrides"})``: a codec, an ASR or TTS
    model) was built from, with BigVGAN's pitch source and harmonic branch (``vocoder.SIZED_BY_TENSOR``) set as its
    tensors have them: files saved under another default of those options do not name them."""
    sizes = saved_vocoder_sizes(saved["state_dict"])
    sized = {f"model.speech.vocoder.{option}": size for option, size in sizes.items()}
    return [*(o for o in saved["overrides"] if o.split("=")[0] not in sized), *(f"{k}={v}" for k, v in sized.items())]


def pretrain_speaker(speaker, pool: dict[int, list[AudioSample]], steps: int, lr: float, seed: int) -> dict:
    """The speaker encoder alone, classifying the synth voices (AAM-softmax, ``AAMSoftmaxHead``) on training
    clips with vowels: 16 clips a step, each a random 1 s crop (or the whole clip if shorter)."""
    head = AAMSoftmaxHead(speaker.cfg.embed_dim, len(SPEAKERS))
    params = [*speaker.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    items = [(s, who) for who, clips in pool.items() for s in clips]
    order, losses, start = torch.Generator().manual_seed(seed), [], time.perf_counter()
    for _ in range(steps):
        picked = [items[i] for i in torch.randint(len(items), (16,), generator=order).tolist()]
        crops = []
        for sample, _ in picked:
            wave = int16_tensor(sample).float() / 32768.0
            first = int(torch.randint(max(1, wave.shape[0] - 16_000 + 1), (), generator=order))
            crops.append(wave[first: first + 16_000])
        samples, lengths = batch_clips(crops, torch.device("cpu"))
        loss = head(speaker(samples, lengths), torch.tensor([who for _, who in picked]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(loss.item())
    print(f"  speaker pretraining: {steps} steps, loss {losses[0]:.2f} -> {np.mean(losses[-20:]):.2f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"steps": steps, "lr": lr, "batch": 16, "crop_seconds": 1.0, "clips": len(items),
            "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def cloning_scores(embeddings: torch.Tensor, speakers: list[int], centroids: torch.Tensor) -> dict:
    """(n, d) unit embeddings, their intended speakers, (8, d) unit centroids -> accuracy and margin, and
    ``p_chance``: the probability that picking a centroid at random scores at least this accuracy."""
    cos = embeddings @ centroids.t()  # (n, 8)
    own = cos[torch.arange(len(speakers)), torch.tensor(speakers)]
    others = (cos.sum(1) - own) / (cos.shape[1] - 1)
    hits = (cos.argmax(1) == torch.tensor(speakers)).float()
    return {"accuracy": round(float(hits.mean()), 4), "margin": round(float((own - others).mean()), 4),
            "cos_own": round(float(own.mean()), 4), "cos_others": round(float(others.mean()), 4),
            "clips": len(speakers), "chance_accuracy": round(1 / cos.shape[1], 4),
            "p_chance": float(f"{binomial_tail(int(hits.sum()), len(speakers), 1 / cos.shape[1]):.2g}")}  # fmt: skip


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p): the chance that guessing at rate p scores this well or better."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1))


@torch.no_grad()
def ecapa_embed(speaker, waves: list[torch.Tensor]) -> torch.Tensor:
    """Float waveforms -> (n, d) unit embeddings by ``speaker`` (a ``SpeakerEncoder``), one clip at a time, in
    eval mode; every submodule's mode is put back as it was (``train(True)`` would also switch the BatchNorms
    that a ``SpeechHead`` keeps on stored statistics to batch statistics)."""
    modes = [(module, module.training) for module in speaker.modules()]
    speaker.eval()
    out = torch.cat([F.normalize(speaker(w[None].float(), torch.tensor([w.shape[0]])), dim=-1) for w in waves])
    for module, training in modes:
        module.training = training
    return out


def speaker_centroids(embeddings: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """(n, d) unit embeddings of clips of known speakers -> (len(SPEAKERS), d) unit mean per speaker."""
    owner = torch.tensor(owners)
    return F.normalize(torch.stack([embeddings[owner == k].mean(0) for k in range(len(SPEAKERS))]), dim=-1)


def judge_centroids(judges: Judges, pool: dict[int, list[AudioSample]],
                    per_speaker: int = 6) -> dict[str, torch.Tensor]:
    """Per judge, every voice's unit centroid (``speaker_centroids``) over its first ``per_speaker`` clips in
    ``pool`` (``voice_pool``)."""
    owners = [k for k in pool for _ in pool[k][:per_speaker]]
    clips = [float_wave(s) for k in pool for s in pool[k][:per_speaker]]
    return {name: speaker_centroids(embeddings, owners) for name, embeddings in judges.embed(clips).items()}


def voice_pool(samples: list[AudioSample]) -> dict[int, list[AudioSample]]:
    """Speaker -> that voice's clips with vowels (the clips a speaker encoder can tell apart)."""
    pool: dict[int, list[AudioSample]] = {k: [] for k in range(len(SPEAKERS))}
    for s in samples:
        if has_voice(s):
            pool[s.speaker].append(s)
    return pool


def to_int16(wave: torch.Tensor) -> torch.Tensor:
    return (wave.clamp(-1, 1) * 32767).round().to(torch.int16)


VOWELS_PER_UTTERANCE = 4  # the corpus's longest event sequences; Resemblyzer needs the vowels (see below)


def vowel_utterances(per_speaker: int, seed: int, change=None) -> list[AudioSample]:
    """``per_speaker`` utterances of ``VOWELS_PER_UTTERANCE`` vowels by each synth voice (``sounds.sample_vowels``,
    rendered and quantised as the corpus's clips), as ``text_to_speech`` samples: vowels alone carry the voice,
    and the corpus's clips mix them with tones, beeps, chirps and noise, which Resemblyzer's GE2E cannot
    place (on real mixed clips 0.23 nearest-centroid accuracy; on 4-5 real vowels 0.8-0.9). ``change(voice,
    events) -> (voice, events)`` alters what is rendered, the draws staying the same (``bench.voice_cues``)."""
    out = []
    for speaker, voice in enumerate(SPEAKERS):
        for i in range(per_speaker):
            rng = random.Random(seed * 1_000 + speaker * 100 + i)
            events = sample_vowels(rng, voice, VOWELS_PER_UTTERANCE)
            rendered_voice, events = (voice, events) if change is None else change(voice, events)
            wave = render_events(events, 16_000, np.random.default_rng(rng.getrandbits(32)), rendered_voice)
            out.append(AudioSample(f"text_to_speech-{len(out) + 1:06d}", "text_to_speech", None, transcript(events),
                                   to_int16(torch.from_numpy(wave)).numpy(), speaker))
    return out


class Judges:
    """Speaker embeddings of waveforms by speaker encoders of ours (name -> ``SpeakerEncoder``) and by
    Resemblyzer's pretrained GE2E encoder (an outside judge; weak on these synthetic voices)."""

    def __init__(self, encoders: dict) -> None:
        from resemblyzer import VoiceEncoder

        self.encoders = encoders
        self.resemblyzer = VoiceEncoder(device="cpu", verbose=False)

    @torch.no_grad()
    def embed(self, waves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        from resemblyzer import preprocess_wav

        out = {name: ecapa_embed(encoder, waves) for name, encoder in self.encoders.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ge2e = torch.from_numpy(np.stack([self.resemblyzer.embed_utterance(
                preprocess_wav(w.numpy().astype(np.float32), source_sr=16_000)) for w in waves]))
        out["resemblyzer GE2E"] = F.normalize(ge2e.float(), dim=-1)
        return out
