"""Rotary position embedding for MLA's decoupled rope dims, with YaRN and LongRoPE scaling.

Layout: DeepSeek rotates *interleaved* pairs (x0, x1), (x2, x3), ... (the complex
form of RoFormer, Su et al. 2021). ``apply_rotary`` writes the rotated pairs back
as [real parts | imaginary parts]; q and k get the same permutation, so every
dot product q·k is unchanged, and the cached rope keys stay consistent.
This matches HF ``DeepseekV3`` with ``rope_interleave=True`` and GGUF ``deepseek2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xoron_dist.config import LLMConfig, RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·m·ln(s) + 1 (Peng et al. 2023, eq. 22 as DeepSeek-V2 uses it)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts": interpolate slow frequencies by ``factor``, keep fast ones (§3.2)."""
    base, factor = rope.theta, rope.factor

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original (fast) frequency, 0: fully interpolated
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class Fp32BufferModule(nn.Module):
    """A module whose buffers named in ``fp32_buffers`` stay fp32 through ``.to(dtype)``, ``.bfloat16()``,
    ``.half()`` and DeepSpeed's bf16/fp16 cast of the model: they follow the module's device, never its
    dtype. Rotary frequencies rounded to bf16 (8 mantissa bits) turn position p by p·Δf: 0.7 rad off at
    4K positions, 23 rad at 128K; the restored buffer is the fp32 original, not the rounded one cast back.
    """

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self


class RotaryEmbedding(Fp32BufferModule):
    """cos/sin tables for positions; one instance per model, shared by its layers.

    ``softmax_scale_multiplier`` is what YaRN asks the attention softmax scale to be
    multiplied by (mscale_all_dim², DeepSeek-V2 §B); 1 for the other types. The frequencies stay
    fp32 whatever dtype the model is cast to (``Fp32BufferModule``).
    """

    fp32_buffers = ("inv_freq", "long_inv_freq")

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        rope, dim = cfg.rope, cfg.qk_rope_head_dim
        self.type = rope.type
        self.original_max_positions = rope.original_max_positions
        default_inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.softmax_scale_multiplier = 1.0
        long_inv = None
        if rope.type == "default":
            inv_freq, self.attention_factor = default_inv, 1.0
        elif rope.type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(rope, dim)
            if rope.mscale_all_dim:
                self.softmax_scale_multiplier = yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
        else:  # longrope: per-frequency rescale, short factors inside the original window, long beyond
            inv_freq = default_inv / torch.tensor(rope.short_factor, dtype=torch.float32)
            long_inv = default_inv / torch.tensor(rope.long_factor, dtype=torch.float32)
            factor = rope.factor
            self.attention_factor = (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(rope.original_max_positions))
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inv, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # ``span``'s cos, sin (positions, rope_dim/2)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, rope_dim/2), fp32."""
        inv_freq = self.inv_freq
        # LongRoPE switches to the long factors once a sequence outgrows the original window.
        if self.long_inv_freq is not None and int(position_ids.max()) + 1 > self.original_max_positions:
            inv_freq = self.long_inv_freq
        angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def span(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, length, rope_dim/2) of positions start..start+length-1, fp32: what ``forward`` gives
        for them, sliced from a table kept across calls (a decode step or a training step then computes
        no angles). The table grows by doubling and follows the device; LongRoPE, whose factors depend
        on the whole span, computes every call."""
        end = start + length
        if self.long_inv_freq is not None:
            return self(torch.arange(start, end, device=device)[None])
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != torch.device(device):
            size = max(end, 2 * table[0].shape[0]) if table is not None else end
            # a plain tensor even when built while decoding (inference mode): training may read it later
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self(torch.arange(size, device=device)[None])
            table = self._table = (cos[0], sin[0])
        return table[0][None, start:end], table[1][None, start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., seq, [heads,] rope_dim) by angles (batch, seq, rope_dim/2).

    ``cos``/``sin`` must already be broadcastable to ``x[..., ::2]`` (insert the head axis first).
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
