"""Adam's moments and step count in DeepSpeed's checkpoint files, read back per model-parallel rank by name.

DeepSpeed keeps the moments beside the fp32 master weights, laid out like them (``deepspeed_shards.py``
reads the masters; this module reads the moments the same way, so consolidation joins both alike):

    ZeRO 1/2   zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt (bf16 ZeRO-1: the ``bf16_`` file)
                 "optimizer_state_dict"["base_optimizer_state"]: the torch optimizer's state of each flat
                 fp32 partition, as torch's ``state_dict()`` ({"state": {group: {...}}, with the partition's
                 padding}) or, with ``zero_optimization.elastic_checkpoint``, a list per group without it.
                 "exp_avg" / "exp_avg_sq" run parallel to "single_partition_of_fp32_groups", so each
                 parameter's fragment ("param_slice_mappings": name -> (numel, start)) lies at the same
                 place in them as in the masters.
    ZeRO 3     zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
                 "optimizer_state_dict"["optimizer_state_dict"]["state"][i]: the moments of flat group i,
                 parallel to "fp32_flat_groups"[i]: each parameter's partition, ceil(numel / partition
                 count) elements, in the order of the model-states file's "param_shapes"[i].
    step       Adam's step count: "step" in each flat group's state (torch: a tensor; DeepSpeed's
               FusedAdam / CPU Adam: an int), else the param group's "step"; all groups step together.

Frozen parameters have no moments (they are absent from the result, as buffers are).

Not readable, refused with ``ConsolidationError``: ZeRO-0, where the engine saves torch's own
``optimizer.state_dict()`` into ``mp_rank_*_model_states.pt``: its state is keyed by the position of a
parameter in the optimizer's parameter groups, which no file of the checkpoint names (the groups depend on
the saving stage's frozen parameters, LoRA+ and MoE group splits), so a moment cannot be matched to its
parameter with certainty. An optimizer without Adam's moments (state lacking "exp_avg"/"exp_avg_sq", or a
checkpoint taken before the first optimizer step) is refused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from xoron_dist.train.deepspeed_shards import (
    ConsolidationError,
    RankGrid,
    RankState,
    _fragments,
    _joined,
    load_file,
    zero3_partitions,
    zero12_fragments,
    zero_file,
)

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class RankMoments:
    """One model-parallel rank's moments: ``states[key]`` maps its parameter names (experts under their
    global id) to functions that produce the tensor; ``step``: Adam's step count."""

    states: dict[str, RankState]
    step: int


def _group_states(base: Any, count: int, path: Path) -> list[dict[str, Any]]:
    """The optimizer state of each of ``count`` flat groups; ``ConsolidationError`` when one lacks moments."""
    if isinstance(base, dict):  # torch's state_dict: state keyed by the flat tensor's index
        state = base.get("state") or {}
        states = [state.get(i) or {} for i in range(count)]
    else:  # elastic checkpoint: one state per group
        states = [dict(s or {}) for s in base]
    if len(states) != count or any(key not in s for s in states for key in MOMENTS):
        raise ConsolidationError(f"{path}: the optimizer state holds no Adam moments ({', '.join(MOMENTS)}) for its "
                                 f"{count} flat group(s): saved before the first optimizer step, or by an optimizer "
                                 "other than Adam")
    return states


def _step(states: list[dict[str, Any]], base: Any, optim: dict[str, Any], path: Path) -> int:
    """Adam's step count of one file (the same for every group, else ``ConsolidationError``)."""
    steps = {int(s["step"]) for s in states if "step" in s}
    if not steps and isinstance(base, dict):
        steps = {int(g["step"]) for g in base.get("param_groups", []) if "step" in g}
    if not steps and "base_optimizer_state_step" in optim:
        steps = {int(optim["base_optimizer_state_step"])}
    if len(steps) != 1:
        raise ConsolidationError(f"{path}: Adam's step count is {sorted(steps) or 'missing'}, one value expected")
    return steps.pop()


def _one_step(steps: set[int], ckpt_dir: Path) -> int:
    if len(steps) != 1:
        raise ConsolidationError(f"{ckpt_dir}: the ranks' optimizer files hold different Adam step counts "
                                 f"{sorted(steps)} (files from different saves)")
    return steps.pop()


def zero12_moments(ckpt_dir: Path, mp: int, grid: RankGrid, shapes: dict[str, tuple[int, ...]],
                   local_experts: dict[str, int], bf16: bool = False) -> RankMoments:
    """ZeRO-1/2 moments of rank ``mp``: every data-parallel rank's fragments, joined in partition order
    (the fragments ``deepspeed_shards.zero12_masters`` reads, from the moments' flat groups)."""
    parts: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = {key: {} for key in MOMENTS}
    steps: set[int] = set()
    for d in range(grid.dp):
        path = ckpt_dir / zero_file(d, mp, "optim", bf16)
        optim = load_file(path)["optimizer_state_dict"]
        base = optim["base_optimizer_state"]
        states = _group_states(base, len(optim["single_partition_of_fp32_groups"]), path)
        steps.add(_step(states, base, optim, path))
        for group, name, position, start, numel in zero12_fragments(optim, d, mp, grid, local_experts):
            for key in MOMENTS:
                parts[key].setdefault(name, []).append((position, states[group][key].narrow(0, start, numel)))
    return RankMoments({key: {name: partial(_fragments, p, tuple(shapes[name]), name) for name, p in by.items()}
                        for key, by in parts.items()}, _one_step(steps, ckpt_dir))


def zero3_moments(ckpt_dir: Path, mp: int, grid: RankGrid, local_experts: dict[str, int]) -> RankMoments:
    """ZeRO-3 moments of rank ``mp``: each parameter's partitions from the ranks of its partition group,
    in partition order (the partitions ``deepspeed_shards.zero3_masters`` reads; frozen parameters have none)."""
    parts: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = {key: {} for key in MOMENTS}
    meta: dict[str, tuple[tuple[int, ...], int]] = {}  # name -> (shape, partition count)
    steps: set[int] = set()
    for d in range(grid.dp):
        path = ckpt_dir / zero_file(d, mp, "optim")
        model = load_file(ckpt_dir / zero_file(d, mp, "model"))
        optim = load_file(path)["optimizer_state_dict"]
        base = optim["optimizer_state_dict"]
        states = _group_states(base, len(optim["fp32_flat_groups"]), path)
        steps.add(_step(states, base, optim, path))
        for group, name, position, offset, size, shape, count in zero3_partitions(model, optim, d, mp, grid,
                                                                                   local_experts):
            for key in MOMENTS:
                parts[key].setdefault(name, []).append((position, states[group][key].narrow(0, offset, size)))
            meta[name] = (shape, count)
    return RankMoments({key: {name: partial(_joined, p, meta[name][0], name, meta[name][1]) for name, p in by.items()}
                        for key, by in parts.items()}, _one_step(steps, ckpt_dir))


__all__ = ["MOMENTS", "RankMoments", "zero12_moments", "zero3_moments"]
