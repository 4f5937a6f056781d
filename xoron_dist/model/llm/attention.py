"""Multi-head Latent Attention (DeepSeek-V2 §2.1, arXiv:2405.04434) with a compressed latent KV cache.

Per token, keys and values are stored only as a normed latent ``c_kv`` (kv_lora_rank)
and one shared rope key ``k_rope`` (qk_rope_head_dim), instead of 2·heads·head_dim
values. Two equivalent ways to attend over it:

* *expanded* (training, prefill without cache): up-project the latent to per-head
  ``k_nope``/``v`` and run fused scaled-dot-product attention;
* *absorbed* (decoding from the cache): fold the key up-projection into the query
  and the value up-projection into the output (eq. 10-11 of the paper), so the
  attention runs directly against the cached latents and nothing is re-expanded.

Training attention goes through ``self.core`` (``ExpandedAttention`` here: the device-generic fused
kernel of ``xoron_dist.model.common.attention_kernels`` over the expanded keys and values; packed
documents run as one causal call per document length, ``xoron_dist.model.common.document_attention``,
so no (s x s) mask is ever built); sequence parallelism swaps in the ring attention core, which receives
the same tensors (``xoron_dist.parallel.ring_attention.RingAttentionCore``). With tensor
parallelism the heads are split over the ranks and this module reads how many it holds off
``kv_up``'s weight; ``rope_key_entry`` is where the rope key, shared by every head, enters the
head-split computation (its gradient is then summed over the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import LLMConfig
from xoron_dist.model.common.attention_kernels import fused_attention
from xoron_dist.model.common.document_attention import DocumentLayoutCache, document_attention
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope import apply_rotary
from xoron_dist.model.common.sharding import SplitEntry

# The q and kv latent norms' epsilon, whatever ``rms_norm_eps`` is: DeepSeek-V3's reference and HF's
# DeepseekV3 build them with the norm's default 1e-6, so any other value here would give a model
# those cannot reproduce.
LATENT_NORM_EPS = 1e-6


@dataclass
class LatentKVCache:
    """Preallocated latent cache: per layer one buffer (batch, max_len, kv_lora_rank + rope_dim) holding
    [c_kv | k_rope] side by side, so decoding scores a query against both in one matmul."""

    entries: list[torch.Tensor]
    kv_rank: int
    length: int = 0

    @classmethod
    def allocate(cls, cfg: LLMConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        entries = [torch.zeros(batch, max_len, width, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        return cls(entries=entries, kv_rank=cfg.kv_lora_rank)

    @property
    def latent(self) -> list[torch.Tensor]:
        """Every layer's c_kv part (batch, max_len, kv_lora_rank) (views of ``entries``)."""
        return [e[..., : self.kv_rank] for e in self.entries]

    @property
    def rope_key(self) -> list[torch.Tensor]:
        """Every layer's rope-key part (batch, max_len, rope_dim) (views of ``entries``)."""
        return [e[..., self.kv_rank :] for e in self.entries]

    @property
    def capacity(self) -> int:
        return self.entries[0].shape[1]

    def write(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
        """Store new positions [length, length+seq) of one layer; return its cached [c_kv | k_rope] so far."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.capacity:
            raise ValueError(f"latent KV cache holds {self.capacity} positions; writing up to {end}")
        entry = self.entries[layer]
        entry[:, start:end, : self.kv_rank] = latent
        entry[:, start:end, self.kv_rank :] = rope_key
        return entry[:, :end]


def attention_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None
) -> torch.Tensor:
    """Boolean mask (batch, 1, q, k), True = may attend: causal by position, and within one document."""
    allowed = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if q_docs is not None:
        allowed = allowed & (k_docs[:, None, None, :] == q_docs[:, None, :, None])
    return allowed


# One layout per batch of packed documents, shared by every layer (and its recomputation): computing
# it needs the document lengths on the host, which should happen once per forward, not per layer.
_document_layouts = DocumentLayoutCache()


class ExpandedAttention(nn.Module):
    """The single-rank attention core: up-project the latent to per-head keys/values, fused attention.

    ``forward(q_nope, q_rope, latent, k_rope, document_ids, attn)`` with q_* (b, s, h, d), latent
    (b, s, kv_rank), k_rope (b, s, rope) already rotated; ``attn`` is the owning
    ``MultiLatentAttention`` (its ``kv_up``, dims, softmax scale, dropout). Returns (b, s, h, v_dim).

    Causal by order in the row (packed documents restart their position ids), and with
    ``document_ids`` within one document, attended document by document (no s x s mask). The kernel
    adapter zero-pads MLA's narrower v where a kernel needs one head dim (the CPU and CUDA flash
    kernels) and drops the padded output columns. With dropout (training, ``attention_dropout`` > 0)
    SDPA's own path runs, which takes v as it is.
    """

    def forward(self, q_nope, q_rope, latent, k_rope, document_ids, attn: MultiLatentAttention) -> torch.Tensor:
        k, v = attn.expand_kv(latent, k_rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        dropout = attn.dropout if attn.training else 0.0
        if document_ids is not None:
            return document_attention(q, k, v, _document_layouts(document_ids), scale=attn.softmax_scale,
                                      dropout_p=dropout)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, s, d)
        if dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=attn.softmax_scale)
        else:
            out = fused_attention(q, k, v, scale=attn.softmax_scale, causal=True)
        return out.transpose(1, 2)


class MultiLatentAttention(nn.Module):
    """MLA: low-rank q (q_lora_rank) and kv (kv_lora_rank), decoupled rope dims, latent cache.

    Weight names follow the math: ``q_down``/``q_up`` (W^DQ, W^UQ), ``kv_down`` (W^DKV and
    W^KR fused), ``kv_up`` (W^UK and W^UV fused), ``out_proj`` (W^O).
    """

    def __init__(self, cfg: LLMConfig, softmax_scale_multiplier: float = 1.0) -> None:
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = empty_linear(cfg.hidden_size, cfg.num_heads * qk_dim)
        else:
            self.q_down = empty_linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_up = empty_linear(cfg.q_lora_rank, cfg.num_heads * qk_dim)
        self.kv_down = empty_linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_up = empty_linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.out_proj = empty_linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size)
        self.rope_key_entry = SplitEntry()
        self.core = ExpandedAttention()
        self.softmax_scale = qk_dim**-0.5 * softmax_scale_multiplier
        self.dropout = cfg.attention_dropout

    @property
    def num_heads(self) -> int:
        """Heads this module holds (all of them on one rank; num_heads / tp with tensor parallelism)."""
        return self.kv_up.weight.shape[0] // (self.nope_dim + self.v_dim)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        return q.view(*x.shape[:2], -1, self.nope_dim + self.rope_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (batch, seq, hidden); rope = cos, sin (batch, seq, rope_dim/2); positions (batch, seq).

        With a ``cache``, several new tokens attend by ``positions`` (a prompt's prefill); a single new
        token attends every cached position without a mask: the cache holds each row's text in order,
        so the newest token follows all of it.
        """
        batch, seq, _ = x.shape
        cos, sin = rope
        q = self._queries(x)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos[:, :, None], sin[:, :, None])  # (b, s, h, rope)

        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)  # (b, s, kv_rank): the cached c_kv
        k_rope = self.rope_key_entry(apply_rotary(k_rope, cos, sin))  # (b, s, rope): one key for all heads

        if cache is None:
            out = self.core(q_nope, q_rope, latent, k_rope, document_ids, self)
        else:
            if document_ids is not None:
                raise ValueError("packed documents (document_ids) are a training feature; decode one text per row")
            cached = cache.write(layer, latent, k_rope)
            mask = None  # one new token (the decode loop): it follows every cached one, so it sees them all
            if seq > 1:
                k_positions = torch.arange(cache.length + seq, device=x.device).expand(batch, -1)
                mask = attention_mask(positions, k_positions, None, None)
            out = self._absorbed(q_nope, q_rope, cached, mask)
        return self.out_proj(out.reshape(batch, seq, -1))

    def expand_kv(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (b, s, kv_rank), k_rope (b, s, rope) -> keys (b, s, h, nope+rope), values (b, s, h, v)."""
        batch, seq = latent.shape[:2]
        kv = self.kv_up(latent).view(batch, seq, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, k_nope.shape[2], -1)), dim=-1), v

    def _absorbed(self, q_nope, q_rope, cached, mask) -> torch.Tensor:
        """Attend against cached [c_kv | k_rope] (b, t, kv_rank + rope) without expanding the latents.

        q_nope (b, s, h, nope), q_rope (b, s, h, rope); mask (b, 1, s, t) bool or None (all allowed).
        Scores are [q_nope·W^UK | q_rope] · [c_kv | k_rope] in one matmul (eq. 10 with the rope part
        appended). Returns (b, s, h, v_dim).
        """
        w = self.kv_up.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (h, nope, r), (h, v, r)
        q_latent = q_nope.transpose(1, 2) @ w_uk  # (b, h, s, r)
        query = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # (b, h, s, r + rope)
        keys = cached[:, None]  # (b, 1, t, r + rope): every head reads the same latents
        scores = ((query @ keys.transpose(-1, -2)) * self.softmax_scale).float()  # (b, h, s, t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(cached.dtype)
        out_latent = probs @ keys[..., : self.kv_rank]  # (b, h, s, r)
        return (out_latent @ w_uv.transpose(-1, -2)).transpose(1, 2)  # (b, s, h, v)
