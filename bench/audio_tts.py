"""Speech generation after a short CPU run: re-recognition of generated speech, and voice cloning.

Starts from the model ``bench.audio_asr --save PATH`` trained (the tiny Xoron with the smoke run's audio
encoder; with ``--codec-weight`` its codec, tokenizer + RVQ + BigVGAN, learned beside the ASR), optionally with
a trained codec put in its place (``--codec-from``: ``bench.audio_codec --save``'s tokenizer, RVQ and BigVGAN;
the ASR judge is then a second copy of the source model with its own audio encoder, as it was trained), then runs the
curriculum's generation stage: the LLM, the audio encoder and the codec frozen, the speech generator's TTS
(Glow-TTS text encoder + MAS durations + rectified-flow decoder) and its ECAPA speaker encoder trained by the
``tts`` objective on synth ``text_to_speech`` samples (seed 0), laid out and packed as the loader does
(``prompt + text <|gen_speech|> <|audio_start|> <|audio_pad|>*n <|audio_end|> <eos>``; the request is the
LLM's states of the document before the span). Optionally ``--vocoder-steps`` first fine-tune the BigVGAN
decoder alone (mel + VQ loss, no GAN) on the frozen tokenizer's codes.

Held-out (synth seed 1): for each ``text_to_speech`` transcript, ``generate_speech`` with the request laid out
as in training and a reference clip of the sample's own speaker (another clip of that voice with vowels, from
the training corpus), then:

- **re-recognition**: the same model transcribes the generated audio (greedy, as ``bench.audio_asr``);
  CER against the transcripts it was generated from, against chance (the same transcripts scored against a
  derangement of the references: right grammar, wrong clip) and the constant predictions; for reference the
  ASR's CER on the real held-out clips and on their codec resynthesis (what the decoder allows at best).
- **voice cloning** (held-out samples with vowels only: tones, beeps, chirps and noise carry no voice):
  each generated clip's speaker embedding against every speaker's centroid (mean embedding of real training
  clips with vowels, the reference clip excluded), by the model's ECAPA and by Resemblyzer's pretrained GE2E
  encoder; accuracy of the nearest centroid being the reference's speaker (chance 1/8) and the cosine margin
  (own centroid minus the mean of the others); each judge's accuracy on the real held-out clips beside it.

- the ASR's transcripts of silence as long as each generated clip: what the length alone earns (the ASR
  reads a clip's length from its span of placeholders), the stronger of the two chances here; and of silence
  as long as each real clip, beside the ASR's CER on the real clips: how much more than length the judge hears.
- **long-term spectrum match** (a judge that needs no ASR): each clip's time-averaged log10 mel spectrum
  (80 bands, floored at log10 -2, some 60-80 dB below the clips' peaks); the fraction of generated clips
  nearer their own transcript's real clip than the mean of the held-out clips with other transcripts
  (``same_speaker``: only those of the same voice, so the reference clip's voice cannot explain it), against
  real clip i+1 standing in for generation i (chance), and the codec's resynthesis (the best the decoder allows).

Documented settings (the headline's, 2026-12-05; the judge's front end is the codec without the pitch source, as
in the runs before the source was on, the TTS's codec has it):

    python -m bench.audio_codec --save runs/bench/audio_codec.pt          # the TTS's codec, the defaults
    python -m bench.audio_codec --out audio_codec_plain --save runs/bench/audio_codec_plain.pt \
        model.speech.vocoder.source_harmonics=0 model.speech.vocoder.envelope_harmonics=0  # the ASR judge's front end
    python -m bench.audio_asr --steps 800 --freeze-audio-steps 800 --tts-clips 600 \
        --front-end-from runs/bench/audio_codec_plain.pt --save runs/bench/audio_asr.pt \
        model.audio.understand_from=latents
    python -m bench.audio_tts --from runs/bench/audio_asr.pt --codec-from runs/bench/audio_codec.pt \
        --freeze-speaker [--steps 300] [--threads 1]

(the ASR, also the judge of the generated speech, reads the codec's own tokenizer, frozen: held-out CER 0.067 on
``audio_transcript`` clips and 0.106 on ``text_to_speech`` clips vs 0.759 for the best constant; the same recipe
over a random tokenizer reads them at 0.463 / 0.502. Earlier attempts used other sources and judges; see
"attempts".)

Over the harmonic-branch codec (the default since 2026-12-05, three codec seeds; the headline is seed 0's, the ASR
judge the same), 300 TTS steps (the default since 2026-12-05; 150 before): re-recognised at CER **0.73 against
1.14** for deranged references (seeds 1 and 2: 0.52 against 0.93, 0.50 against 0.93; the resyntheses 0.43-0.45);
generated vowel utterances placed by Resemblyzer with the real voices (SIM-o) at **0.30 (p 0.0002), 0.23 (p 0.011)
and 0.30 (p 0.0002)**, near its score of the codec's own resyntheses (0.41 / 0.25 / 0.31: the codec now bounds the
voice), among the codec's voices (SIM-r) at 0.52 / 0.53 / 0.55, the independent ECAPA 0.22 / 0.34 / 0.375 (SIM-o);
generated vowels' pitch 10 % / 9.6 % / 8.4 % off. Whole run 11-12 min at 1 thread.
At 150 steps (the headline before): CER 0.83 vs 1.16 / 0.51 vs 0.89 / 0.54 vs 0.97, Resemblyzer SIM-o 0.27 (p 0.002)
/ 0.20 (p 0.05) / 0.19 (p 0.10), where the pitch-source codec's TTS stayed at chance (0.14 / 0.19), SIM-r 0.41 /
0.45 / 0.44 (0.36 / 0.41 before), the independent ECAPA 0.20 / 0.39 / 0.36, pitch 13 % / 9.4 % off. The spectral cost
of the branch (``bench.audio_codec``) showed as a weaker re-recognition ratio for seed 0 (1.39; seeds 1 and 2 1.74
and 1.81; before the branch 1.58 / 1.68). At 600 steps (seeds 0 / 1) no further gain: SIM-o 0.25 / 0.22, SIM-r 0.48 /
0.44, CER 0.78 vs 1.13 / 0.60 vs 0.94.

Over the pitch-code codec (``model.speech.vocoder.pitch_levels=128``, two seeds; ``bench.audio_codec``: its
resyntheses are far better, pitch 0.5 % off, Resemblyzer SIM-o 0.47 / 0.52) the TTS must generate the pitch itself,
and in 150 steps it does not generate it per voice. Measured (attempts; 150 TTS steps unless said; seeds 0 / 1
where two):

    code from                                  pitch error   SIM-o (Resemblyzer)   SIM-r   CER vs deranged
    the flow's sample (as the latents)         84 % / -       0.16 / 0.125          0.19    0.56 vs 0.86 / 0.69 vs 0.95
      x4 in the flow (pitch_code_gain=4)       75 %           0.20                  0.22    0.60 vs 0.92
      voice vector read x13.86                 101 %          0.11                  0.125   0.56 vs 0.88
      relative to the clip's level             79 %           0.16                  0.17    0.62 vs 0.85
    the prior's mean                           72 %           0.16                  0.27    0.59 vs 0.88
      voice vector read x13.86                 82 %           0.14                  0.22    0.59 vs 0.86
      relative to the clip's level             43 % / 37 %    0.22 / 0.20           0.28    0.63 vs 0.91 / 0.70 vs 0.98
    the regression head (pitch_code_from=      27 % / 19 %    0.22 / 0.17           0.25    0.50 vs 0.93 / 0.78 vs 1.12
      regression)
    BigVGAN's predictor beside the code        10.8 % / 14 %  0.17 / 0.31           0.31    0.70 vs 0.99 / 0.51 vs 0.87
      (pitch_code_from=vocoder; its codecs)
      the same, 300 TTS steps                  9.7 % / 12 %   0.27 / 0.27           0.42    0.74 vs 1.06 / 0.51 vs 0.85
    the default codec (BigVGAN's predictor)    13 % / 9.4 %   0.27 / 0.20           0.41    0.83 vs 1.16 / 0.51 vs 0.89
      the same, 300 TTS steps                  10 % / 9.6 %   0.30 / 0.23           0.52    0.73 vs 1.14 / 0.52 vs 0.93

Why: the TTS's prior put every voice's vowels near 290 Hz (its pitch ignored the voice vector, which reaches it
through the text encoder at 0.02 of the text's scale); "relative" learns the contour less each clip's mean voiced
pitch and adds the reference clip's, but this corpus mixes tones (220-1000 Hz beeps) into the clips, so a clip's
mean voiced pitch is mostly its tones' (a reference's median voiced pitch is the voice's in about half the clips);
the regression head (text encoding + a direct linear map of the voice) comes nearest and re-recognises best on seed
0 (ratio 1.85), but BigVGAN's own predictor, trained through the 1200 codec steps with the voice vector, still
places the pitch better. So that predictor now stays beside the code (reading the latents with the code's channels
zeroed) and writes the code of the generated latents (``pitch_code_from=vocoder``). A first try broke both codec
seeds (MR-STFT 5.45 / 5.44): the predictor, built before the source, shifted the random draws of the source's
weights; built last, the codecs train like the code alone (MR-STFT 1.76 / 1.71; the predictor 12 % / 10 % off on
resyntheses). Its TTS places the generated pitch as well as the default codec's (table), but the voice is no better:
Resemblyzer SIM-o 0.27 / 0.27 against 0.30 / 0.23 at 300 TTS steps, SIM-r and re-recognition weaker. The default
stays: no pitch code. What moved the voice was training the TTS longer (150 -> 300 steps, both codecs).

Measured earlier on 2026-12-05 on a fresh machine (then the headline; codec, ASR judge and TTS rerun
at the documented settings, the codec now with BigVGAN's pitch source; 150 TTS steps; whole run 4-7 min). The ASR
judge of this rerun is weaker than the first one (``text_to_speech`` clips 0.195 instead of 0.106) and reads
silence as long insertions (CER 2.0), so the deranged references are the chance here:

- **re-recognised far above chance**: CER 0.512 against 0.807 for deranged references (ratio 1.58); the codec's
  resynthesis of the real clips reads at 0.49, the real clips at 0.195. Over the seed-1 pitch-source codec: 0.591 vs
  0.990; without the source (seeds 0 and 1): 0.534 vs 0.856 and 0.686 vs 0.738 (resyntheses 0.60 and 0.64).
- **voice cloning on 64 vowel-only utterances** (``voice_cloning_vowels``, 8 per voice; ``p_chance`` is the
  binomial chance of scoring as well by picking at random): Resemblyzer places the generated speech among the
  voices as the codec renders them (SIM-r: centroids of the codec's resyntheses of the enrolment utterances) at
  **0.36 (p 1.4e-6; seed-1 codec 0.41, p 1.6e-8)**, against real enrolment (SIM-o) at 0.14 and 0.19 (chance 0.125;
  real utterances 0.86). Without the pitch source SIM-r is 0.25 (p 0.005) and 0.27 (p 0.002), SIM-o 0.125 and
  0.23. The independent ECAPA: SIM-o 0.375 (p 3e-7), SIM-r 0.39 (seed 1: 0.20, 0.45; without the source 0.17 /
  0.28 and 0.36 / 0.50). So the TTS follows the reference's voice as far as the codec keeps it; what the codec
  loses of every voice (Resemblyzer finds the codec's own resyntheses at SIM-o 0.14-0.20 but SIM-r 0.53-0.63) is
  why SIM-o stays near chance: ``bench.audio_codec``'s docstring has that diagnosis.

Measured 2026-12-04 (codec without the pitch source; the first ASR judge; 32 vowel-only utterances):

- **re-recognised far above chance**: CER 0.468 against 0.753 for silence as long as each generated clip and 0.809
  for deranged references (ratio 1.61); the codec's own resynthesis of the real clips reads at 0.472 and the real
  clips at 0.106, so the TTS speaks as intelligibly as its codec lets it: the codec is now the limit. Long-term
  spectrum match 0.875 (0.85 within the same voice) vs 0.44 (0.48) for a real clip of another transcript.
- **voice cloning above chance by both ECAPAs**: the reference's speaker is the nearest centroid for 0.32 of the
  22 generated clips with vowels by an independent ECAPA (another seed, never part of training; chance 0.125;
  cosine margin +0.146; real clips 0.73, codec resyntheses 0.18), 0.50 by the ECAPA whose vector the TTS and
  BigVGAN read (margin +0.27; real 0.59).
- **Resemblyzer** cannot place the corpus's mixed clips even when real (0.23: tones, beeps, chirps and noise
  carry no voice), so ``voice_cloning_vowels`` generates held-out vowel-only transcripts (4 vowels, 4 per voice)
  and scores them against centroids of real vowel-only utterances: there Resemblyzer finds the voice of 0.84 of
  the real utterances (margin +0.12), but of the codec's resyntheses only 0.19 (margin +0.003) and of generated
  speech 0.125 (margin +0.008): the codec drops what GE2E hears of these voices (the independent ECAPA: real
  1.00, resyntheses 0.31, generated 0.25, margin +0.34). With the codec trained 2400 steps (MR-STFT 1.81 vs 1.88)
  the same run gives CER 0.496 (silence 0.778), Resemblyzer on generated vowels 0.25 (margin +0.014),
  resyntheses 0.125; with its speaker encoder also pretrained 2000 steps instead of 400 (MR-STFT 1.80): CER 0.504
  (silence 0.764), generated vowels 0.22 by Resemblyzer (margin +0.015; resyntheses 0.25, +0.023) and 0.375 by
  the independent ECAPA (resyntheses 0.47); with BigVGAN twice as wide (1200 steps, MR-STFT 1.75) CER 0.479
  (silence 0.697; resyntheses 0.411, the best yet), generated vowels 0.19 by Resemblyzer (resyntheses 0.28);
  with 8 RVQ levels (1200 steps, MR-STFT 1.87) CER 0.591 (silence 0.732). Resemblyzer's verdict on generated
  vowels stays at 4-8 of 32 clips (chance 4), margins under 0.025: not yet a clear yes.

``--speaker-pretrain-steps``: before the TTS stage, the speaker encoder alone learns to classify the 8 synth
voices (AAM-softmax, ``AAMSoftmaxHead``; 16 random 1 s crops of training clips with vowels a step).
``--freeze-speaker``: the speaker encoder keeps its pretrained weights through the TTS stage (trained by the TTS
loss it forgot the voices: see below). ``--vocoder-steps``: the BigVGAN decoder alone, mel + VQ loss on the frozen
tokenizer's codes (for a source model trained without the codec objective, whose decoder is still random).

Writes bench/out/audio_tts.json (headline: CER of re-recognised generated speech vs the better chance; ratio =
chance CER / ours, > 1: ours better) and keeps earlier runs under "attempts".

Levers for observations (a)-(d) of issue 12 (all under "attempts"; ``--save-tts`` / ``--tts-from`` keep a trained
TTS so inference levers are measured without retraining; ``--length-scale``, ``--snap``, ``--speaker-gain``,
``--judge-from`` are the levers' switches):

- (a) clip length: the duration predictor's per-token log-MSE under-predicted each clip's length (Jensen): 42.5
  predicted vs 60.3 real frames per held-out clip. The model now learns a length scale from clip totals
  (``xoron_dist.model.speech.tts.duration_loss``); at the documented settings the generated clips grow from 0.84 s
  to 0.99 s (real 1.20 s) and re-recognition improves 0.701 -> 0.638, still above same-length silence (0.573;
  deranged references 0.780). This is the headline run.
- (b) the judge: chosen fix, fine-tune the ASR judge with half its training clips resynthesised by the TTS's codec
  (``bench.audio_asr --init-from ... --resynth-codec``), because the TTS speaks through that codec, so a fair judge
  must have heard its artifacts, while the real half keeps it a judge of content. On the ``text_to_speech``
  held-out clips it scores resynthesis 0.361 (was 0.571), real clips 0.294 (was 0.220), silence as long as the real
  clips 0.657. The duration-fixed TTS judged by it (``--judge-from runs/bench/audio_asr_judge.pt``, eval only):
  generated 0.569 vs same-length silence 0.580 and deranged references 0.839: below both chances, but only by
  0.011 on the stronger one (48 clips: not a clear win). Cloning is unchanged (it does not use the judge).
- (c) snapping generated latents to the RVQ: running the RVQ again on *real* quantised latents misses by 69 % of
  their power (squared error 0.084 vs power 0.122: the stages' in/out projections are not inverse, so the RVQ is not
  idempotent), so snapping can at best add that error; ``--snap`` on generated speech was not run yet (time).
- (d) cloning: the voice vector reaches both the prior and the velocity network and is used when the latents
  depend on it (``tests/model/test_speech_tts.py``), but in the trained TTS swapping the voice changes the
  generated latents by 0.5 % of their power, and **the codec's latents do not carry the voice**: ECAPA on the
  codec's resynthesis of real held-out clips is at chance (0.09; Resemblyzer 0.18) against 0.64 on the real clips.
  No TTS over these latents can clone a voice the codec drops; the codec (or its training crops) is the lever.
  Reading the voice vector 13.86x louder (``--speaker-gain``, sqrt(192): unit RMS like the LLM's states; with the
  duration fix) changes nothing: CER 0.640 (silence 0.559), cloning ECAPA 0.14, Resemblyzer 0.18 (margins ~0).

Measured (2 shared cores, 1 thread), documented settings before the duration fix (150 TTS steps, 89 s; whole run
126 s at low load):

- **the generated speech follows the text** (judged by spectrum): long-term spectrum match 0.75 (0.73 against
  same-voice clips only) vs 0.44 (0.48) for a real clip of another transcript, and 0.92 (0.88) for the codec's
  own resynthesis; mean distance to its own transcript's clip 0.116 vs 0.172 to the others.
- **re-recognition is not above chance**: the judge hears content now (real clips 0.220 vs
  0.641 for silence of their lengths; the codec's resynthesis 0.571), yet generated speech scores 0.701: better
  than the deranged references (0.802), worse than silence as long as each generated clip (0.601; the judge
  guesses a plausible transcript for silence, and the generated clips, 0.5 s shorter than real ones on
  average, confuse it more than silence does). ratio 0.858.
- **voice cloning at chance**: ECAPA 0.14, Resemblyzer 0.14 (chance 0.125; both margins slightly negative); on
  the real held-out clips the frozen pretrained ECAPA gets 0.64, Resemblyzer 0.23.

``--steps 400`` (otherwise the same; 276 s): spectrum match 0.85 (same voice 0.83), re-recognition 0.670 vs 0.590
for same-length silence and 0.814 deranged, cloning ECAPA 0.14, Resemblyzer 0.18 (4 of 22 clips; margin +0.009):
more steps move the spectrum, not yet the judges.

With the first ASR as the judge (``--from runs/bench/audio_asr_nobias.pt``, a random tokenizer in front; same
codec, same TTS): spectrum match 0.83 (same voice 0.79) vs 0.44 (0.48), resynthesis 0.92; re-recognition 0.571
vs 0.581 for same-length silence, but that judge hears little (real clips 0.601 vs 0.666 for silence of their
lengths). With the TTS learning the ASR model's own codec (no ``--codec-from``: its BigVGAN trained 300 mel-only
steps, then only through the ASR run's codec objective at weight 0.002, with codebook restarts): resynthesis
already fails (spectrum match 0.56, CER 0.738), generated 0.802 CER, 0.46 s clips.

Earlier (before ``--codec-from``, the TTS learning a random codec's latents): generated speech 0.674 CER,
exactly what silence of the same lengths gets (0.674; deranged references 0.817): the ASR of
``bench.audio_asr`` only reads lengths, so re-recognition says nothing yet about the content of the speech beyond
its duration (the TTS's durations follow the text: 0.50 s mean vs 1.20 s for real clips).
Voice cloning is at chance by both judges (ECAPA 0.14, Resemblyzer 0.09; chance 0.125), and both judges are weak
on these clips (real held-out clips: ECAPA 0.05 -- it learns only through the TTS loss here, with no speaker
pretraining --, Resemblyzer 0.23).

Then (``--from`` the ``bench.audio_asr`` model with continuous latents, encoder frozen 300 of 800 steps,
``--speaker-pretrain-steps 400 --vocoder-steps 150``): still at the same-length-silence chance (0.582 = 0.582;
this ASR gets 0.717 on the real ``text_to_speech`` clips, which differ from its training clips), cloning at
chance (ECAPA 0.14, Resemblyzer 0.09); the speaker pretraining's loss fell 26.3 -> 6.4, yet after the TTS
stage the ECAPA tells real held-out voices apart no better than chance (0.14; every embedding within cosine
0.003 of the others). Both levers that note asked for are now in: the codec learns (``--codec-from``) and the
speaker encoder stays frozen (``--freeze-speaker``); the ASR judge that hears content is above.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import time

import numpy as np
import torch

from bench.audio_asr import SMOKE, arrow_sample, batch_fields, cer, greedy_decode, param_groups
from bench.audio_codec import CODEC_PARTS, independent_judge, load_codec, reconstruct, vowel_voice_scores
from bench.audio_common import (
    AudioSample,
    Judges,
    cloning_scores,
    float_wave,
    has_voice,
    int16_tensor,
    judge_centroids,
    pretrain_speaker,
    saved_overrides,
    synth_audio,
    to_int16,
    voice_pool,
)
from bench.common import OUT_DIR, machine, write_result
from xoron_dist.config import load_config
from xoron_dist.data.packing import SequencePacker, TokenLayout, collate
from xoron_dist.model.common.noise import advance_clocks
from xoron_dist.model.speech.losses import MultiScaleMelLoss
from xoron_dist.model.xoron import build_model
from xoron_dist.tokenizer import build_tokenizer

TRAINED = ("speech.tts.", "speech.speaker.")


def train_tts(model, cfg, docs, pad_id: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)

    def stream():
        while True:
            order = list(range(len(docs)))
            rng.shuffle(order)
            yield from (docs[i] for i in order)

    source = stream()
    packer = SequencePacker(cfg.train.seq_len, 16, lambda: next(source))
    trained = [p for n, p in model.named_parameters() if n.startswith(TRAINED)]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < 10:
            return (step + 1) / 10
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 10) / max(1, args.steps - 10))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = collate([packer.next_row() for _ in range(args.rows)], cfg.train.seq_len, pad_id)
        out = model(**batch_fields(batch))
        loss = out.objective_sums["tts"] / max(1, int(batch.audio_is_target.sum()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        advance_clocks(model)
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            print(f"  tts step {step + 1:4d}  loss {np.mean(losses[-20:]):.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return {"steps": args.steps, "rows": args.rows, "lr": args.lr, "first_loss": round(losses[0], 4),
            "last_loss": round(float(np.mean(losses[-20:])), 4),
            "loss_every_20": [round(float(np.mean(losses[i: i + 20])), 3) for i in range(0, len(losses), 20)],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def train_vocoder(model, clips: list[torch.Tensor], steps: int, lr: float) -> dict:
    """The BigVGAN decoder alone on the frozen tokenizer's codes: mel + VQ loss (``SpeechHead.codec_sum``)."""
    head, encoder = model.speech, model.audio
    head.vocoder.cfg.adversarial = False
    params = list(head.vocoder.generator.parameters())
    for p in params:  # frozen with the rest of the codec for the TTS stage; trained here only
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.8, 0.99))
    order, losses, start = torch.Generator().manual_seed(0), [], time.perf_counter()
    for _ in range(steps):
        batch = [clips[i] for i in torch.randint(len(clips), (16,), generator=order).tolist()]
        loss = head.codec_sum(encoder, batch) / len(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        advance_clocks(head)
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return {"steps": steps, "lr": lr, "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


@torch.no_grad()
def generate(model, docs, references: list[torch.Tensor], pad: int, chunk: int = 16, length_scale: float = 1.0,
             snap: bool = False) -> list[torch.Tensor]:
    """Each generation document's request (its tokens before the target span) -> a float waveform
    (``model.generate_speech``'s path, with ``SpeechHead.generate``'s length scale and snapping exposed)."""
    model.eval()
    waves = []
    for first in range(0, len(docs), chunk):
        part = docs[first: first + chunk]
        requests = [doc.tokens[: doc.media.start] for doc in part]
        ids = torch.full((len(part), max(len(r) for r in requests)), pad, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, request in enumerate(requests):
            ids[i, : len(request)] = torch.from_numpy(request)
            mask[i, : len(request)] = True
        request, request_mask = model.requests(ids, mask)
        waves += model.speech.generate(request, request_mask, references[first: first + chunk], seed=first,
                                       length_scale=length_scale, snap_to=model.audio.quantizer if snap else None)
    model.train()
    return waves


def transcribe(model, layout, tokenizer, clips: list[torch.Tensor], max_new: int) -> list[str]:
    """The ASR: each clip as an ``audio_transcript`` document without a prompt, decoded greedily."""
    samples = [AudioSample(f"audio_transcript-{i + 1:06d}", "audio_transcript", None, "x", c.numpy(), 0)
               for i, c in enumerate(clips)]  # the text is never read: decoding starts after the audio
    docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in samples]
    ids = greedy_decode(model, docs, clips, tokenizer.eos_id, tokenizer.pad_id, max_new)
    return [tokenizer.decode(i) for i in ids]


SPECTRUM_FLOOR = -2.0  # log10 mel magnitude: some 60-80 dB below the synth clips' peaks


def long_term_spectra(waves: list[torch.Tensor]) -> torch.Tensor:
    """Float waveforms -> (n, 80) each clip's time-averaged log10 mel spectrum (512-sample windows), floored at
    ``SPECTRUM_FLOOR``: the synth clips are digitally silent between sounds and in most bands, so without a
    floor the distance would mostly measure a clip's noise floor (as ``bench.audio_codec`` found)."""
    mel = MultiScaleMelLoss(16_000)
    return torch.stack([mel.log_mel(w.float()[None], 4)[0].clamp(min=SPECTRUM_FLOOR).mean(-1) for w in waves])


def spectral_match(generated: list[torch.Tensor], real: list[torch.Tensor], texts: list[str],
                   speakers: list[int]) -> dict:
    """A judge that hears more than length: each generated clip's long-term log-mel spectrum against the
    real clip of its own transcript and against the other held-out clips whose transcript differs.
    ``accuracy``: the fraction of generated clips nearer (mean L1 of log10 mel) their own real clip than the
    mean distance to the differing clips; ``same_speaker``: the same with only differing clips of the same
    voice as the comparison (so the reference clip's voice cannot explain a match: only the text can).
    ``chance_deranged_real`` is what a clip that does not depend on the text gets: the same scores for real
    clip i+1 standing in for clip i's generation."""
    gen, ref = long_term_spectra(generated), long_term_spectra(real)
    differs = torch.tensor([[a != b for b in texts] for a in texts])
    voice = torch.tensor([[a == b for b in speakers] for a in speakers])

    def score(candidates: torch.Tensor) -> dict:
        dist = torch.cdist(candidates, ref, p=1) / ref.shape[1]  # (n, n) mean |log10 mel| difference
        own = dist.diagonal()
        result = {"own": round(float(own.mean()), 4)}
        for name, keep in (("other_transcripts", differs), ("same_speaker", differs & voice)):
            has = keep.any(1)
            others = (dist * keep).sum(1) / keep.sum(1).clamp(min=1)
            result[name] = {"distance": round(float(others[has].mean()), 4),
                            "accuracy": round(float((own < others)[has].float().mean()), 4), "clips": int(has.sum())}
        return result

    return {"generated": score(gen), "chance_deranged_real": score(ref.roll(-1, 0))}


def reference_clips(samples: list[AudioSample], pool: dict[int, list[AudioSample]]) -> list[AudioSample]:
    """For sample i, a training clip with vowels of its own speaker (``voice_pool``), cycling through them."""
    return [pool[s.speaker][i % len(pool[s.speaker])] for i, s in enumerate(samples)]


def vowel_cloning(model, judges: Judges, layout, tokenizer, references_pool: dict, per_speaker: int = 8,
                  pitch: dict | None = None) -> dict:
    """Voice cloning where the voice is all there is to hear (``bench.audio_codec.vowel_voice_scores``): for
    held-out vowel-only transcripts of each voice, ``generate_speech`` with a reference clip of that voice (a
    training clip with vowels, as above), scored beside the real utterances (what the judge can do) and their codec
    resyntheses (what the decoder keeps), against real enrolment utterances and (``against_codec_enrolment``) their
    resyntheses: does the TTS pick the reference's voice among the voices its codec can speak? ``pitch``: filled
    with each set's utterance pitch against the real utterances' (``audio_codec.utterance_pitch_error``)."""

    def generated(held: list[AudioSample]) -> dict[str, list[torch.Tensor]]:
        docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in held]
        references = [int16_tensor(r) for r in reference_clips(held, references_pool)]
        return {"generated": generate(model, docs, references, tokenizer.pad_id)}

    return vowel_voice_scores(model.audio, model.speech, judges, per_speaker, generated, pitch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="bench.audio_asr --save's file")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--codec-from", default=None,
                        help="bench.audio_codec --save's file: the TTS learns that trained codec's latents and its "
                        "BigVGAN speaks them; the ASR judge keeps the --from model's own audio encoder")
    parser.add_argument("--freeze-speaker", action="store_true",
                        help="the speaker encoder frozen in the TTS stage (after --speaker-pretrain-steps)")
    parser.add_argument("--vocoder-steps", type=int, default=0)
    parser.add_argument("--vocoder-lr", type=float, default=2e-3)
    parser.add_argument("--speaker-pretrain-steps", type=int, default=0,
                        help="> 0: first train the speaker encoder to classify the synth voices (AAM-softmax)")
    parser.add_argument("--speaker-lr", type=float, default=2e-3)
    parser.add_argument("--train", type=int, default=600, help="text_to_speech samples for training (seed 0)")
    parser.add_argument("--held-out", type=int, default=48, help="held-out text_to_speech samples (seed 1)")
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-tts", default=None, help="write the trained speaker encoder + TTS here")
    parser.add_argument("--tts-from", default=None,
                        help="--save-tts's file: skip the speaker and TTS training, evaluate those weights")
    parser.add_argument("--speaker-gain", type=float, default=1.0,
                        help="the TTS reads the unit voice vector times this (SpeechGenerator.speaker_gain)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="generation: predicted durations times this")
    parser.add_argument("--snap", action="store_true",
                        help="generation: quantise the generated latents with the codec's RVQ before BigVGAN")
    parser.add_argument("--judge-from", default=None,
                        help="the ASR judge's file (bench.audio_asr --save; default: --from's model). With "
                        "--codec-from only")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="audio_tts", help="result name: bench/out/<out>.json (another name keeps "
                        "a trial's run apart, so two can run at once; fold it into audio_tts.json's attempts)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    saved = torch.load(args.source, weights_only=True)
    overrides = saved_overrides(saved)
    if "model.speech.enabled=true" not in overrides:
        overrides += ["model.speech.enabled=true", "model.speech.vocoder.adversarial=false"]
    codec = torch.load(args.codec_from, weights_only=True) if args.codec_from else None
    if codec is not None:  # the codec's sizes (e.g. BigVGAN width) over the source's; the speech head stays on
        overrides = [o for o in overrides if not o.startswith("model.speech.vocoder.source_harmonics=")]  # the codec's
        overrides += [o for o in saved_overrides(codec) if o not in overrides and not o.endswith("enabled=false")]
    cfg = load_config(SMOKE, [*overrides, *args.overrides])
    tokenizer = build_tokenizer(cfg)
    layout = TokenLayout.from_config(cfg.data, tokenizer.special_ids, cfg.train.seq_len)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    # with --codec-from the codec's tensors come from there (its sizes may differ, e.g. more RVQ levels)
    replaced = CODEC_PARTS if codec is not None else ()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in saved["state_dict"].items() if not k.startswith(replaced)}, strict=False)
    missing = [k for k in missing if not k.startswith(replaced)]
    fresh_speech = bool(missing)
    if unexpected or any(not k.startswith("speech.") for k in missing):
        raise SystemExit(f"{args.source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    judge = model
    if codec is not None:  # the ASR judge: the source model as it was trained, its own tokenizer in front
        judged = torch.load(args.judge_from, weights_only=True) if args.judge_from else saved
        judge = build_model(load_config(SMOKE, saved_overrides(judged)))
        judge.load_state_dict(judged["state_dict"])
        judge.requires_grad_(False)
        load_codec(model, args.codec_from)
        if model.speech.vocoder.conditioned and (args.speaker_pretrain_steps or not args.freeze_speaker):
            raise SystemExit(f"{args.codec_from}'s BigVGAN reads the voice vectors of the speaker encoder saved with "
                             "it: keep that encoder as it is (--freeze-speaker, without --speaker-pretrain-steps)")
    model.speech.tts.speaker_gain = args.speaker_gain
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(TRAINED)
    model.speech.vocoder.cfg.adversarial = False  # the codec is frozen here: its loss is computed, never used

    train_samples = synth_audio("text_to_speech", args.train, seed=0)
    held = synth_audio("text_to_speech", args.held_out, seed=1)
    references_pool = voice_pool(train_samples)  # speaker -> training clips with vowels
    synth_seconds = time.perf_counter() - start

    speaker_stage = vocoder = None
    if args.tts_from:  # the speaker encoder and TTS of an earlier run (--save-tts): only the evaluation runs
        trained = torch.load(args.tts_from, weights_only=True)
        model.load_state_dict(trained["state_dict"], strict=False)
        run = {**trained["tts_train"], "loaded_from": args.tts_from}
    else:
        speaker_stage = (pretrain_speaker(model.speech.speaker, references_pool, args.speaker_pretrain_steps,
                                          args.speaker_lr, args.seed) if args.speaker_pretrain_steps else None)
        vocoder = (train_vocoder(model, [int16_tensor(s) for s in train_samples], args.vocoder_steps,
                                 args.vocoder_lr) if args.vocoder_steps else None)  # fmt: skip
        if args.freeze_speaker:
            model.speech.speaker.requires_grad_(False)
        docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in train_samples]
        run = train_tts(model, cfg, docs, tokenizer.pad_id, args)
    if args.save_tts:
        state = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED)}
        torch.save({"state_dict": state, "tts_train": run, "args": vars(args)}, args.save_tts)

    held_docs = [layout.documents(arrow_sample(s, tokenizer))[0] for s in held]
    references = reference_clips(held, references_pool)
    gen_start = time.perf_counter()
    waves = generate(model, held_docs, [int16_tensor(r) for r in references], tokenizer.pad_id,
                     length_scale=args.length_scale, snap=args.snap)
    gen_seconds = time.perf_counter() - gen_start
    texts = [s.text for s in held]
    generated = transcribe(judge, layout, tokenizer, [to_int16(w) for w in waves], args.max_new)
    real = transcribe(judge, layout, tokenizer, [int16_tensor(s) for s in held], args.max_new)
    resynthesised = [reconstruct(model.audio, model.speech, int16_tensor(s))[0] for s in held]
    resynth = transcribe(judge, layout, tokenizer, [to_int16(w) for w in resynthesised], args.max_new)
    # the ASR hearing only the length: silence as long as each generated clip
    silent = transcribe(judge, layout, tokenizer, [torch.zeros(w.shape[0], dtype=torch.int16) for w in waves],
                        args.max_new)
    # ... and silence as long as each real clip: does the judge hear more than length on real speech?
    silent_real = transcribe(judge, layout, tokenizer, [torch.zeros(len(s.audio), dtype=torch.int16) for s in held],
                             args.max_new)
    deranged = texts[1:] + texts[:1]
    common = collections.Counter(s.text for s in train_samples).most_common(1)[0][0]
    ours, chance = cer(texts, generated), cer(deranged, generated)
    same_length = cer(texts, silent)
    recognition = {"generated": ours, "chance_deranged_references": chance, "same_length_silence": same_length,
                   "constant_empty": cer(texts, [""] * len(texts)),
                   f"constant_most_common {common!r}": cer(texts, [common] * len(texts)),
                   "asr_on_real_clips": cer(texts, real), "asr_on_codec_resynthesis": cer(texts, resynth),
                   "asr_on_silence_as_long_as_real_clips": cer(texts, silent_real),
                   "generated_seconds_mean": round(float(np.mean([w.shape[0] for w in waves])) / 16_000, 3),
                   "real_seconds_mean": round(float(np.mean([len(s.audio) for s in held])) / 16_000, 3)}  # fmt: skip
    print(f"re-recognition CER: generated {ours:.4f}  chance {chance:.4f}  same-length silence {same_length:.4f}  "
          f"real {recognition['asr_on_real_clips']:.4f}"
          f"  resynthesis {recognition['asr_on_codec_resynthesis']:.4f}", flush=True)

    real_waves = [int16_tensor(s).float() / 32768 for s in held]
    held_speakers = [s.speaker for s in held]
    spectra = {"generated_vs_real": spectral_match(waves, real_waves, texts, held_speakers),
               "codec_resynthesis_vs_real":
                   spectral_match(resynthesised, real_waves, texts, held_speakers)["generated"]}
    print(f"long-term spectrum match: {spectra}", flush=True)

    judges = Judges({"ecapa (ours)": model.speech.speaker})
    if model.speech.vocoder.conditioned and model.speech.vocoder.cfg.speaker_weight:  # ours shaped the vocoder's loss
        judges.encoders["ecapa (independent)"] = independent_judge(cfg, train_samples, 400, args.speaker_lr, args.seed)
    voiced = [i for i, s in enumerate(held) if has_voice(s)]
    cloning = {}
    centroids_of = judge_centroids(judges, references_pool)
    gen_emb = judges.embed([waves[i] for i in voiced])
    real_emb = judges.embed([float_wave(held[i]) for i in voiced])
    resynth_emb = judges.embed([resynthesised[i] for i in voiced])  # do the codec's latents keep the voice?
    speakers = [held[i].speaker for i in voiced]
    for judge, centroids in centroids_of.items():
        cloning[judge] = {"generated": cloning_scores(gen_emb[judge], speakers, centroids),
                          "real_held_out": cloning_scores(real_emb[judge], speakers, centroids),
                          "codec_resynthesis": cloning_scores(resynth_emb[judge], speakers, centroids)}
        print(f"voice cloning, {judge}: {cloning[judge]}", flush=True)

    vowel_pitch: dict = {}
    vowels = vowel_cloning(model, judges, layout, tokenizer, references_pool, pitch=vowel_pitch)
    print(f"vowel utterances' pitch against the real ones: {vowel_pitch}", flush=True)
    print(f"voice cloning on vowel-only utterances: {vowels}", flush=True)

    summary = {"note": args.note, "source": args.source, "codec_from": args.codec_from,
               "freeze_speaker": args.freeze_speaker, "steps": args.steps, "lr": args.lr,
               "vocoder_steps": args.vocoder_steps, "speaker_pretrain_steps": args.speaker_pretrain_steps,
               "overrides": args.overrides, "cer": ours, "chance": chance,
               "same_length_silence": same_length, "asr_on_real_clips": recognition["asr_on_real_clips"],
               "spectral_match": {k: v["other_transcripts"]["accuracy"]
                                  for k, v in spectra["generated_vs_real"].items()},
               "spectral_match_same_speaker": {k: v["same_speaker"]["accuracy"]
                                               for k, v in spectra["generated_vs_real"].items()},
               "cloning_accuracy": {j: c["generated"]["accuracy"] for j, c in cloning.items()},
               "cloning_accuracy_resynthesis": {j: c["codec_resynthesis"]["accuracy"] for j, c in cloning.items()},
               "vowel_cloning_accuracy": {j: c["generated"]["accuracy"] for j, c in vowels.items()},
               "vowel_pitch_error": {kind: v["median_relative_error"] for kind, v in vowel_pitch.items()},
               "vowel_cloning_accuracy_real": {j: c["real_held_out"]["accuracy"] for j, c in vowels.items()},
               "vowel_cloning_accuracy_codec_enrolment": {
                   j: c["against_codec_enrolment"]["generated"]["accuracy"] for j, c in vowels.items()},
               "judge_from": args.judge_from, "tts_from": args.tts_from, "length_scale": args.length_scale,
               "snap": args.snap, "speaker_gain": args.speaker_gain,
               "asr_on_codec_resynthesis": recognition["asr_on_codec_resynthesis"],
               "generated_seconds_mean": recognition["generated_seconds_mean"],
               "train_seconds": run["seconds"]}  # fmt: skip
    previous = OUT_DIR / f"{args.out}.json"
    attempts = json.loads(previous.read_text()).get("attempts", []) if previous.is_file() else []
    result = {
        "metric": "held-out CER of generated speech re-recognised by the model's own ASR, synth transcripts "
        "(lower is better); ratio = the better chance CER (see peer_name) / ours (> 1: ours better)",
        "unit": "CER",
        "ours": ours,
        "peer": min(chance, same_length),
        "peer_name": "the better of two chances: the generated clips' transcripts scored against other held-out "
        "transcripts, and the ASR's transcripts of silence as long as each generated clip (length alone)",
        "ratio": round(min(chance, same_length) / max(ours, 1e-9), 3),
        "goal": "generated speech re-recognised below chance; voice cloning: nearest speaker centroid = the "
        "reference's speaker above chance (1/8), by the model's ECAPA and by Resemblyzer",
        "machine": machine(),
        "recognition": recognition,
        "voice_cloning": cloning,
        "voice_cloning_vowels": vowels,
        "vowel_pitch_vs_real": vowel_pitch,
        "spectral_match": spectra,
        "examples": [{"text": t, "asr_of_generated": g, "asr_of_real": r}
                     for t, g, r in list(zip(texts, generated, real, strict=True))[:10]],
        "tts_train": run,
        "vocoder_train": vocoder,
        "speaker_pretrain": speaker_stage,
        "speech_head_from_source": not fresh_speech,
        "data": {"train_samples": len(train_samples), "held_out": len(held), "held_out_with_vowels": len(voiced)},
        "seconds": {"synth": round(synth_seconds, 1), "tts_train": run["seconds"], "generate": round(gen_seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "attempts": [*attempts, summary],
    }
    print(f"wrote {write_result(args.out, result)} in {result['seconds']['total']} s")


if __name__ == "__main__":
    main()
