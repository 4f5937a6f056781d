"""Building blocks shared by every Xoron module: RMSNorm, SwiGLU, and the layer builder.

Model code never constructs ``nn.Linear``/``nn.Embedding`` for its big matrices
directly: it asks a ``LayerBuilder`` for a *column*-split, *row*-split or
*replicated* linear (Megatron's vocabulary). The default builder makes plain
single-rank layers; the tensor-parallel builder (``xoron_dist.parallel.tensor``,
issue #4) makes Megatron-core parallel layers from the same calls, so TP is a
property of the layers and not a second model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like DeepSeek/HF."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerBuilder:
    """Makes the linear/embedding layers of a model; this one is single-rank.

    ``column_linear``: output features may be split across tensor-parallel ranks.
    ``row_linear``: input features may be split (its output is then reduced).
    ``replicated_linear``: identical on every rank (small down-projections, routers).
    A column layer's caller sizes what follows by ``out_features // tp_size``.
    """

    tp_size: int = 1

    def column_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def replicated_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def output_layer(self, dim: int, vocab: int) -> nn.Module:
        return nn.Linear(dim, vocab, bias=False)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020); the dense FFN and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, builder: LayerBuilder) -> None:
        super().__init__()
        self.gate_proj = builder.column_linear(hidden, intermediate)
        self.up_proj = builder.column_linear(hidden, intermediate)
        self.down_proj = builder.row_linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
