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
        """Restart dead codes from the forwards since the last call; returns how many codes restarted. The
        two halves with a read of the dead codes between them (the trainer's step reads them with its other
        values: ``train/readout.py``)."""
        dead = self.usage(group)
        return self.restart([None if d is None else d.nonzero().flatten().tolist() for d in dead], group)

    def usage(self, group: dist.ProcessGroup | None = None, applied: torch.Tensor | None = None
              ) -> list[torch.Tensor | None]:
        """For each quantiser, its dead codes (a (size,) bool device mask) after its usage average took the
        counts of its last training forward, summed over ``group``; None for one that did not run. Reads
        nothing. ``applied``: the step's 0/1 device flag (a skipped step moves no average and finds no dead
        code: ``CosineQuantizer.update_usage``)."""
        distributed = group is not None and dist.is_initialized()
        dead: list[torch.Tensor | None] = []
        for quantizer in self.quantizers:
            if quantizer.pending is None:
                dead.append(None)
                continue
            counts = quantizer.counts()
            if distributed:
                dist.all_reduce(counts, group=group)
            dead.append(quantizer.update_usage(counts, applied))
        return dead

    def restart(self, dead: list[list[int] | None], group: dist.ProcessGroup | None = None) -> int:
        """Re-seed each quantiser's ``dead`` codes (indices read on the host; the same on every rank) with
        rank 0's latents; returns how many codes restarted."""
        restarted = 0
        for quantizer, rows in zip(self.quantizers, dead, strict=True):
            if rows is not None:
                restarted += quantizer.restart(rows, lambda n, q=quantizer: _agreed(q.pick_latents(n), group),
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
