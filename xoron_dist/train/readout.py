"""The end of an optimizer step: what the step left on the device, agreed by the ranks and read on the host once.

After the micro-batches and DeepSpeed's optimizer step the trainer needs on the host: each objective's
mean loss and item count, the gradient norm, every rank's agreement on stopping and on the numerics
guard's verdict (``guard.py``), and the MoE load it monitors (with the router biases on a TensorBoard
step), and the codebooks' dead codes to restart. Each of them was its own read, four syncs a step and
one per codebook. Here the guard's flags are made on the device and all-reduced with the stop request in
one collective, the expert biases and the codebooks' usage averages move on the device (not when the step
was skipped: the ``applied`` flag of ``ExpertBalancer.apply`` and ``CodebookKeeper.usage``), and
everything is read together (``read_together``): one sync per step for the trainer's bookkeeping. The
dead codes are restarted after the read (``CodebookKeeper.restart``).

The order of the collectives is the same on every rank: the flags over the world, then the loads and
the codebook counts over the token group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from xoron_dist.train.codebooks import CodebookKeeper
from xoron_dist.train.expert_balance import ExpertBalancer
from xoron_dist.train.guard import NumericsGuard
from xoron_dist.train.step import StepResult, StepSums
from xoron_dist.utils.host_syncs import read_together, upload


@dataclass
class StepReadout:
    """One optimizer step as the host sees it; every rank reads the same."""

    result: StepResult
    grad_norm: float | None
    stop: bool  # a rank was asked to stop (a signal): all stop after this step
    skipped: bool  # the step's update was not applied (non-finite loss or gradients, on any rank)
    spike: bool  # the LLM loss spiked (``train.loss_spike_factor``)
    load: list[list[float]] | None  # the LLM's MoE load (its layers here, experts); None for a skipped step
    biases: list[list[float]] | None  # the LLM routers' biases after the update, when asked for
    restarted: int  # codebook codes re-seeded after this step


def read_step(sums: StepSums, *, engine, guard: NumericsGuard, balancer: ExpertBalancer, codebooks: CodebookKeeper,
              ctx, stop_requested: bool, engine_skipped: bool, bias_update: bool, rates: dict[str, float],
              num_experts: int, with_biases: bool) -> StepReadout:
    """Agree on the step across the ranks, move the expert biases and the codebook usage (not on a skipped
    step), read the host once, and restart the dead codes. ``engine_skipped``: DeepSpeed skipped its update
    on this rank; ``bias_update``/``rates``: the stage's expert-bias update (``ExpertBalancer.apply``);
    ``with_biases``: read the LLM routers' biases too (a TensorBoard step)."""
    norm = engine.get_global_grad_norm()
    norm = norm.detach().float().to(ctx.device) if torch.is_tensor(norm) else norm
    verdict = guard.local_flags(sums.means(), norm, engine_skipped)
    flags = torch.cat([upload([float(stop_requested)], device=ctx.device), verdict.to(ctx.device)])
    dist.all_reduce(flags)  # any rank's stop, non-finite or spike is every rank's
    loaded = balancer.reduce(ctx.token_group)
    applied = (flags[1] == 0).float()
    balancer.apply(loaded, enabled=bias_update, rates=rates, applied=applied)
    dead = codebooks.usage(ctx.token_group, applied)
    load = loaded.get("llm", torch.zeros(0, num_experts, device=ctx.device))  # (MoE layers here, experts)
    biases = balancer.biases()
    read = read_together({
        "sums": sums.sums, "counts": sums.counts, "grad_norm": norm, "flags": flags, "load": load,
        "biases": torch.stack(biases) if with_biases and biases else [] if with_biases else None,
        "dead": [None if mask is None else mask.float() for mask in dead],
    })
    restarted = codebooks.restart([None if mask is None else [i for i, v in enumerate(mask) if v]
                                   for mask in read["dead"]], ctx.token_group)
    stop, skipped, spike = (value > 0 for value in read["flags"])
    grad_norm = read["grad_norm"]
    return StepReadout(sums.result(read["sums"], read["counts"]),
                       None if grad_norm is None else float(grad_norm), stop, skipped, spike,
                       None if skipped else read["load"], read["biases"], restarted)


__all__ = ["StepReadout", "read_step"]
