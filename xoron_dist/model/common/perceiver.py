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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xoron_dist.config import ProjectorConfig
from xoron_dist.model.common.attention import CrossAttention
from xoron_dist.model.common.init import empty_linear, init_weights_
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.norm import RMSNorm


class PerceiverLayer(nn.Module):
    def __init__(self, hidden: int, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.latent_norm = RMSNorm(hidden)
        self.feature_norm = RMSNorm(hidden)
        self.attn = CrossAttention(hidden, hidden, cfg.num_heads)
        self.ffn_norm = RMSNorm(hidden)
        self.ffn = SwiGLU(hidden, cfg.intermediate_size)

    def forward(self, latents: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        normed = self.latent_norm(latents)
        context = torch.cat((self.feature_norm(features), normed), dim=1)  # Flamingo: keys = [x_f ; x]
        latents = latents + self.attn(normed, context, mask)
        return latents + self.ffn(self.ffn_norm(latents))


class PerceiverResampler(nn.Module):
    """(batch, n, in_dim) features + (batch, n) validity mask -> (batch, num_latents, hidden)."""

    def __init__(self, in_dim: int, hidden: int, num_latents: int, cfg: ProjectorConfig,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.num_latents = num_latents
        self.in_proj = empty_linear(in_dim, hidden)
        self.latents = nn.Parameter(torch.empty(num_latents, hidden))
        self.layers = nn.ModuleList(PerceiverLayer(hidden, cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(hidden)
        self.out_proj = empty_linear(hidden, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights_(self, self.init_std)
        with torch.no_grad():
            self.latents.normal_(std=1.0)  # queries: unit scale, like the normed features they read

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                span_lengths: Sequence[int] | None = None) -> torch.Tensor:
        """-> (batch, num_latents, hidden). ``span_lengths`` (batch ints), optional: the spans the tokens
        fill, which must all be ``num_latents`` (the modality table's fixed-span media)."""
        if span_lengths is not None and any(n != self.num_latents for n in span_lengths):
            raise ValueError(f"a Perceiver resampler emits {self.num_latents} tokens per medium; spans of "
                             f"{sorted(set(span_lengths))} tokens were asked for")
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

