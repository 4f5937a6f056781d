"""Multi-head Latent Attention (DeepSeek-V2 §2.1, arXiv:2405.04434) with a compressed latent KV cache.

Per token, keys and values are stored only as a normed latent ``c_kv`` (kv_lora_rank)
and one shared rope key ``k_rope`` (qk_rope_head_dim), instead of 2·heads·head_dim
values. Two equivalent ways to attend over it:

* *expanded* (training, prefill without cache): up-project the latent to per-head
  ``k_nope``/``v`` and run fused scaled-dot-product attention;
* *absorbed* (decoding from the cache): fold the key up-projection into the query
  and the value up-projection into the output (eq. 10-11 of the paper), so the
  attention runs directly against the cached latents and nothing is re-expanded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import LLMConfig
from xoron_dist.model.layers import LayerBuilder, RMSNorm
from xoron_dist.model.rope import apply_rotary


@dataclass
class LatentKVCache:
    """Preallocated latent cache of every layer: (batch, max_len, kv_lora_rank) + (batch, max_len, rope_dim)."""

    latent: list[torch.Tensor]
    rope_key: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, cfg: LLMConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        def make(width: int) -> list[torch.Tensor]:
            return [torch.zeros(batch, max_len, width, device=device, dtype=dtype) for _ in range(cfg.num_layers)]

        return cls(latent=make(cfg.kv_lora_rank), rope_key=make(cfg.qk_rope_head_dim))

    @property
    def capacity(self) -> int:
        return self.latent[0].shape[1]

    def write(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new positions [length, length+seq) of one layer; return all cached positions so far."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.capacity:
            raise ValueError(f"latent KV cache holds {self.capacity} positions; writing up to {end}")
        self.latent[layer][:, start:end] = latent
        self.rope_key[layer][:, start:end] = rope_key
        return self.latent[layer][:, :end], self.rope_key[layer][:, :end]


def attention_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None
) -> torch.Tensor:
    """Boolean mask (batch, 1, q, k), True = may attend: causal by position, and within one document."""
    allowed = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if q_docs is not None:
        allowed = allowed & (k_docs[:, None, None, :] == q_docs[:, None, :, None])
    return allowed


class MultiLatentAttention(nn.Module):
    """MLA: low-rank q (q_lora_rank) and kv (kv_lora_rank), decoupled rope dims, latent cache.

    Weight names follow the math: ``q_down``/``q_up`` (W^DQ, W^UQ), ``kv_down`` (W^DKV and
    W^KR fused), ``kv_up`` (W^UK and W^UV fused), ``out_proj`` (W^O).
    """

    def __init__(self, cfg: LLMConfig, builder: LayerBuilder, softmax_scale_multiplier: float = 1.0) -> None:
        super().__init__()
        if cfg.num_heads % builder.tp_size:
            raise ValueError(f"num_heads={cfg.num_heads} is not divisible by tensor-parallel size {builder.tp_size}")
        self.num_heads = cfg.num_heads // builder.tp_size  # heads held by this rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = builder.column_linear(cfg.hidden_size, cfg.num_heads * qk_dim)
        else:
            self.q_down = builder.replicated_linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_up = builder.column_linear(cfg.q_lora_rank, cfg.num_heads * qk_dim)
        self.kv_down = builder.replicated_linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_up = builder.column_linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.out_proj = builder.row_linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size)
        self.softmax_scale = qk_dim**-0.5 * softmax_scale_multiplier
        self.dropout = cfg.attention_dropout
        self.builder = builder

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        return q.view(*x.shape[:2], self.num_heads, self.nope_dim + self.rope_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (batch, seq, hidden); rope = cos, sin (batch, seq, rope_dim/2); positions (batch, seq)."""
        batch, seq, _ = x.shape
        cos, sin = rope
        q = self._queries(x)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos[:, :, None], sin[:, :, None])  # (b, s, h, rope)

        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)  # (b, s, kv_rank): the cached c_kv
        # One rope key shared by all heads; with heads split over TP ranks, each rank's use of it
        # yields a partial gradient, summed over the ranks by copy_to's backward.
        k_rope = self.builder.copy_to_tp(apply_rotary(k_rope, cos, sin))  # (b, s, rope)

        if cache is None and self.builder.sequence is not None:
            out = self._ring(q_nope, q_rope, latent, k_rope, document_ids)
        elif cache is None:
            out = self._expanded(q_nope, q_rope, latent, k_rope, document_ids)
        else:
            if document_ids is not None:
                raise ValueError("packed documents (document_ids) are a training feature; decode one text per row")
            k_positions = torch.arange(cache.length + seq, device=x.device).expand(batch, -1)
            latent, k_rope = cache.write(layer, latent, k_rope)
            out = self._absorbed(q_nope, q_rope, latent, k_rope, attention_mask(positions, k_positions, None, None))
        return self.out_proj(out.reshape(batch, seq, self.num_heads * self.v_dim))

    def _expanded(self, q_nope, q_rope, latent, k_rope, document_ids) -> torch.Tensor:
        """Up-project the latent to per-head keys/values; fused SDPA. Returns (b, s, h, v_dim)."""
        batch, seq = latent.shape[:2]
        k, v = self._expand_kv(latent, k_rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        mask, causal = None, True
        if document_ids is not None:
            # Packed documents restart their position ids; causality is by order in the row.
            order = torch.arange(seq, device=latent.device).expand(batch, -1)
            mask, causal = attention_mask(order, order, document_ids, document_ids), False
        # Fused (flash) SDPA kernels need one head dim for q, k and v; MLA's v is narrower than
        # its q/k (nope + rope). Zero-padding v costs little and unlocks them (≈3x on CPU at 512
        # tokens, and the flash path on GPU); the padded output columns are dropped.
        width = max(q.shape[-1], self.v_dim)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]

    def _ring(self, q_nope, q_rope, latent, k_rope, document_ids) -> torch.Tensor:
        """Sequence parallel: this rank holds its zig-zag rows; keys travel around the SP ring."""
        from xoron_dist.parallel.ring_attention import ring_attention, ring_attention_latent, zigzag_positions

        split = self.builder.sequence
        seq = latent.shape[1]
        order = zigzag_positions(seq * split.size, split.rank, split.size, device=latent.device)[None]
        common = dict(group=split.group, scale=self.softmax_scale, causal=True, positions=order,
                      document_ids=document_ids)
        if split.latent:
            # The ring uses kv_up's weight directly, bypassing the column layer's copy_to: the
            # latent's gradient (partial over this rank's heads) must still be summed over TP.
            return ring_attention_latent(q_nope, q_rope, self.builder.copy_to_tp(latent), k_rope, self.kv_up.weight,
                                         num_heads=self.num_heads, nope_dim=self.nope_dim, v_dim=self.v_dim, **common)
        k, v = self._expand_kv(latent, k_rope)
        return ring_attention(torch.cat((q_nope, q_rope), dim=-1), k, v, **common)

    def _expand_kv(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (b, s, kv_rank), k_rope (b, s, rope) -> keys (b, s, h, nope+rope), values (b, s, h, v)."""
        batch, seq = latent.shape[:2]
        kv = self.kv_up(latent).view(batch, seq, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)), dim=-1), v

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attend against cached latents (b, t, kv_rank) without expanding them. Returns (b, s, h, v_dim)."""
        w = self.kv_up.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (h, nope, r), (h, v, r)
        q_latent = torch.einsum("bshd,hdr->bhsr", q_nope, w_uk)
        scores = torch.einsum("bhsr,btr->bhst", q_latent, latent)
        scores = scores + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        scores = (scores * self.softmax_scale).float().masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        out_latent = torch.einsum("bhst,btr->bhsr", probs, latent)
        return torch.einsum("bhsr,hvr->bshv", out_latent, w_uv)
