"""What DeepSpeed's engine needs to know about our layouts before ``deepspeed.initialize``, in one place.

* ``prepare_for_deepspeed(model, cfg, ctx)``:
  - ZeRO-3 partitions a parameter over the group DeepSpeed gets from ``mpu.get_data_parallel_group()``
    (data parallel *without* the sequence ranks, which DeepSpeed also uses to size the global batch)
    and then reduces its gradient over that same group only. With ring attention the sequence ranks
    hold different tokens of the same samples, so their gradients must be summed too: every dense
    parameter is given the data x sequence group as its partition group (DeepSpeed's
    ``ds_zero_partition_process_group``; expert parameters already carry their expert-data-parallel
    group, ``parallel.experts``).
  - ZeRO-3 gathers an MoE block's weights as one unit (``set_z3_leaf_modules``): which experts run
    varies per step and would break its prefetch trace.
* ``gradient_divisor(layout)``: the number DeepSpeed divides the summed gradients by, which the
  trainer's loss scale cancels (``scale = divisor * accum / global tokens``, so the gradient is that
  of the token mean over the whole step). ZeRO 0-2 divide by the data-parallel size (they divide the
  sequence ranks back out); ZeRO-3 by the size of the partition group, data x sequence.

    prepare_for_deepspeed(model, cfg, ctx)
    engine, *_ = deepspeed.initialize(model=model, ..., mpu=state.mpu())
"""

from __future__ import annotations

from torch import nn

from xoron_dist.parallel.layout import Layout


def gradient_divisor(layout: Layout) -> int:
    """What DeepSpeed divides the gradients summed over the data x sequence ranks by (see module doc)."""
    return layout.dp * layout.sp if layout.zero_stage == 3 else layout.dp


def prepare_for_deepspeed(model: nn.Module, cfg, ctx) -> None:
    """Mark ``model`` for the run's ZeRO stage and layout (``cfg``: XoronConfig, ``ctx``: ParallelContext)."""
    if cfg.parallel.zero_stage != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules

    from xoron_dist.model.moe import MoEFeedForward

    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        set_z3_leaf_modules(model, [MoEFeedForward])
    if ctx.layout.sp > 1:
        for param in model.parameters():
            if not hasattr(param, "ds_zero_partition_process_group"):
                param.ds_zero_partition_process_group = ctx.token_group


__all__ = ["gradient_divisor", "prepare_for_deepspeed"]
