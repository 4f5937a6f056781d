"""Dead-code restarts of every vector quantiser of a model, after each optimizer step, in one place.

``CodebookKeeper(model)`` finds every ``CosineQuantizer`` (TiTok's, the audio codec's residual
stages). ``update(group)``: for each quantiser that ran a training forward since the last update,
the counts of the ids it picked are summed over ``group`` (the data-parallel ranks: their batches
differ), the usage averages move, and the codes that fell below the dead share are re-seeded with
latents rank 0 of the group drew from its batch and broadcast, so every replica keeps one codebook
(``xoron_dist.model.common.quantize``).

Under ZeRO the restarted rows are written twice: into the module's weight (ZeRO-3 gathers the
partitioned weight around the write) and into the optimizer's fp32 copy, from which ZeRO rewrites the
module's weight at the next step (a write to the module's weight alone would last one forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
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
            restarted += quantizer.apply_usage(counts, lambda n, q=quantizer: _agreed(q.pick_latents(n), group),
                                               _row_writer(quantizer.codebook.weight))
        return restarted


def _row_writer(param: nn.Parameter) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``write(rows, values)`` for ``param``: the module's weight and, under ZeRO, the optimizer's fp32 copy
    (see the module docstring). Every rank of the group calls it with the same rows and values."""
    def write(rows: torch.Tensor, values: torch.Tensor) -> None:
        if hasattr(param, "ds_id"):  # ZeRO-3: partitioned outside the module's forward
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data[rows] = values
        else:
            param.data[rows] = values
        master = safe_get_full_fp32_param(param) if param.requires_grad else None  # None without ZeRO
        if master is not None:
            master[rows] = values.to(master.dtype)
            safe_set_full_fp32_param(param, master)
    return write


def _agreed(latents: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rank 0's ``latents`` on every rank of ``group``."""
    if group is not None and dist.is_initialized():
        latents = latents.contiguous()
        dist.broadcast(latents, src=dist.get_global_rank(group, 0), group=group)
    return latents


__all__ = ["CodebookKeeper"]
