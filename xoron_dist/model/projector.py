"""Perceiver resampler: any number of encoder features -> a fixed number of tokens in the LLM's width.

Flamingo (Alayrac et al. 2022, §2.1 and Fig. 5): ``num_latents`` learned queries cross-attend to
the encoder's features *and to themselves* (keys/values = [features ; latents]), then pass an
FFN; a few such layers. Here::

    features (b, n, d_enc) ─► in_proj ─► x_f (b, n, D)
    latents (L, D) ─► [ z += xattn(norm(z), [norm_f(x_f) ; norm(z)]) ; z += FFN(norm(z)) ] × layers
                   ─► norm ─► out_proj ─► (b, L, D)         D = the LLM's hidden size

One resampler per modality; ``L`` is the placeholder span length the loader writes
(``data.image_tokens`` / ``data.video_tokens``), so its output fills a span exactly. Padded
features (a mask from the encoder) are never attended to. The final ``out_proj`` is initialised
like the token embeddings (normal, ``init_std``), so projected media start on the scale of text.

``CrossAttention`` (multi-head attention of queries over a context, heads split over TP by the
``LayerBuilder``) is shared with the fusion layers (``xoron_dist.model.fusion``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import ProjectorConfig
from xoron_dist.model.layers import LayerBuilder, RMSNorm, SwiGLU, tp_slice


@torch.no_grad()
def init_normal_(param: torch.Tensor, std: float, builder: LayerBuilder) -> None:
    """Normal(0, std) into ``param``; a tensor-parallel slice is cut from a full draw, so every TP
    size starts from the single-rank weights (as ``XoronLLM.reset_parameters`` does)."""
    if not getattr(param, "tensor_model_parallel", False):
        param.normal_(std=std)
        return
    shape = list(param.shape)
    shape[param.partition_dim] *= builder.tp_size
    full = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(std=std)
    param.copy_(tp_slice(full, param.partition_dim, param.partition_stride, builder.tp_rank, builder.tp_size))


@torch.no_grad()
def init_module_(module: nn.Module, std: float, builder: LayerBuilder) -> None:
    """Unit RMSNorm weights and normal(std) for every other leaf weight, in module order."""
    for sub in module.modules():
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
        elif not list(sub.children()) and isinstance(getattr(sub, "weight", None), nn.Parameter):
            init_normal_(sub.weight, std, builder)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a ``context``; q/k/v column-split, output row-split.

    ``mask`` (batch, q, k) bool, True = may attend. A query with no allowed key gets a zero output
    (not the NaN of a softmax over nothing): a text token with no media in its document.
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int, builder: LayerBuilder) -> None:
        super().__init__()
        if q_dim % num_heads:
            raise ValueError(f"num_heads = {num_heads} does not divide the query width {q_dim}")
        if num_heads % builder.tp_size:
            raise ValueError(f"num_heads = {num_heads} is not divisible by tensor-parallel size {builder.tp_size}")
        self.head_dim = q_dim // num_heads
        self.num_heads = num_heads // builder.tp_size  # heads held by this rank
        width = num_heads * self.head_dim
        self.q_proj = builder.column_linear(q_dim, width)
        self.k_proj = builder.column_linear(kv_dim, width)
        self.v_proj = builder.column_linear(kv_dim, width)
        self.out_proj = builder.row_linear(width, q_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, q, q_dim), context (batch, k, kv_dim) -> (batch, q, q_dim)."""
        batch, queries, _ = x.shape
        keys = context.shape[1]
        q = self.q_proj(x).view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(batch, keys, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, keys, self.num_heads, self.head_dim).transpose(1, 2)
        attn_mask = has_key = None
        if mask is not None:
            has_key = mask.any(dim=-1, keepdim=True)  # (batch, q, 1)
            attn_mask = (mask | ~has_key)[:, None]  # a keyless row attends anywhere; zeroed below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, queries, self.num_heads * self.head_dim)
        if has_key is not None:
            out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return self.out_proj(out)


class PerceiverLayer(nn.Module):
    def __init__(self, hidden: int, cfg: ProjectorConfig, builder: LayerBuilder) -> None:
        super().__init__()
        self.latent_norm = RMSNorm(hidden)
        self.feature_norm = RMSNorm(hidden)
        self.attn = CrossAttention(hidden, hidden, cfg.num_heads, builder)
        self.ffn_norm = RMSNorm(hidden)
        self.ffn = SwiGLU(hidden, cfg.intermediate_size, builder)

    def forward(self, latents: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        normed = self.latent_norm(latents)
        context = torch.cat((self.feature_norm(features), normed), dim=1)  # Flamingo: keys = [x_f ; x]
        latents = latents + self.attn(normed, context, mask)
        return latents + self.ffn(self.ffn_norm(latents))


class PerceiverResampler(nn.Module):
    """(batch, n, in_dim) features + (batch, n) validity mask -> (batch, num_latents, hidden)."""

    def __init__(self, in_dim: int, hidden: int, num_latents: int, cfg: ProjectorConfig,
                 builder: LayerBuilder | None = None, init_std: float = 0.02) -> None:
        super().__init__()
        builder = builder or LayerBuilder()
        self.builder, self.init_std = builder, init_std
        self.num_latents = num_latents
        self.in_proj = builder.replicated_linear(in_dim, hidden)
        self.latents = nn.Parameter(torch.empty(num_latents, hidden))
        self.layers = nn.ModuleList(PerceiverLayer(hidden, cfg, builder) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(hidden)
        self.out_proj = builder.replicated_linear(hidden, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_module_(self, self.init_std, self.builder)
        with torch.no_grad():
            self.latents.normal_(std=1.0)  # queries: unit scale, like the normed features they read

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch = features.shape[0]
        x_f = self.in_proj(features)
        latents = self.latents.to(x_f.dtype).expand(batch, -1, -1)
        attend = None
        if mask is not None:  # (batch, n) -> (batch, latents, n + latents): every latent sees valid features + latents
            own = torch.ones(batch, self.num_latents, dtype=torch.bool, device=mask.device)
            attend = torch.cat((mask.bool(), own), dim=1)[:, None].expand(-1, self.num_latents, -1)
        for layer in self.layers:
            latents = layer(latents, x_f, attend)
        return self.out_proj(self.norm(latents))
