"""Multi-head cross-attention of queries over a context: the Perceiver's and the fusion layers' attention.

Tensor parallelism splits q/k/v by heads and the output projection by rows
(``attention_plan`` in ``xoron_dist.model.common.sharding``); the number of heads a rank holds
is read off its q projection, so this code is the same on one rank or many.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.common.init import empty_linear


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a ``context``.

    ``mask`` (batch, q, k) bool, True = may attend. A query with no allowed key gets a zero output
    (not the NaN of a softmax over nothing): a text token with no media in its document.
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        if q_dim % num_heads:
            raise ValueError(f"num_heads = {num_heads} does not divide the query width {q_dim}")
        self.head_dim = q_dim // num_heads
        width = num_heads * self.head_dim
        self.q_proj = empty_linear(q_dim, width)
        self.k_proj = empty_linear(kv_dim, width)
        self.v_proj = empty_linear(kv_dim, width)
        self.out_proj = empty_linear(width, q_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, q, q_dim), context (batch, k, kv_dim) -> (batch, q, q_dim)."""
        batch, queries, _ = x.shape
        keys = context.shape[1]
        q = self.q_proj(x).view(batch, queries, -1, self.head_dim).transpose(1, 2)  # (b, heads here, q, d)
        k = self.k_proj(context).view(batch, keys, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, keys, -1, self.head_dim).transpose(1, 2)
        attn_mask = has_key = None
        if mask is not None:
            has_key = mask.any(dim=-1, keepdim=True)  # (batch, q, 1)
            attn_mask = (mask | ~has_key)[:, None]  # a keyless row attends anywhere; zeroed below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, queries, -1)
        if has_key is not None:
            out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return self.out_proj(out)
