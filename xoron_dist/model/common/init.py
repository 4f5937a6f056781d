"""Weight initialisation: one walk over a module tree, in module order, for every component.

Layers are made *uninitialised* (``empty_linear``/``empty_embedding``: storage, no random draw),
and each component's ``reset_parameters`` draws every weight itself through ``init_weights_``. So
the random stream, and with it every weight, is a function of the seed and the module order only.
The model is always built whole, on one rank, and initialised once; parallelism
(``xoron_dist.parallel.parallelize``) then cuts each rank's slice out of these full weights, so any
layout starts from exactly the single-rank weights.

The walk (``init_weights_``), per module in ``module.modules()`` order, except the ``skip`` types:

    RMSNorm, LayerNorm        weight 1 (LayerNorm bias 0)
    a module with ``init_weights(std)`` (the MoE router: gate ~ N(0, std), expert bias 0; the
                              routed experts: gate_up, then down ~ N(0, std)) initialises itself
    any other leaf with a ``weight`` parameter (Linear, Embedding, LMHead)
                              weight ~ N(0, std); a bias 0
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from xoron_dist.model.common.norm import RMSNorm


def empty_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """``nn.Linear`` with storage but no initial draw (see the module docstring), on the default device."""
    return skip_init(nn.Linear, in_features, out_features, bias=bias, device=torch.get_default_device())


def empty_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    return skip_init(nn.Embedding, num_embeddings, dim, device=torch.get_default_device())


@torch.no_grad()
def init_weights_(module: nn.Module, std: float, *, skip: tuple[type, ...] = ()) -> None:
    """Initialise every weight under ``module`` in module order (see the module docstring)."""
    for sub in module.modules():
        if isinstance(sub, skip):
            continue
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif hasattr(sub, "init_weights"):
            sub.init_weights(std)
        elif not list(sub.children()) and isinstance(getattr(sub, "weight", None), nn.Parameter):
            nn.init.normal_(sub.weight, std=std)
            if isinstance(getattr(sub, "bias", None), nn.Parameter):
                nn.init.zeros_(sub.bias)
