"""Dead-code restarts of every vector quantiser of a model, after each optimizer step, in one place.

``CodebookKeeper(model)`` finds every ``CosineQuantizer`` (TiTok's, the audio codec's residual
stages). ``update(group)``: for each quantiser that ran a training forward since the last update,
the counts of the ids it picked are summed over ``group`` (the data-parallel ranks: their batches
differ), the usage averages move, and the codes that fell below the dead share are re-seeded with
latents rank 0 of the group drew from its batch and broadcast, so every replica keeps one codebook
(``xoron_dist.model.common.quantize``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.model.common.quantize import CosineQuantizer


class CodebookKeeper:
    def __init__(self, model: nn.Module) -> None:
        self.quantizers = [m for m in model.modules() if isinstance(m, CosineQuantizer)]

    def update(self, group: dist.ProcessGroup | None = None) -> int:
        """Restart dead codes from the forwards since the last call; returns how many codes restarted."""
        distributed = group is not None and dist.is_initialized()
        restarted = 0
        for quantizer in self.quantizers:
            if quantizer.pending is None:
                continue
            counts = quantizer.counts()
            if distributed:
                dist.all_reduce(counts, group=group)
            restarted += quantizer.apply_usage(counts, lambda n, q=quantizer: _agreed(q.pick_latents(n), group))
        return restarted


def _agreed(latents: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rank 0's ``latents`` on every rank of ``group``."""
    if group is not None and dist.is_initialized():
        latents = latents.contiguous()
        dist.broadcast(latents, src=dist.get_global_rank(group, 0), group=group)
    return latents


__all__ = ["CodebookKeeper"]
