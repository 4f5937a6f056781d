"""The raw-waveform tokenizer: a SEANet-style strided convolution encoder and a residual vector quantiser.

    samples (batch, T) at 16 kHz ─► pad to a multiple of hop ─► Conv1d(1→C, k7)
        ─► [ residual units (dilation 1, 3) ; ELU ; Conv1d(C→2C, k=2s, stride s) ] for s in strides
        ─► ELU ─► Conv1d(→ latent_dim, k3) ─► latents (batch, frames, latent_dim),  frames = ceil(T / hop)
    latents ─► residual VQ: r₀ = z;  qₖ = out_projₖ(Qₖ(norm(in_projₖ(rₖ))));  rₖ₊₁ = rₖ − qₖ;  ẑ = Σ qₖ

SEANet (Tagliasacchi et al. 2020) as EnCodec (Défossez et al. 2022, §3.1) and SoundStream
(Zeghidour et al. 2021) use it: ``hop = prod(strides)`` samples per latent frame. The default
strides (2, 4, 5, 8) give hop 320, 50 frames per second at 16 kHz, as wav2vec2: the seed's tokenizer
downsamples 64x (250 frames/s), which makes attention over a 10 s clip 25x costlier (2,500 frames)
for little gain; 50 Hz keeps 10 s at 500 frames. Each strided convolution has kernel 2·s and pads
s samples in total (⌊s/2⌋ before, the rest after), so T = frames · hop maps to exactly ``frames``.

The tokenizer's convolutions have **no bias** (weights: PyTorch's default), for two reasons. At init,
PyTorch's default biases (uniform ±1/√fan_in, up to ±0.38 on the 7-tap input conv) make every latent
one bias-made vector plus small changes (held-out synth clips: mean latents of different clips 1.5 %
apart, every frame on one code; bias-free: 93 % apart, ``bench/audio_asr.py``). In training, biases
that start at 0 but learn are worse: on random crops the decoder's gradient is mostly common to all
frames, Adam moves every bias by ~lr per step in that one direction, and within ~25 steps the latents
become one constant vector (relative spread across frames 0.99 -> 0.1-0.2) that the cosine quantiser
maps to a single code, after which the decoder hears nothing and the collapse never undoes itself
(issue 12's codec: perplexity 1.3 of 32, reconstruction no better than silence). Without biases an
offset can only come from the input, so silence encodes to 0 and every latent is a function of the
sound: ``bench/audio_codec.py`` at its defaults went from MR-STFT 3.64 (silence 3.71), perplexity
1.3 / 2.0 of 32, to 3.05 and 15 / 18 with every code in use (``tests/model/test_audio_encoder.py``
trains 15 steps and checks that the frames stay apart).

Residual VQ (SoundStream §3.2) with factorised, l2-normalised codes (DAC, Kumar et al. 2023 §3.2):
each stage projects the residual to ``code_dim``, normalises it, picks the nearest code by cosine
(``CosineQuantizer``: straight-through, codebook and commitment losses, usage kept for dead-code
restarts by the trainer's ``CodebookKeeper``, as TiTok's), and projects the code back. The audio
tokens are the ids (batch, frames, quantizers). The decoder is the BigVGAN generator of
``xoron_dist.model.speech.bigvgan`` over the quantised latents; together they form the codec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.common.quantize import CosineQuantizer


def padded_length(samples: int, hop: int) -> int:
    """Samples after padding a clip to whole frames."""
    return math.ceil(samples / hop) * hop


class ResidualUnit(nn.Module):
    """SEANet's residual unit: ELU → dilated Conv1d(k3) to C/2 → ELU → Conv1d(k1) back to C, plus the input
    (bias-free convolutions, see the module docstring)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels // 2, 3, dilation=dilation, padding=dilation, bias=False)
        self.conv2 = nn.Conv1d(channels // 2, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (batch, C, t); ``keep`` (batch, 1, t) zeroes what lies beyond each clip (as a conv's padding)."""
        return x + self.conv2(F.elu(self.conv1(F.elu(x)) * keep)) * keep


class StridedDown(nn.Module):
    """Conv1d(C→2C, kernel 2s, stride s) padded by s samples (⌊s/2⌋ left): exactly T/s frames out of T."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, 2 * channels, 2 * stride, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.stride // 2
        return self.conv(F.pad(x, (left, self.stride - left)))


class WaveformEncoder(nn.Module):
    """(batch, T) float samples in [-1, 1] -> latents (batch, ceil(T / hop), latent_dim).

    Clips of different lengths share a batch: after every stage the frames beyond a clip's own
    length are zeroed, so each clip's latents are the same alone or batched with longer clips."""

    def __init__(self, channels: int, strides: list[int], latent_dim: int) -> None:
        super().__init__()
        self.strides = list(strides)
        self.hop = math.prod(self.strides)
        self.conv_in = nn.Conv1d(1, channels, 7, padding=3, bias=False)
        self.units = nn.ModuleList(nn.ModuleList((ResidualUnit(channels * 2**i, 1), ResidualUnit(channels * 2**i, 3)))
                                   for i in range(len(self.strides)))
        self.downs = nn.ModuleList(StridedDown(channels * 2**i, s) for i, s in enumerate(self.strides))
        channels *= 2 ** len(self.strides)
        self.conv_out = nn.Conv1d(channels, latent_dim, 3, padding=1, bias=False)  # no biases: module docstring

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Latent frames of clips of ``lengths`` samples: ceil(length / hop)."""
        return torch.div(lengths + self.hop - 1, self.hop, rounding_mode="floor")

    def forward(self, samples: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """samples (batch, T); ``lengths`` (batch,) real samples per clip (None: all T)."""
        batch, total = samples.shape
        lengths = torch.full((batch,), total, device=samples.device) if lengths is None else lengths.to(samples.device)
        padded = padded_length(total, self.hop)
        valid = self.frames(lengths) * self.hop  # each clip padded to whole frames
        keep = _keep_mask(valid, padded, samples.dtype)
        x = self.conv_in(F.pad(samples, (0, padded - total))[:, None] * keep) * keep
        for (unit1, unit2), down in zip(self.units, self.downs, strict=True):
            x = F.elu(unit2(unit1(x, keep), keep))
            valid, padded = valid // down.stride, padded // down.stride
            keep = _keep_mask(valid, padded, x.dtype)
            x = down(x) * keep
        return (self.conv_out(F.elu(x)) * keep).transpose(1, 2)


def _keep_mask(lengths: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, total): 1 before each clip's length, 0 at and after it."""
    return (torch.arange(total, device=lengths.device)[None] < lengths[:, None]).to(dtype)[:, None]


@dataclass
class ResidualQuantized:
    """``latents`` (..., latent_dim) the straight-through sum of the stages' codes; ``ids`` (..., stages);
    the summed codebook and commitment losses (fp32 scalars)."""

    latents: torch.Tensor
    ids: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class ResidualQuantizer(nn.Module):
    """``stages`` cosine quantisers, each on what the previous ones left (see the module docstring)."""

    def __init__(self, latent_dim: int, stages: int, codebook_size: int, code_dim: int,
                 dead_code_share: float = 0.03, usage_decay: float = 0.9) -> None:
        super().__init__()
        self.in_proj = nn.ModuleList(nn.Linear(latent_dim, code_dim) for _ in range(stages))
        self.quantizers = nn.ModuleList(CosineQuantizer(codebook_size, code_dim, dead_code_share, usage_decay)
                                        for _ in range(stages))
        self.out_proj = nn.ModuleList(nn.Linear(code_dim, latent_dim) for _ in range(stages))

    def forward(self, latents: torch.Tensor, stages: int | None = None) -> ResidualQuantized:
        """latents (..., latent_dim); ``stages``: use the first n stages only (a lower bitrate)."""
        residual, total = latents, torch.zeros_like(latents)
        ids, codebook_loss, commitment_loss = [], latents.new_zeros((), dtype=torch.float32), 0.0
        used = list(zip(self.in_proj, self.quantizers, self.out_proj, strict=True))[:stages]
        for proj_in, quantizer, proj_out in used:
            q = quantizer(F.normalize(proj_in(residual), dim=-1))
            code = proj_out(q.codes)
            total = total + code
            residual = residual - code.detach()
            ids.append(q.ids)
            codebook_loss = codebook_loss + q.codebook_loss
            commitment_loss = commitment_loss + q.commitment_loss
        return ResidualQuantized(total, torch.stack(ids, dim=-1), codebook_loss, commitment_loss)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., stages) -> quantised latents (..., latent_dim)."""
        total = 0.0
        for stage, (quantizer, proj_out) in enumerate(zip(self.quantizers, self.out_proj, strict=True)):
            if stage == ids.shape[-1]:
                break
            total = total + proj_out(quantizer.codes()[ids[..., stage]])
        return total


__all__ = ["ResidualQuantized", "ResidualQuantizer", "WaveformEncoder", "padded_length"]
