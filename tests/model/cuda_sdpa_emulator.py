"""Plain-torch stand-ins for ATen's two CUDA attention kernels, to run their branch of the adapter on CPU.

``xoron_dist.model.common.attention_kernels`` drives ``_scaled_dot_product_flash_attention`` and
``_scaled_dot_product_efficient_attention`` (and their backwards) on CUDA. These functions have
the ops' exact signatures (argument names, defaults, keyword-only ``scale``; a test compares them
with the registered schemas), return the same outputs in the same shapes and dtypes (a test
compares them with the ops' meta registrations), and refuse what the real ops refuse:

* flash: fp16/bf16 only, one head dim for q, k and v, at most 256; no mask argument exists;
* efficient: fp32/fp16/bf16, q and k one head dim (v may differ); a bias in q's dtype whose row
  stride is a multiple of 16; its LSE is padded along the query axis to a multiple of 32 (the
  padding holds +inf here, so a caller that reads it breaks loudly), and its backward wants the
  padded LSE back. Its output is laid out (batch, seq, heads, dim) in memory, and in fp16/bf16 its
  backward misreads ``out`` and ``grad_out`` held any other way: dq and dk came out wrong by 60-200 %
  on an H200 (torch 2.11, CUDA 13) for contiguous (batch, heads, seq, dim) tensors, while fp32 and
  dv were right. The emulator refuses such a call.

Math in fp64 from the definitions (softmax(q kᵀ · scale + bias) v; FlashAttention-2's backward
from out and LSE), then cast to the input dtype. A query row whose every key is masked gets NaN,
the worst a kernel can do; the adapter must never let one through. Dropout is not emulated.
"""

from __future__ import annotations

import math

import torch

from xoron_dist.model.common.attention_kernels import CudaOps

FLASH_MAX_HEAD_DIM = 256


def _scores(query, key, scale, is_causal, bias=None, bottom_right=False):
    s, t = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    if is_causal:
        # flash aligns the diagonal bottom-right, the efficient kernel top-left (equal when s == t)
        shift = t - s if bottom_right else 0
        allowed = torch.ones(s, t, dtype=torch.bool, device=query.device).tril(shift)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, scale


def _forward(query, key, value, scale, is_causal, bias=None, bottom_right=False):
    scores, _ = _scores(query, key, scale, is_causal, bias, bottom_right)
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ value.double()
    return out.to(query.dtype), lse.float()


def _backward(grad_out, query, key, value, out, lse, scale, is_causal, bias=None, bottom_right=False):
    scores, scale = _scores(query, key, scale, is_causal, bias, bottom_right)
    probs = (scores - lse.double()[..., None]).exp()
    d_out = grad_out.double()
    grad_v = probs.transpose(-1, -2) @ d_out
    d_probs = d_out @ value.double().transpose(-1, -2)
    delta = (d_out * out.double()).sum(-1, keepdim=True)
    d_scores = probs * (d_probs - delta)
    grad_q = d_scores @ key.double() * scale
    grad_k = d_scores.transpose(-1, -2) @ query.double() * scale
    return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype)


def _flash_checks(query, key, value):
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("query and key must have the same dtype")
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        raise RuntimeError("query, key and value must have the same head dimension for FlashAttention")
    if query.shape[-1] > FLASH_MAX_HEAD_DIM:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if query.dim() != 4:
        raise RuntimeError("query must be (batch, heads, seq, head_dim)")


def flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    _flash_checks(query, key, value)
    if dropout_p or return_debug_mask:
        raise NotImplementedError("the emulator has no dropout and no debug mask")
    out, lse = _forward(query, key, value, scale, is_causal, bottom_right=True)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)
    unused = torch.zeros((), dtype=torch.uint64, device=query.device)
    return (out, lse, None, None, query.shape[2], key.shape[2], rng_state, unused,
            torch.empty(0, dtype=query.dtype, device=query.device))


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, *, scale=None):
    _flash_checks(query, key, value)
    b, h, s = query.shape[:3]
    if logsumexp.shape != (b, h, s) or logsumexp.dtype != torch.float32:
        raise RuntimeError(f"logsumexp must be fp32 (batch, heads, seq_q) = {(b, h, s)}; got "
                           f"{logsumexp.dtype} {tuple(logsumexp.shape)}")
    if (max_q, max_k) != (s, key.shape[2]):
        raise RuntimeError(f"max_q, max_k = {max_q}, {max_k}; the inputs have {s} and {key.shape[2]} rows")
    return _backward(grad_out, query, key, value, out, logsumexp, scale, is_causal, bottom_right=True)


def _efficient_checks(query, key, value, attn_bias):
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"Expected query dtype to be fp32, fp16 or bf16; got {query.dtype}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError("query and key must have the same head dimension")
    if attn_bias is not None:
        if attn_bias.dtype != query.dtype:
            raise RuntimeError(f"invalid dtype for bias - should match query's dtype ({attn_bias.dtype})")
        if attn_bias.dim() != 4:
            raise RuntimeError("attn_bias must be 4-D")
        if attn_bias.shape[2] > 1 and attn_bias.stride(2) % 16:
            raise RuntimeError(f"attn_bias is not correctly aligned (strideM). attn_bias.stride(2) = "
                               f"{attn_bias.stride(2)}, and should be a multiple of 16.")


def efficient(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    _efficient_checks(query, key, value, attn_bias)
    if dropout_p:
        raise NotImplementedError("the emulator has no dropout")
    out, lse = _forward(query, key, value, scale, is_causal, attn_bias)
    b, h, s = query.shape[:3]
    rows = math.ceil(s / 32) * 32 if compute_log_sumexp else 0
    padded = torch.full((b, h, rows), float("inf"), dtype=torch.float32, device=query.device)
    padded[..., : min(rows, s)] = lse[..., :rows]
    seed = torch.zeros((), dtype=torch.int64, device=query.device)
    return out.transpose(1, 2).contiguous().transpose(1, 2), padded, seed, seed.clone()


def _bshd(t: torch.Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def efficient_backward(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
                       grad_input_mask, is_causal=False, *, scale=None):
    _efficient_checks(query, key, value, attn_bias)
    if query.dtype in (torch.float16, torch.bfloat16) and not (_bshd(out) and _bshd(grad_out_)):
        raise RuntimeError("efficient backward in half precision: out and grad_out must be laid out (batch, seq, "
                           f"heads, dim) in memory, as the forward returns out; got strides {out.stride()} and "
                           f"{grad_out_.stride()} (the real kernel returns wrong dq, dk here instead of raising)")
    b, h, s = query.shape[:3]
    rows = math.ceil(s / 32) * 32
    if logsumexp.shape != (b, h, rows):
        raise RuntimeError(f"logsumexp must be (batch, heads, ceil32(seq_q)) = {(b, h, rows)}; got "
                           f"{tuple(logsumexp.shape)}")
    grad_q, grad_k, grad_v = _backward(grad_out_, query, key, value, out, logsumexp[..., :s], scale, is_causal,
                                       attn_bias)
    if attn_bias is not None and grad_input_mask[3]:
        raise NotImplementedError("the emulator does not return a bias gradient")
    return grad_q, grad_k, grad_v, None


EMULATED_CUDA_OPS = CudaOps(flash, flash_backward, efficient, efficient_backward)
