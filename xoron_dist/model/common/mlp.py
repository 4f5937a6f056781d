"""SwiGLU feed-forward (Shazeer 2020): the dense FFN of the LLM, its shared experts, the projector's
and the fusion layers' FFNs. Tensor parallelism splits gate/up by columns and down by rows
(``SWIGLU_PLAN`` in ``xoron_dist.model.common.sharding``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.common.init import empty_linear


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = empty_linear(hidden, intermediate)
        self.up_proj = empty_linear(hidden, intermediate)
        self.down_proj = empty_linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
