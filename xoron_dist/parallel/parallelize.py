"""``parallelize``: the single-rank model, transformed for this rank's place in the layout.

The model is built whole and initialised once, on every rank, from the same seed (plain code in
``xoron_dist.model``). Then, in this order:

    1. pipeline     prune to this rank's stage (its layers, the embedding on the first stage,
                    the head on the last)                                   parallel/pipeline/split.py
    2. tensor       swap the modules the components' sharding plans name for Megatron-core
                    column/row/vocabulary-parallel layers holding this rank's slice   parallel/tensor.py
    3. expert       swap the LLM's routed experts for the all-to-all EP container     parallel/experts.py
    4. sequence     swap MLA's attention core for the ring attention core           parallel/sequence.py
    5. checkpoints  recompute chosen blocks in backward                              parallel/checkpointing.py
    6. ZeRO-3       leaf modules and partition groups DeepSpeed needs                parallel/zero.py

Each step keeps parameter names, so checkpoints and the HF mapping see the single-rank names.
Groups come from ``xoron_dist.parallel.state`` (the one owner); ``parallelize`` creates none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.sharding import checkpoint_blocks, tensor_plan, zero3_leaves
from xoron_dist.parallel.checkpointing import apply_activation_checkpointing
from xoron_dist.parallel.pipeline.partition import StageCosts
from xoron_dist.parallel.pipeline.split import StageInfo, parameter_costs, split_for_pipeline

logger = logging.getLogger(__name__)


@dataclass
class Parallelized:
    """The transformed model, and its pipeline stage (None without pipeline parallelism)."""

    model: nn.Module
    stage: StageInfo | None = None


def parallelize(model: nn.Module, cfg: XoronConfig, *, pipeline_costs: StageCosts | None = None) -> Parallelized:
    """Transform the single-rank ``model`` in place for this rank (``xoron_dist.parallel.state`` must be
    initialised). ``pipeline_costs``: what balances the pipeline stages (default: parameter counts)."""
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel.calls import apply_agreed_calls
    from xoron_dist.parallel.experts import apply_expert_parallel, expert_split
    from xoron_dist.parallel.media_exchange import apply_media_rows
    from xoron_dist.parallel.sequence import SequenceSplit, apply_sequence_parallel
    from xoron_dist.parallel.state import get_context
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    p, tc = cfg.parallel, cfg.train
    stage = None
    if p.pp > 1:
        costs = _agreed_costs(pipeline_costs or parameter_costs(model), get_context().device)
        stage = split_for_pipeline(model, ps.get_pipeline_model_parallel_rank(), p.pp, costs)
        logger.info("pipeline of %d stages: %s", p.pp, stage.partition.describe())
    if p.tp > 1:
        apply_tensor_parallel(model, tensor_plan(model, cfg), ps.get_tensor_model_parallel_rank(), p.tp)
    if p.ep > 1:
        apply_expert_parallel(model, expert_split(cfg))
    if p.ep > 1 or p.zero_stage == 3:  # the same all-to-alls / ZeRO-3 gathers on every rank (parallel/calls.py)
        apply_agreed_calls(model, get_context().token_group)
    if p.sp > 1:
        split = SequenceSplit(ps.get_context_parallel_group(), ps.get_context_parallel_rank(), p.sp, p.ring_latent)
        apply_sequence_parallel(model, split)
        apply_media_rows(model, split)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model, checkpoint_blocks(), tc.activation_checkpointing_every)
    if p.zero_stage == 3:
        from xoron_dist.parallel.zero import mark_for_zero3

        mark_for_zero3(model, zero3_leaves(), get_context().token_group, p.sp)
    return Parallelized(model, stage)


def _agreed_costs(costs: StageCosts, device: torch.device) -> StageCosts:
    """``costs`` averaged over every rank, so all of them cut the same stages even from measured costs
    (which differ a little from rank to rank)."""
    values = torch.tensor([*costs.layers, costs.first, costs.last], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values = (values / dist.get_world_size()).tolist()
    return StageCosts(tuple(values[:-2]), values[-2], values[-1])


__all__ = ["Parallelized", "parallelize"]
