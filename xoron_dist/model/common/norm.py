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

from xoron_dist.model.common.rope import Fp32BufferModule


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)`` over the last dim; the statistic in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim) in x's dtype times the weight's (type promotion, as before)."""
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class BatchNorm1d(Fp32BufferModule, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed in fp32 for any input dtype, its output cast back to the input's; the
    running statistics stay fp32 through a bf16/fp16 cast of the model (``Fp32BufferModule``). An engine
    that casts the parameters but not the buffers otherwise hands ``F.batch_norm`` a bf16 weight beside
    fp32 statistics, which the CPU kernel refuses; and bf16 running variances would round updates away.
    The same state dict as ``nn.BatchNorm1d``."""

    fp32_buffers = ("running_mean", "running_var")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        stats = (None, None) if self.training and not self.track_running_stats else (self.running_mean,
                                                                                     self.running_var)
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.batch_norm(x.float(), *stats, weight, bias, batch_stats, factor, self.eps).to(x.dtype)
