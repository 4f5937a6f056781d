"""Modules whose number of calls depends on the data agree on it across the ranks that share a step.

A generator runs its autoencoder once per item and its flow network once per target, so two ranks with
different micro-batches make different numbers of calls. Under expert parallelism each flow-network call
runs the DiT experts' all-to-alls, which every EP rank must run equally often, or one rank's exchange
meets another's (a gloo size mismatch in the first backward). Such a module holds ``agree_calls(counts,
device) -> counts``, its own counts in the plain model (``xoron_dist.model.generation.heads``);
``parallelize`` gives it an ``AgreedCallCount`` over the ranks that hold distinct tokens of the step (data
x sequence parallel, which contains every expert-parallel group), and the module pads its calls with idle
ones, times zero, up to the agreed counts, grouped by kind in a fixed order (all autoencoder calls, then
all flow calls) and shaped like real calls (an idle request is still in the LLM's graph).

ZeRO-3 needs the same (a weight gather per call, in the same order on every rank), so ``parallelize`` gives
the count under ZeRO-3 too; there the MoE blocks inside such a module are gathered per call rather than as
one unit (``xoron_dist.parallel.zero``), since DeepSpeed reduces a unit's gradients once per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.utils.host_syncs import upload


class AgreedCallCount:
    """Per kind of call, the most any rank of ``group`` makes (one all-reduce of a few integers)."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, counts: list[int], device: torch.device) -> list[int]:
        agreed = upload(counts, dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        return agreed.tolist()


def apply_agreed_calls(model: nn.Module, group) -> int:
    """Give every module of ``model`` that makes a data-dependent number of calls (it has ``agree_calls``)
    the count agreed over ``group``; returns how many."""
    modules = [module for module in model.modules() if hasattr(module, "agree_calls")]
    for module in modules:
        module.agree_calls = AgreedCallCount(group)
    return len(modules)


__all__ = ["AgreedCallCount", "apply_agreed_calls"]
