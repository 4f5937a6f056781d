"""Device-generic fused attention: one call returning (out, log-sum-exp), for local attention and the ring.

Local attention (``MultiLatentAttention``'s core) and ring attention's block step
(``xoron_dist.parallel.ring_attention``) both need a fused kernel that returns the log-sum-exp of
every query row, with a backward that takes an *external* out/LSE (the ring merges blocks with an
online softmax and recomputes each block in backward from the merged result; FlashAttention-2,
Dao 2023, arXiv:2307.08691 §3). ATen has such a kernel per device, each with its own rules:

=================  ================================================  ==========================================
kernel             ATen op (forward / backward)                      rules (torch 2.13)
=================  ================================================  ==========================================
``cpu_flash``      ``_scaled_dot_product_flash_attention_for_cpu``   any float dtype; additive mask; one head
                   (+ ``_backward``)                                 dim for q, k and v; LSE (b, h, s)
``cuda_flash``     ``_scaled_dot_product_flash_attention``           fp16/bf16 only; no mask at all; one head
                   (+ ``_backward``)                                 dim for q, k, v, at most 256; LSE (b, h, s)
``cuda_efficient`` ``_scaled_dot_product_efficient_attention``       fp32/fp16/bf16; additive bias in q's dtype
                   (+ ``_backward``)                                 with a row stride that is a multiple of 16;
                                                                     v may be narrower; LSE (b, h, ceil32(s))
=================  ================================================  ==========================================

``select_kernel`` picks by device and dtype: on CUDA the flash kernel when it can take the call
(half precision, no mask, head dim <= 256 after padding), else the memory-efficient one. The
efficient kernel pads its LSE along the query axis to a multiple of 32 and its backward reads it
with that row stride; ``attention_forward`` hands back the (b, h, s) part and ``attention_backward``
pads it again. torch's own context-parallel ring (``torch.distributed.tensor.experimental.
_context_parallel._attention``) drives the same two CUDA ops.

MLA's q/k head dim (nope + rope) differs from its v head dim. Kernels that need one head dim get v
zero-padded to q's width (and the output's extra columns, which are exactly 0, dropped); on CUDA
every head dim is also zero-padded to a multiple of 8, the kernels' vector width. Zero columns of q
and k change no score, zero columns of v change no output, so padding is exact.

Masks are boolean ``allowed`` (b or 1, 1, s, t), True = may attend, turned into the additive form
each kernel takes. A query row that may attend no key has no softmax; kernels disagree on what they
return for it (the CPU kernel: out 0 and LSE 0; an all -inf row can give NaN), so callers name such rows
(``empty_rows``) and get out 0 and LSE -inf for them, which the ring's merge reads as "saw nothing".

Dropout is not supported by these calls (the ring recomputes blocks, which would need the forward's
random state per block); local attention with ``attention_dropout > 0`` uses
``F.scaled_dot_product_attention`` instead (``xoron_dist.model.common.document_attention``).

``CPU_OPS`` / ``CUDA_OPS`` and ``_device_type`` are the op lookup: the tests swap in an emulator of
the CUDA ops (same signatures, dtypes, head-dim limits and padded LSE, in plain torch on CPU) to run
the CUDA branch on a CPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

FLASH_MAX_HEAD_DIM = 256  # the CUDA flash kernel's largest head dim (forward and backward)
CUDA_HEAD_DIM_MULTIPLE = 8  # CUDA kernels' vector width: head dims are zero-padded to a multiple of it
EFFICIENT_LSE_ROWS = 32  # the efficient kernel's LSE is padded along the query axis to a multiple of this
EFFICIENT_BIAS_ALIGN = 16  # ... and it reads its bias with a row stride that is a multiple of this
_HALF = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AttentionKernelError(ValueError):
    """An attention call no kernel can take (device, dtype, shapes)."""


@dataclass(frozen=True)
class CpuOps:
    flash: Any
    flash_backward: Any


@dataclass(frozen=True)
class CudaOps:
    flash: Any
    flash_backward: Any
    efficient: Any
    efficient_backward: Any


_aten = torch.ops.aten
CPU_OPS = CpuOps(_aten._scaled_dot_product_flash_attention_for_cpu,
                 _aten._scaled_dot_product_flash_attention_for_cpu_backward)
CUDA_OPS = CudaOps(_aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_flash_attention_backward,
                   _aten._scaled_dot_product_efficient_attention,
                   _aten._scaled_dot_product_efficient_attention_backward)


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def device_kind(t: torch.Tensor) -> str:
    """The device type whose kernels take ``t`` (``select_kernel``'s first argument): callers that check a
    call ahead, like the ring's input check, ask here, through the same lookup as the adapter."""
    return _device_type(t)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def select_kernel(device_type: str, dtype: torch.dtype, qk_dim: int, v_dim: int, masked: bool) -> str:
    """``cpu_flash`` | ``cuda_flash`` | ``cuda_efficient`` for a call with these properties."""
    if device_type == "cpu":
        if dtype not in CPU_DTYPES:
            raise AttentionKernelError(f"attention on cpu in {dtype}: the CPU flash kernel takes {CPU_DTYPES}")
        return "cpu_flash"
    if device_type == "cuda":
        if dtype not in CUDA_DTYPES:
            raise AttentionKernelError(f"attention on cuda in {dtype}: the CUDA kernels take {CUDA_DTYPES}; "
                                       "cast the inputs (train.precision=bf16 or fp32)")
        width = _round_up(max(qk_dim, v_dim), CUDA_HEAD_DIM_MULTIPLE)
        return "cuda_flash" if dtype in _HALF and not masked and width <= FLASH_MAX_HEAD_DIM else "cuda_efficient"
    raise AttentionKernelError(f"attention on {device_type}: fused kernels exist for cpu and cuda only")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, allowed: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise AttentionKernelError(f"attention wants q (b, h, s, d), k (b, h, t, d), v (b, h, t, dv); got "
                                   f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        # the kernels disagree on where the diagonal sits when s != t (top-left vs bottom-right)
        raise AttentionKernelError(f"causal attention needs as many keys as queries; got {q.shape[2]} and "
                                   f"{k.shape[2]} (pass an explicit mask instead)")
    if allowed is not None and (allowed.dtype != torch.bool or allowed.dim() != 4
                                or allowed.shape[-2:] != (q.shape[2], k.shape[2])):
        raise AttentionKernelError(f"allowed must be a bool (b or 1, 1, {q.shape[2]}, {k.shape[2]}) mask; got "
                                   f"{allowed.dtype} {tuple(allowed.shape)}")


def _additive(allowed: torch.Tensor, dtype: torch.dtype, heads: int, aligned: bool) -> torch.Tensor:
    """0 / -inf bias (b, h, s, t) (heads broadcast, a stride-0 view); ``aligned``: row stride a multiple of 16."""
    rows, cols = allowed.shape[-2:]
    width = _round_up(cols, EFFICIENT_BIAS_ALIGN) if aligned else cols
    bias = torch.zeros(*allowed.shape[:-1], width, dtype=dtype, device=allowed.device)[..., :cols]
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.expand(-1, heads, rows, cols)


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """x (b, h, s, d) laid out (b, s, h, d) in memory, the efficient kernel's own output layout: its fp16/bf16
    backward misreads ``out`` and ``grad_out`` held any other way (dq, dk wrong, dv right; H200, torch 2.11)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _uint64_seed(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # the flash kernel's (rng_state, unused) pair; read only when dropout_p > 0, which these calls never use
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                      allowed: torch.Tensor | None = None,
                      empty_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of q (b, h, s, d) over k (b, h, t, d), v (b, h, t, dv).

    allowed (b or 1, 1, s, t) bool, True = may attend (with ``causal``: both apply); empty_rows
    (b or 1, s) bool marks the rows ``allowed`` leaves without a key. Returns out (b, h, s, dv) in
    q's dtype and lse (b, h, s) fp32; empty rows get out 0 and lse -inf.
    """
    _check(q, k, v, causal, allowed)
    dv, heads = v.shape[-1], q.shape[1]
    kind = select_kernel(_device_type(q), q.dtype, q.shape[-1], dv, allowed is not None)
    if kind == "cpu_flash":
        width = max(q.shape[-1], dv)
        bias = None if allowed is None else _additive(allowed, q.dtype, heads, aligned=False)
        out, lse = CPU_OPS.flash(_pad(q, width), _pad(k, width), _pad(v, width), 0.0, causal, attn_mask=bias,
                                 scale=scale)
    elif kind == "cuda_flash":
        width = _round_up(max(q.shape[-1], dv), CUDA_HEAD_DIM_MULTIPLE)
        out, lse, *_ = CUDA_OPS.flash(_pad(q, width), _pad(k, width), _pad(v, width), 0.0, causal, False,
                                      scale=scale)
    else:
        qk_width = _round_up(q.shape[-1], CUDA_HEAD_DIM_MULTIPLE)
        bias = None if allowed is None else _additive(allowed, q.dtype, heads, aligned=True)
        out, lse, *_ = CUDA_OPS.efficient(_pad(q, qk_width), _pad(k, qk_width),
                                          _pad(v, _round_up(dv, CUDA_HEAD_DIM_MULTIPLE)), bias, True, 0.0, causal,
                                          scale=scale)
        lse = lse[..., : q.shape[2]]  # drop the query-axis padding
    out = out[..., :dv]
    if allowed is not None and empty_rows is not None:  # whatever the kernel made of them (0, NaN)
        keep = ~empty_rows[:, None, :]  # (b or 1, 1, s)
        out = torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        lse = lse.masked_fill(~keep, float("-inf"))
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, *, scale: float, causal: bool = False,
                       allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from an external out (b, h, s, dv) and lse (b, h, s) fp32 (e.g. the ring's merged ones).

    dout (b, h, s, dv). The same kernel is chosen as ``attention_forward`` would for these inputs.
    Rows with lse -inf (they saw no key) get zero gradient: their lse is read as 0 under a mask
    that allows none of their keys, so every probability is exp(-inf) = 0.
    """
    _check(q, k, v, causal, allowed)
    dq_dim, dv_dim, heads = q.shape[-1], v.shape[-1], q.shape[1]
    lse = lse.float().masked_fill(lse == float("-inf"), 0.0)
    kind = select_kernel(_device_type(q), q.dtype, dq_dim, dv_dim, allowed is not None)
    if kind == "cpu_flash":
        w = max(dq_dim, dv_dim)
        bias = None if allowed is None else _additive(allowed, q.dtype, heads, aligned=False)
        gq, gk, gv = CPU_OPS.flash_backward(_pad(dout, w).contiguous(), _pad(q, w), _pad(k, w), _pad(v, w),
                                            _pad(out, w).contiguous(), lse, 0.0, causal, attn_mask=bias, scale=scale)
    elif kind == "cuda_flash":
        w = _round_up(max(dq_dim, dv_dim), CUDA_HEAD_DIM_MULTIPLE)
        seed, offset = _uint64_seed(q.device)
        gq, gk, gv = CUDA_OPS.flash_backward(_pad(dout, w).contiguous(), _pad(q, w), _pad(k, w), _pad(v, w),
                                             _pad(out, w).contiguous(), lse.contiguous(), None, None, q.shape[2],
                                             k.shape[2], 0.0, causal, seed, offset, scale=scale)
    else:
        wqk, wv = _round_up(dq_dim, CUDA_HEAD_DIM_MULTIPLE), _round_up(dv_dim, CUDA_HEAD_DIM_MULTIPLE)
        bias = None if allowed is None else _additive(allowed, q.dtype, heads, aligned=True)
        rows = _round_up(q.shape[2], EFFICIENT_LSE_ROWS)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        gq, gk, gv, _ = CUDA_OPS.efficient_backward(
            _bshd(_pad(dout, wv)), _pad(q, wqk), _pad(k, wqk), _pad(v, wv), bias, _bshd(_pad(out, wv)),
            F.pad(lse, (0, rows - q.shape[2])).contiguous(), seed, seed, 0.0, [True, True, True, False], causal,
            scale=scale)
    return gq[..., :dq_dim], gk[..., :dq_dim], gv[..., :dv_dim]


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        out, lse = attention_forward(q, k, v, scale=scale, causal=causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale=ctx.scale, causal=ctx.causal)
        return dq, dk, dv, None, None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    causal: bool) -> torch.Tensor:
    """Differentiable fused attention (no mask): q (b, h, s, d), k (b, h, t, d), v (b, h, t, dv) -> (b, h, s, dv).

    Saves q, k, v, out and the fp32 LSE for backward, like ``F.scaled_dot_product_attention``'s
    fused paths, but picks the kernel with ``select_kernel`` and accepts dv != d.
    """
    return _FusedAttention.apply(q, k, v, float(scale), causal)


__all__ = ["AttentionKernelError", "CPU_OPS", "CUDA_OPS", "CpuOps", "CudaOps", "attention_backward",
           "attention_forward", "device_kind", "fused_attention", "select_kernel"]
