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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.media import Blob, decode_audio
from xoron_dist.config import SynthConfig
from xoron_dist.synth.corpus import speaker_of, synthesize

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
