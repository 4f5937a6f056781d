"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 like DeepSeek/HF.

The normalisation is torch's ``F.rms_norm`` without a weight: one fused kernel pair on CUDA (forward and
backward), the same composite ops as ``x * rsqrt(mean(x²) + eps)`` on CPU, and the statistic in fp32
for half-precision inputs on both. The weight multiplies afterwards, on the result cast back to the
input's dtype, as HF's ``DeepseekV3RMSNorm`` does: so bf16 outputs round where HF's round, and outputs
equal the composite formula's bit for bit (``tests/model/test_norm.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)`` over the last dim; the statistic in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim) in x's dtype times the weight's (type promotion, as before)."""
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
