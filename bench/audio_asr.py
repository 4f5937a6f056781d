"""ASR after a short CPU training run: the tiny Xoron with the smoke run's audio encoder on synth audio.

Model: ``pipelines/smoke.yaml`` (the ``tiny`` preset's LLM, its raw-waveform tokenizer + residual VQ +
RMLA Conformer, the frame-pooling projector, 4 gated fusion layers), vision, video and every generator
disabled; the run's byte-level BPE (``build_tokenizer``). Data: ``audio_transcript`` samples of the synth
corpus (``bench.audio_common``: synth seed 0 for training, seed 1 for the held-out clips), laid out and
packed exactly as the trainer's loader does (``TokenLayout.documents`` -> ``SequencePacker`` -> ``collate``:
``<|audio_start|> <|audio_pad|>*n <|audio_end|> prompt + text <eos>``, loss on the text and <eos>).
By default training keeps the samples whose text is the transcript (the synth's "caption" and "describe"
modes, 6 in 10); ``--train-mix all`` also keeps its questions ("How many sounds are there?" -> "Three.").

Training as the trainer does it: AdamW (decay on matrices only), linear warm-up then cosine to 10%,
clipping at 1.0, the MoE routers' expert bias balanced after every step (``ExpertBalancer``) and the
residual VQ's dead codes restarted (``CodebookKeeper``). Without ``model.speech`` the codebooks never
learn from a loss (they are the codec's), so the tokenizer learns through the straight-through path and
the restarts keep the codes in use.

Scoring: greedy decoding of each held-out clip's text after its audio and prompt (the document up to its
first target, as packed), until <eos>; character error rate (``jiwer.cer``, corpus level: edits over
reference characters) against the held-out transcripts. Baselines, on the same references:

- constant predictions: the empty string (CER exactly 1: every character deleted) and the most common
  training transcript; the better of the two is the headline's peer;
- "shuffled audio": the trained model decoding each held-out prompt with another held-out clip's audio
  (a fixed derangement): what the model says from the text prior alone, i.e. chance for a model that
  knows the transcript grammar but not this clip.

    python -m bench.audio_asr [--steps 240] [--lr 3e-3] [--train 1200] [--held-out 160] [--threads 1]

A judge for generated speech (``bench.audio_tts --judge-from``): ``--init-from`` a saved ASR fine-tunes it, and
``--resynth-codec`` (``bench.audio_codec --save``'s file) replaces ``--resynth-share`` of the training clips by
their resynthesis through that codec (encode, quantise, BigVGAN) and also scores the held-out clips so
resynthesised (``cer_on_resynthesis``): the TTS speaks through that codec, so its judge should have heard it.

    python -m bench.audio_asr --init-from runs/bench/audio_asr_trained_codec.pt --resynth-codec \
        runs/bench/audio_codec.pt --steps 150 --freeze-audio-steps 150 --lr 1e-3 --train 800 \
        --out audio_asr_judge --save runs/bench/audio_asr_judge.pt

Measured (``bench/out/audio_asr_judge.json``): held-out CER 0.270 on real clips (0.159 before the fine-tune, best
constant 0.759, shuffled audio 0.850) and 0.332 on their resynthesis by the codec (the judge before it: 0.571 on the
``text_to_speech`` clips' resynthesis); 150 steps, 20 min of training and 43 min of decoding on the loaded cores.

``--tts-clips N`` trains on N ``text_to_speech`` clips as transcripts beside the transcript corpus and scores 48
held-out ones (``cer_on_tts_clips``): the generated speech is judged on those clips' distribution, which the
transcript corpus alone reads poorly (0.603). With a random front end (``bench/out/audio_asr_judge.json``'s
second-to-last attempt) that judge reads held-out text_to_speech clips at CER 0.502 and transcript clips at 0.463.

``--front-end-from`` puts a trained codec's tokenizer + RVQ (``bench.audio_codec --save``) in front, frozen with
the (random) Conformer: the ASR reads the latents the TTS over that codec predicts. The current judge and TTS
source (2026-12-04, ``bench/out/audio_asr_judge.json``'s headline):

    python -m bench.audio_asr --steps 800 --freeze-audio-steps 800 --tts-clips 600 \
        --front-end-from runs/bench/audio_codec.pt --out audio_asr_judge \
        --save runs/bench/audio_asr_codecfront.pt model.audio.understand_from=latents

reads held-out transcript clips at **CER 0.067** (exact transcripts 49 %; best constant 0.759, shuffled audio
0.830) and text_to_speech clips at 0.106, against 0.463 / 0.502 with the random front end in the same recipe:
the front end was the limit. 7 min of training, 13 min in all. (The curriculum's codec stage, README
"Curriculum stages", is this finding in the trainer.)

Writes bench/out/audio_asr.json (headline: held-out CER, ours vs the best constant; ratio = constant CER /
our CER, > 1: ours better) and keeps the earlier runs' settings and results under "attempts".

Measured (2 shared cores, 1 thread). Headline: CER 0.554 vs 0.759 for the best constant and 0.854 with shuffled
audio, after 800 steps with the Conformer on the tokenizer's continuous latents (``model.audio.understand_from=
latents``) and the audio encoder frozen at its (zero-bias) random init (``--freeze-audio-steps 800``): the
projector and the LLM learn to read it (7 min). Not yet "far below" the constant: exact transcripts 13 %.

History (all in "attempts"). The first runs (200-240 steps) ended at CER 0.66-0.79 with greedy transcripts of
"A burst of noise, then ..." in about the right number of events: the model read the clip's length and little
else, at one training LM loss (~0.287) whatever the lever (RVQ 4 x 256 codes, the codec objective beside the ASR,
a codec stage before it, the audio encoder at 3x or 0.1x the lr, lr 1e-3). What was found since:

- The tokenizer's default conv biases made a random tokenizer's latents one bias-made vector (held-out clips'
  mean latents 1.5 % apart, every frame on one code); zero-initialised biases give 93 % apart. Alone (200
  steps) it changes nothing. (The tokenizer's convolutions are now bias-free, the same function at init: learnable
  biases were what collapsed the codec, see ``bench.audio_codec``; checkpoints saved before hold those biases.)
- During training the audio path collapses within ~10 steps: a probe of the projected audio tokens (relative
  spread of the clips' mean tokens) gives 0.80 at init, 0.005 after 10 steps when the encoder trains (the LM's
  gradient on the audio tokens is mostly one common direction, and Adam turns it into a constant offset in
  every layer of the encoder), but 0.32 after 20 steps with the encoder frozen.
- 200 steps are too few for the LLM side: a diagnostic with the encoder replaced by a fixed log-STFT front end
  (not the model: no spectrogram may enter it) gets CER 0.71 at 200 steps but 0.23 at 800 (exact 33 %). At
  800 steps: frozen random encoder 0.554; encoder frozen for 300 steps then trained 0.593; the default model
  (codes, encoder trained throughout) 0.602; continuous latents alone at 200 steps 0.705.

So the audio is used (CER 0.2 below the constant), but a random tokenizer is a weak front end and training it
through the LM's loss collapses it. Likely next: a front end that carries spectral content at init and keeps
it (a learned band-pass filterbank as the speaker encoder's, or a codec that learns: see ``bench.audio_codec``),
and more steps; a lower learning rate for the encoder only after the LLM has learnt to read it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import random
import time
from importlib.metadata import version
from pathlib import Path

import jiwer
import numpy as np
import torch

from bench.audio_common import AudioSample, int16_tensor, saved_overrides, synth_audio
from bench.common import OUT_DIR, machine, write_result
from xoron_dist.config import load_config
from xoron_dist.data.packing import Document, SequencePacker, TokenLayout, collate
from xoron_dist.data.shards import ArrowSample
from xoron_dist.model.common.noise import advance_clocks
from xoron_dist.model.xoron import build_model
from xoron_dist.tokenizer import XoronTokenizer, build_tokenizer
from xoron_dist.train.codebooks import CodebookKeeper
from xoron_dist.train.expert_balance import ExpertBalancer

SMOKE = "pipelines/smoke.yaml"
AUDIO_ONLY = ["model.vision.enabled=false", "model.video.enabled=false", "model.speech.enabled=false",
              "model.image_gen.enabled=false", "model.video_gen.enabled=false"]  # fmt: skip
# the synth's prompts whose answer is the whole transcript (xoron_dist.synth.corpus: caption and describe modes)
TRANSCRIPT_PROMPTS = (None, "Transcribe the audio.", "What sounds do you hear, in order?", "Describe the audio.")


def is_transcript(sample: AudioSample) -> bool:
    return sample.prompt in TRANSCRIPT_PROMPTS


def as_transcripts(samples: list[AudioSample]) -> list[AudioSample]:
    """``text_to_speech`` samples as ``audio_transcript`` ones (the clip, then its text; no prompt): what an ASR
    judge of generated speech should have heard (``bench.audio_tts``'s clips differ from the transcript corpus)."""
    return [dataclasses.replace(s, id=f"tts-{s.id}", kind="audio_transcript", prompt=None) for s in samples]


def arrow_sample(sample: AudioSample, tokenizer: XoronTokenizer) -> ArrowSample:
    """A synth sample as ``xoron prep`` stores it (``data_prep.rows``: prompt and text tokenised apart)."""
    prompt = np.array(tokenizer.encode(sample.prompt) if sample.prompt else [], np.int32)
    return ArrowSample("synth", sample.kind, sample.id, prompt, np.array(tokenizer.encode(sample.text), np.int32),
                       "audio", sample.audio, 16_000)  # fmt: skip


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainer's split (``train.build.parameter_groups`` without DeepSpeed's MoE groups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


def batch_fields(batch) -> dict:
    return dict(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                document_ids=batch.document_ids, audios=batch.audios, audio_spans=batch.audio_spans,
                audio_is_target=batch.audio_is_target)  # fmt: skip


def pretrain_codec(model, clips: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """A codec stage before the ASR: the audio tokenizer + RVQ and the BigVGAN decoder alone on the codec
    objective (``SpeechHead.codec_sum``: mel + VQ losses; the GAN terms off, ``model.speech.vocoder.adversarial``),
    one ``segment_samples`` crop per clip, 16 clips a step, with the trainer's codebook restarts."""
    params = [*model.audio.tokenizer.parameters(), *model.audio.quantizer.parameters(),
              *model.speech.vocoder.generator.parameters()]
    opt = torch.optim.Adam(params, lr=args.codec_lr, betas=(0.8, 0.99))
    keeper, order = CodebookKeeper(model), torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for _ in range(args.codec_pretrain_steps):
        batch = [clips[i] for i in torch.randint(len(clips), (16,), generator=order).tolist()]
        loss = model.speech.codec_sum(model.audio, batch) / len(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        keeper.update()
        advance_clocks(model)
        losses.append(loss.item())
    print(f"  codec stage: {args.codec_pretrain_steps} steps, loss {losses[0]:.2f} -> {np.mean(losses[-20:]):.2f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"steps": args.codec_pretrain_steps, "batch": 16, "lr": args.codec_lr, "first_loss": round(losses[0], 4),
            "last_loss": round(float(np.mean(losses[-20:])), 4), "seconds": round(time.perf_counter() - start, 1)}


def train(model, cfg, docs: list[Document], pad_id: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)

    def stream():
        while True:
            order = list(range(len(docs)))
            rng.shuffle(order)
            yield from (docs[i] for i in order)

    source = stream()
    packer = SequencePacker(cfg.train.seq_len, 16, lambda: next(source))
    groups = param_groups(model, 0.1)
    if args.audio_lr:  # the audio encoder and its projector at their own rate
        audio = {id(p) for n, p in model.named_parameters() if n.startswith(("audio.", "audio_projector."))}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in audio] if fast else
                   [p for p in g["params"] if id(p) not in audio], **({"lr": args.audio_lr} if fast else {})}
                  for g in groups for fast in (False, True)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    balancer, keeper = ExpertBalancer(model), CodebookKeeper(model)
    model.train()
    encoder_params = [p for p in model.audio.parameters() if p.requires_grad]
    losses, clips, restarts, start = [], 0, 0, time.perf_counter()
    for step in range(args.steps):
        for p in encoder_params:  # the audio encoder frozen for the first --freeze-audio-steps (projector trains)
            p.requires_grad_(step >= args.freeze_audio_steps)
        batch = collate([packer.next_row() for _ in range(args.rows)], cfg.train.seq_len, pad_id)
        out = model(**batch_fields(batch))
        loss = out.loss
        if args.codec_weight:  # the trainer's Σ_k w_k · mean_k with the codec objective beside the LM's
            loss = loss + args.codec_weight * out.objective_sums["codec"] / max(1, len(batch.audios))
            advance_clocks(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        balancer.update()
        restarts += keeper.update()
        losses.append(out.loss.item())
        clips += len(batch.audios)
        if (step + 1) % 20 == 0:
            print(f"  step {step + 1:4d}  loss {np.mean(losses[-20:]):.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    balancer.detach()
    return {"steps": args.steps, "rows": args.rows, "seq_len": cfg.train.seq_len, "lr": args.lr,
            "codec_weight": args.codec_weight, "audio_lr": args.audio_lr, "freeze_audio_steps": args.freeze_audio_steps,
            "warmup": warmup, "clips_seen": clips, "codes_restarted": restarts,
            "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
            "loss_every_20": [round(float(np.mean(losses[i: i + 20])), 3) for i in range(0, len(losses), 20)],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


@contextlib.contextmanager
def audio_tokens_once(model, clips: list[torch.Tensor]):
    """Serve ``model.encode("audio", clips)`` from one computation while decoding: the clips' tokens do not
    change between decoding steps, so every forward of the loop reuses them (the forward itself is the
    model's own)."""
    tokens = model.encode("audio", clips)

    def encode(medium, media):
        same = len(media) == len(clips) and all(a is b for a, b in zip(media, clips, strict=True))
        if medium != "audio" or not same:
            raise AssertionError("decoding asked for other media than the cached clips")
        return tokens

    model.encode = encode
    try:
        yield
    finally:
        del model.encode


@torch.no_grad()
def greedy_decode(model, docs: list[Document], clips: list[torch.Tensor], eos: int, pad: int,
                  max_new: int, chunk: int = 64) -> list[list[int]]:  # fmt: skip
    """Each document's tokens before its first target (audio span + prompt), continued greedily until <eos>."""
    model.eval()
    results = []
    for first in range(0, len(docs), chunk):
        part, part_clips = docs[first: first + chunk], clips[first: first + chunk]
        prefixes = [doc.tokens[: doc.target_start] for doc in part]
        n, lengths = len(part), torch.tensor([len(p) for p in prefixes])
        ids = torch.full((n, int(lengths.max()) + max_new), pad, dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            ids[i, : len(prefix)] = torch.from_numpy(prefix)
        spans = torch.tensor([[i, doc.media.start, doc.media.length] for i, doc in enumerate(part)])
        done, rows = torch.zeros(n, dtype=torch.bool), torch.arange(n)
        start = lengths.clone()
        with audio_tokens_once(model, part_clips):
            for _ in range(max_new):
                logits = model(input_ids=ids[:, : int(lengths.max())], audios=part_clips, audio_spans=spans).logits
                nxt = logits[rows, lengths - 1, : model.cfg.llm.usable_vocab_size].argmax(-1)
                active = ~done
                ids[rows[active], lengths[active]] = nxt[active]
                lengths = lengths + active.long()
                done |= nxt == eos
                if bool(done.all()):
                    break
        for i in range(n):
            new = ids[i, int(start[i]): int(lengths[i])].tolist()
            results.append(new[:-1] if new and new[-1] == eos else new)
    model.train()
    return results


def load_front_end(model, path: str) -> None:
    """``bench.audio_codec --save``'s tokenizer and RVQ into ``model.audio``: the ASR reads a codec's latents
    (a trained front end; the random one reads poorly), the same latents a TTS over that codec predicts."""
    from bench.audio_codec import load_codec

    load_codec(model, path, parts=("audio.tokenizer.", "audio.quantizer."))


def resynthesiser(path: str):
    """int16 clip (samples,) -> numpy int16 of its resynthesis by ``bench.audio_codec --save``'s codec at ``path``."""
    from bench.audio_codec import load_codec_file, reconstruct

    encoder, head = load_codec_file(path)

    @torch.no_grad()
    def run(clip: torch.Tensor) -> np.ndarray:
        return (reconstruct(encoder, head, clip)[0].clamp(-1, 1) * 32767).round().to(torch.int16).numpy()

    return run


def cer(references: list[str], hypotheses: list[str]) -> float:
    return round(float(jiwer.cer(references, hypotheses)), 4)


def held_out_loss(model, docs: list[Document], seq_len: int, pad_id: int) -> float:
    """Teacher-forced LM loss on the held-out documents (one per row, no packing)."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(docs), 32):
            batch = collate([[doc] for doc in docs[first: first + 32]], seq_len, pad_id)
            out = model(**batch_fields(batch))
            total += out.loss.item() * int(out.num_tokens)
            tokens += int(out.num_tokens)
    model.train()
    return round(total / tokens, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--rows", type=int, default=4, help="rows of seq_len tokens per step (smoke: 4)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--train", type=int, default=1200, help="audio_transcript samples synthesised for training")
    parser.add_argument("--held-out", type=int, default=160, help="held-out samples synthesised (seed 1)")
    parser.add_argument("--train-mix", choices=("transcripts", "all"), default="transcripts")
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--codec-weight", type=float, default=0.0,
                        help="> 0: also train the codec objective (model.speech on, mel + VQ losses, no GAN) at this "
                        "weight, as the trainer does (0.002 there): the codebooks then learn")
    parser.add_argument("--codec-pretrain-steps", type=int, default=0,
                        help="a codec stage first (tokenizer + RVQ + BigVGAN on mel + VQ losses); needs --codec-weight")
    parser.add_argument("--codec-lr", type=float, default=2e-3)
    parser.add_argument("--audio-lr", type=float, default=0.0, help="> 0: the audio encoder's and projector's lr")
    parser.add_argument("--freeze-audio-steps", type=int, default=0,
                        help="the audio encoder (tokenizer, RVQ, Conformer) frozen for this many first steps, as "
                        "LLaVA's alignment stage: the projector and the LLM learn to read its features first")
    parser.add_argument("--init-from", default=None,
                        help="start from this --save file (its model and overrides; no codec stage): a fine-tune")
    parser.add_argument("--resynth-codec", default=None,
                        help="bench.audio_codec --save's file: --resynth-share of the training clips are replaced by "
                        "their resynthesis through that codec, and the held-out CER is also scored on resynthesis "
                        "(a judge for speech that codec speaks: bench.audio_tts)")
    parser.add_argument("--resynth-share", type=float, default=0.5)
    parser.add_argument("--front-end-from", default=None,
                        help="bench.audio_codec --save's file: its trained tokenizer + RVQ replace the random ones "
                        "before training (with --freeze-audio-steps they stay as the codec learnt them)")
    parser.add_argument("--tts-clips", type=int, default=0,
                        help="also train on this many text_to_speech clips as transcripts (seed 0) and score 48 "
                        "held-out ones (seed 1): a judge for bench.audio_tts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default=None, help="also save the trained model's state dict here (for "
                        "bench.audio_tts; e.g. runs/bench/audio_asr.pt)")
    parser.add_argument("--out", default="audio_asr", help="result name: bench/out/<out>.json")
    parser.add_argument("--note", default="", help="why this attempt (kept with it under 'attempts')")
    parser.add_argument("overrides", nargs="*", help="config overrides (a.b=c), after the audio-only ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    codec = ["model.speech.enabled=true", "model.speech.vocoder.adversarial=false"] if args.codec_weight else []
    initial = torch.load(args.init_from, weights_only=True) if args.init_from else None
    model_overrides = saved_overrides(initial) if initial else [*AUDIO_ONLY, *codec, *args.overrides]
    if initial and (args.overrides or args.codec_pretrain_steps):
        raise SystemExit("--init-from takes the saved model's overrides and codec: drop the overrides and "
                         "--codec-pretrain-steps")
    cfg = load_config(SMOKE, model_overrides)
    tokenizer = build_tokenizer(cfg)
    layout = TokenLayout.from_config(cfg.data, tokenizer.special_ids, cfg.train.seq_len)

    train_samples = synth_audio("audio_transcript", args.train, seed=0)
    if args.train_mix == "transcripts":
        train_samples = [s for s in train_samples if is_transcript(s)]
    held_out = [s for s in synth_audio("audio_transcript", args.held_out, seed=1) if is_transcript(s)]
    held_spoken = []
    if args.tts_clips:  # the TTS corpus's clips as transcripts: train on some (seed 0), score held-out ones (seed 1)
        train_samples += as_transcripts(synth_audio("text_to_speech", args.tts_clips, seed=0))
        held_spoken = as_transcripts(synth_audio("text_to_speech", 48, seed=1))
    synth_seconds = time.perf_counter() - start
    print(f"{len(train_samples)} training and {len(held_out)} held-out clips ({synth_seconds:.0f} s)", flush=True)
    resynth = None
    if args.resynth_codec:  # the judge hears the codec too: a share of its training clips, and a held-out score
        resynth = resynthesiser(args.resynth_codec)
        picked = random.Random(args.seed).sample(range(len(train_samples)),
                                                 round(args.resynth_share * len(train_samples)))
        for i in picked:
            train_samples[i] = dataclasses.replace(train_samples[i], audio=resynth(int16_tensor(train_samples[i])))
        print(f"  {len(picked)} training clips resynthesised by {args.resynth_codec} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in train_samples]
    held_docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in held_out]
    held_clips = [int16_tensor(s) for s in held_out]
    references = [s.text for s in held_out]

    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if initial:
        model.load_state_dict(initial["state_dict"])
    if args.front_end_from:
        load_front_end(model, args.front_end_from)
    params = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("llm", "audio", "audio_projector", "fusion")}  # fmt: skip
    if args.codec_pretrain_steps and not args.codec_weight:
        raise SystemExit("--codec-pretrain-steps needs the codec: give --codec-weight too (the trainer's is 0.002)")
    codec_stage = pretrain_codec(model, [int16_tensor(s) for s in train_samples], args) \
        if args.codec_pretrain_steps else None
    run = train(model, cfg, train_docs, tokenizer.pad_id, args)
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    decode_start = time.perf_counter()
    ours_ids = greedy_decode(model, held_docs, held_clips, eos, pad, args.max_new)
    ours_text = [tokenizer.decode(ids) for ids in ours_ids]
    # sample i's prompt with sample i+1's audio (its own span length), scored against sample i's transcript
    swapped = [dataclasses.replace(s, audio=held_out[(i + 1) % len(held_out)].audio) for i, s in enumerate(held_out)]
    swapped_docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in swapped]
    shuffled_text = [tokenizer.decode(ids) for ids in greedy_decode(
        model, swapped_docs, [int16_tensor(s) for s in swapped], eos, pad, args.max_new)]
    resynth_text = None
    if resynth is not None:  # the held-out clips as the codec speaks them (documents unchanged: same lengths)
        resynth_clips = [torch.from_numpy(resynth(c)) for c in held_clips]
        resynth_text = [tokenizer.decode(ids) for ids in greedy_decode(model, held_docs, resynth_clips, eos, pad,
                                                                       args.max_new)]
    spoken_text = [tokenizer.decode(ids) for ids in greedy_decode(
        model, [layout.documents(arrow_sample(s, tokenizer))[0] for s in held_spoken],
        [int16_tensor(s) for s in held_spoken], eos, pad, args.max_new)] if held_spoken else None
    decode_seconds = time.perf_counter() - decode_start

    common, common_count = collections.Counter(s.text for s in train_samples).most_common(1)[0]
    constants = {"empty string": cer(references, [""] * len(references)),
                 f"most common training transcript {common!r} ({common_count} of {len(train_samples)})":
                     cer(references, [common] * len(references))}  # fmt: skip
    best_name, best = min(constants.items(), key=lambda kv: kv[1])
    ours = cer(references, ours_text)
    exact = round(sum(h.strip() == r.strip() for h, r in zip(ours_text, references, strict=True)) / len(references), 4)
    print(f"held-out CER ours {ours:.4f}  shuffled audio {cer(references, shuffled_text):.4f}  best constant "
          f"{best:.4f} ({best_name})  exact {exact:.3f}", flush=True)
    summary = {"note": args.note, "steps": args.steps, "rows": args.rows, "lr": args.lr, "train_clips":
               len(train_samples), "train_mix": args.train_mix, "codec_weight": args.codec_weight,
               "codec_pretrain_steps": args.codec_pretrain_steps, "audio_lr": args.audio_lr,
               "freeze_audio_steps": args.freeze_audio_steps,
               "overrides": args.overrides, "cer": ours,
               "cer_shuffled_audio": cer(references, shuffled_text), "exact_match": exact,
               "init_from": args.init_from, "resynth_codec": args.resynth_codec,
               "resynth_share": args.resynth_share if args.resynth_codec else None,
               "cer_on_resynthesis": cer(references, resynth_text) if resynth_text else None,
               "tts_clips": args.tts_clips, "front_end_from": args.front_end_from,
               "cer_on_tts_clips": cer([s.text for s in held_spoken], spoken_text) if spoken_text else None,
               "train_seconds": run["seconds"]}  # fmt: skip
    previous = OUT_DIR / f"{args.out}.json"
    attempts = json.loads(previous.read_text()).get("attempts", []) if previous.is_file() else []
    result = {
        "metric": "held-out character error rate of greedy transcripts after a short CPU run, synth audio "
        "(lower is better); ratio = best constant prediction's CER / our CER (> 1: ours better)",
        "unit": "CER",
        "ours": ours,
        "peer": best,
        "peer_name": f"constant prediction: {best_name} (the better of it and the alternatives under "
        "'baselines')",
        "ratio": round(best / max(ours, 1e-9), 3),
        "goal": "CER far below the best constant prediction's and below the shuffled-audio chance",
        "machine": machine(),
        "baselines": {"constant": constants, "shuffled_audio": summary["cer_shuffled_audio"]},
        "exact_match": exact,
        "held_out_lm_loss": held_out_loss(model, held_docs, cfg.train.seq_len, pad),
        "train": run,
        "codec_stage": codec_stage,
        "data": {"train_clips": len(train_samples), "train_mix": args.train_mix, "held_out_clips": len(held_out),
                 "synth_seeds": {"train": 0, "held_out": 1}, "held_out_seconds": round(
                     sum(len(s.audio) for s in held_out) / 16_000, 1),
                 "audio_tokens_per_second": cfg.data.audio_tokens_per_second},  # fmt: skip
        "model": {"params": params, "overrides": model_overrides,
                  "codec_weight": args.codec_weight},
        "examples": [{"reference": r, "ours": h, "shuffled_audio": s}
                     for r, h, s in list(zip(references, ours_text, shuffled_text, strict=True))[:12]],
        "versions": {"jiwer": version("jiwer")},
        "seconds": {"synth": round(synth_seconds, 1), "train": run["seconds"], "decode": round(decode_seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},  # fmt: skip
        "attempts": [*attempts, summary],
    }
    if spoken_text is not None:
        print(f"held-out CER on 48 text_to_speech clips {summary['cer_on_tts_clips']:.4f}", flush=True)
        result["cer_on_tts_clips"] = summary["cer_on_tts_clips"]
    if resynth_text is not None:
        print(f"held-out CER on the codec's resynthesis {summary['cer_on_resynthesis']:.4f}", flush=True)
        result["cer_on_resynthesis"] = summary["cer_on_resynthesis"]
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "overrides": result["model"]["overrides"]}, args.save)
    print(f"wrote {write_result(args.out, result)} in {result['seconds']['total']} s")


if __name__ == "__main__":
    main()
