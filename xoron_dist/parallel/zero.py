"""What DeepSpeed's ZeRO needs to know about our layouts before ``deepspeed.initialize``, in one place.

* ``mark_for_zero3(model, leaf_types, token_group, sp)`` (ZeRO-3 only):
  - ZeRO-3 partitions a parameter over the group DeepSpeed gets from ``mpu.get_data_parallel_group()``
    (data parallel *without* the sequence ranks, which DeepSpeed also uses to size the global batch)
    and then reduces its gradient over that same group only. With ring attention the sequence ranks
    hold different tokens of the same samples, so their gradients must be summed too: every dense
    parameter is given the data x sequence group as its partition group (DeepSpeed's
    ``ds_zero_partition_process_group``; expert parameters already carry their expert-data-parallel
    group, ``parallel.experts``).
  - ZeRO-3 gathers an MoE block's weights as one unit (``set_z3_leaf_module``): which experts run
    varies per step and would break its prefetch trace. Not inside a module that runs several times per
    micro-batch (a generator's DiT): a leaf's gradients are reduced once per call (``_leaves``).
  - ZeRO-3 gathers a module's weights around that module's own calls. The ring attention core with
    the MLA latent uses ``kv_up``'s weight directly (every rank expands the blocks it receives), so
    that weight is registered as an external parameter of the attention module that calls the core.
* ``generators_gathered(model)``: the generators' weights whole on every rank while samples are made.
* ``gradient_divisor(layout)``: the number DeepSpeed divides the summed gradients by, which the
  trainer's loss scale cancels (``scale = divisor * accum / global tokens``, so the gradient is that
  of the token mean over the whole step). ZeRO 0-2 divide by the data-parallel size (they divide the
  sequence ranks back out); ZeRO-3 by the size of the partition group, data x sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from xoron_dist.parallel.layout import Layout


@contextmanager
def generators_gathered(model: nn.Module) -> Iterator[None]:
    """Every rank holds the generators' whole weights inside (under ZeRO-3; a no-op otherwise): generation
    reads some of them outside a forward (a DiT's null condition when it starts a video's KV cache, the
    duration predictor's length scale), where ZeRO-3's hooks would leave them partitioned. Enter it once per
    generated sample: ZeRO-3's hooks partition the weights again during a generation, so a second sample in
    the same context reads empty weights (seen with two speech samples). A collective: every rank of the
    data-parallel group enters it, as every rank generates the training samples (``train.samples``)."""
    from xoron_dist.model.modalities import MODALITIES

    heads = [getattr(model, row.generator, None) for row in MODALITIES if row.generator]
    params = [p for head in heads if head is not None for p in head.parameters()]
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gradient_divisor(layout: Layout) -> int:
    """What DeepSpeed divides the gradients summed over the data x sequence ranks by (see module doc)."""
    return layout.dp * layout.sp if layout.zero_stage == 3 else layout.dp


def _leaves(model: nn.Module, leaf_types: tuple[type, ...]) -> list[nn.Module]:
    """The modules of ``leaf_types`` ZeRO-3 gathers whole, except those inside a module that runs several times
    per micro-batch (it has ``agree_calls``: a generator's DiT, once per target), which are gathered per call
    like any module: DeepSpeed reduces a leaf's gradients from the leaf's backward hook, once per call, so a
    second call would put the same parameters in a reduce bucket again (it asserts at the default bucket
    size). Every call runs every expert's weights (local experts: one stacked tensor; spread ones: each local
    expert's module is called on every rank, with no rows too), so the prefetch trace holds."""
    repeated = {id(m) for owner in model.modules() if hasattr(owner, "agree_calls") for m in owner.modules()}
    return [m for m in model.modules() if isinstance(m, leaf_types) and id(m) not in repeated]


def mark_for_zero3(model: nn.Module, leaf_types: tuple[type, ...], token_group, sp: int) -> None:
    """ZeRO-3 leaf modules and, with sequence parallelism, the dense parameters' partition group."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_module

    from xoron_dist.parallel.sequence import RingAttentionCore

    for leaf in _leaves(model, leaf_types):
        set_z3_leaf_module(leaf, True)
    for module in model.modules():
        core = getattr(module, "core", None)
        if isinstance(core, RingAttentionCore) and core.split.latent:
            register_external_parameter(module, module.kv_up.weight)
    if sp > 1:
        for param in model.parameters():
            if not hasattr(param, "ds_zero_partition_process_group"):
                param.ds_zero_partition_process_group = token_group


__all__ = ["gradient_divisor", "mark_for_zero3"]
