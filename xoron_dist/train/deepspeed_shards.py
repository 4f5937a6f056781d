"""DeepSpeed's checkpoint files of one run, read back per model-parallel rank, on one process.

What a checkpoint tag holds (``xoron_dist/train/checkpoint.py`` saves through DeepSpeed), with
``m`` the model-parallel rank (``pp_rank * tp + tp_rank``) and ``d`` the data-parallel rank:

    ZeRO 0-2   mp_rank_{m}_model_states.pt           "module": rank m's weights and buffers (experts apart)
    ZeRO 1/2   zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt
                   fp32 master weights: rank d's slice of each flat parameter group, and where each
                   parameter's fragment lies in it ("param_slice_mappings": name -> (numel, start))
    ZeRO 3     zero_pp_rank_{d}_mp_rank_{m}_model_states.pt   buffers, parameter names and shapes per group
               zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt   "fp32_flat_groups": rank d's partition of every
                   parameter of each group, ceil(numel / partition count) elements each, in group order;
                   "ds_zero_partition_groups": each group's partition ranks (experts: their replicas only)
    EP, ZeRO 0-2   layer_{L}_expert_{e}_mp_rank_{m}_model_states.pt   expert e of the L-th MoE layer

Expert-parallel parameters carry DeepSpeed's names,
``<moe>.experts.deepspeed_moe.experts.deepspeed_experts.<i>.{gate_up,down}`` (and, with LoRA on the
routed experts, ``<i>.{gate_up,down}_lora.{A,B}``, stacked back the same way): ``i`` is the global
expert id in the expert files and the local one (expert ``ep_rank * local + i``) in the optimizer
files and parameter shapes. Everything read here comes out under the global id.

A ``RankState`` maps the names of one model-parallel rank's (parallelized) model to functions that
produce the tensor: the files are memory-mapped, so nothing is copied until a tensor is asked for,
and consolidation holds one full tensor at a time besides its output.

Why not ``deepspeed.utils.zero_to_fp32``: it reads one model-parallel rank without expert
parallelism (it joins every file of a group in data-parallel order, which for experts partitioned
over their expert-data-parallel replicas would splice different experts together), loads with
``weights_only=False``, and reads ZeRO-1/2 masters by offsets rather than by their recorded fragments.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from xoron_dist.train.checkpoint_integrity import UnsafePickleError, tensors_only_unpickling

Piece = Callable[[], torch.Tensor]
RankState = dict[str, Piece]

# an expert's weights and, with LoRA on the routed experts, their adapters' factors (model/lora.py)
_EP_NAME = re.compile(r"^(?P<moe>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\."
                      r"(?P<leaf>gate_up|down|(?:gate_up|down)_lora\.[AB])$")
# What torch.load raises on a damaged file (the manifest's sha256 normally catches it first).
_LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError)


class ConsolidationError(ValueError):
    """A checkpoint cannot be consolidated; the message names the path and what is wrong."""


@dataclass(frozen=True)
class RankGrid:
    """Where every global rank of a layout sits: model-parallel rank (tp x pp), data-parallel rank,
    expert-parallel and expert-data-parallel rank, in Megatron-core's rank order (``tp-cp-ep-dp-pp``,
    as ``xoron_dist.parallel.state`` creates the groups)."""

    tp: int
    pp: int
    sp: int
    ep: int
    world: int
    _of: dict[str, dict[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            from megatron.core.parallel_state import RankGenerator

        order = "tp-cp-ep-dp-pp"
        dense = RankGenerator(tp=self.tp, ep=1, dp=self.dp, pp=self.pp, cp=self.sp, order=order)
        experts = RankGenerator(tp=self.tp, ep=self.ep, dp=self.world // (self.tp * self.ep * self.pp),
                                pp=self.pp, cp=1, order=order)
        for key, groups in (("mp", dense.get_ranks("tp-pp")), ("dp", dense.get_ranks("dp")),
                            ("ep", experts.get_ranks("ep")), ("edp", experts.get_ranks("dp"))):
            self._of[key] = {rank: i for group in groups for i, rank in enumerate(sorted(group))}

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.sp)

    def rank_of(self, mp: int, dp: int) -> int:
        """The global rank with model-parallel rank ``mp`` and data-parallel rank ``dp`` (sp = 1)."""
        return next(r for r in range(self.world) if self._of["mp"][r] == mp and self._of["dp"][r] == dp)

    def ep_rank(self, rank: int) -> int:
        return self._of["ep"][rank]

    def edp_rank(self, rank: int) -> int:
        return self._of["edp"][rank]


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file, memory-mapped, unpickling only tensors and allow-listed types
    (``checkpoint_integrity.tensors_only_unpickling``)."""
    try:
        with tensors_only_unpickling():
            return torch.load(path, map_location="cpu", mmap=True)
    except UnsafePickleError as err:
        raise ConsolidationError(str(err)) from None
    except _LOAD_ERRORS as err:
        raise ConsolidationError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def require_files(ckpt_dir: Path, names: list[str], layout: str) -> None:
    """Every file of ``names`` exists, else one error naming the missing ones."""
    missing = [name for name in names if not (ckpt_dir / name).is_file()]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ConsolidationError(f"checkpoint {ckpt_dir} lacks {len(missing)} file(s) that {layout} writes: {shown}")


def model_file(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


def zero_file(dp: int, mp: int, kind: str, bf16: bool = False) -> str:
    """``kind``: "model" (ZeRO-3 model states) or "optim"; ``bf16``: DeepSpeed's BF16_Optimizer (ZeRO-1
    with bf16) writes its optimizer files under a ``bf16_`` prefix, same contents as ZeRO-1/2's."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_{kind}_states.pt"


def global_expert_name(name: str, ep_rank: int, local_experts: dict[str, int]) -> str:
    """DeepSpeed's local expert name on EP rank ``ep_rank`` -> the same name with the global expert id."""
    match = _EP_NAME.match(name)
    if match is None:
        return name
    first = ep_rank * local_experts[match["moe"]]
    return f"{match['moe']}.deepspeed_moe.experts.deepspeed_experts.{first + int(match['id'])}.{match['leaf']}"


def is_expert_name(name: str) -> bool:
    return _EP_NAME.match(name) is not None


def stack_experts(state: RankState, num_experts: dict[str, int]) -> RankState:
    """``state`` with every EP expert's tensors folded into the plain model's stacked
    ``<moe>.gate_up`` (experts, 2·ffn, hidden) and ``<moe>.down`` (experts, hidden, ffn); ``num_experts``:
    the plain model's routed-expert container names -> expert count."""
    out: RankState = {}
    grouped: dict[tuple[str, str], dict[int, Piece]] = {}
    for name, piece in state.items():
        match = _EP_NAME.match(name)
        if match is None:
            out[name] = piece
        else:
            grouped.setdefault((match["moe"], match["leaf"]), {})[int(match["id"])] = piece
    for (moe, leaf), pieces in grouped.items():
        missing = sorted(set(range(num_experts.get(moe, 0))) - set(pieces))
        if moe not in num_experts or missing:
            raise ConsolidationError(f"the checkpoint's experts of {moe} do not fit the model: "
                                     f"{len(pieces)} found, missing ids {missing[:8]} of {num_experts.get(moe)}")
        out[f"{moe}.{leaf}"] = partial(_stacked, [pieces[e] for e in range(len(pieces))])
    return out


def _stacked(pieces: list[Piece]) -> torch.Tensor:
    return torch.stack([piece() for piece in pieces])


def _joined(parts: list[tuple[int, torch.Tensor]], shape: tuple[int, ...], name: str, count: int) -> torch.Tensor:
    """The partitions of one parameter (position in its partition group, flat slice) -> the tensor."""
    positions = sorted(position for position, _ in parts)
    if positions != list(range(count)):
        raise ConsolidationError(f"{name}: partitions {positions} found, 0..{count - 1} expected "
                                 "(a rank's optimizer file is missing or from another save)")
    flat = torch.cat([part for _, part in sorted(parts, key=lambda item: item[0])])
    return flat[: math.prod(shape)].view(shape)


def _fragments(parts: list[tuple[int, torch.Tensor]], shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A ZeRO-1/2 parameter from its fragments (position in its partition group, slice): a parameter lies
    in one or more consecutive partitions, so the fragments in partition order are the whole of it."""
    flat = torch.cat([part for _, part in sorted(parts, key=lambda item: item[0])])
    if flat.numel() != math.prod(shape):
        raise ConsolidationError(f"{name}: its fragments hold {flat.numel()} of {math.prod(shape)} elements "
                                 "(a rank's optimizer file is missing or from another save)")
    return flat.view(shape)


def module_state(ckpt_dir: Path, mp: int, zero_stage: int) -> RankState:
    """Rank ``mp``'s module tensors as saved: weights and buffers (ZeRO 0-2; EP experts from their
    own files), or only the buffers (ZeRO-3, whose module entries are empty partitions)."""
    if zero_stage == 3:
        saved = load_file(ckpt_dir / zero_file(0, mp, "model"))
        buffers = set(saved.get("buffer_names", ()))
        return {name: partial(_same, t) for name, t in saved["module"].items() if name in buffers}
    state = {name: partial(_same, t) for name, t in load_file(ckpt_dir / model_file(mp))["module"].items()}
    for path in sorted(ckpt_dir.glob(f"layer_*_expert_*_mp_rank_{mp:02d}_model_states.pt")):
        state.update({name: partial(_same, t) for name, t in load_file(path).items()})
    return state


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def zero12_fragments(optim: dict[str, Any], d: int, mp: int, grid: RankGrid,
                     local_experts: dict[str, int]) -> Iterator[tuple[int, str, int, int, int]]:
    """Where one ZeRO-1/2 optimizer file (data-parallel rank ``d`` of model-parallel rank ``mp``) keeps each
    parameter's fragment: (flat group index, global name, partition position, start, numel). Dense
    parameters are partitioned over the data-parallel ranks, experts over their replicas."""
    rank = grid.rank_of(mp, d)
    for group, mapping in enumerate(optim["param_slice_mappings"]):
        for local, fragment in mapping.items():
            expert = is_expert_name(local)
            name = global_expert_name(local, grid.ep_rank(rank), local_experts) if expert else local
            yield group, name, grid.edp_rank(rank) if expert else d, fragment.start, fragment.numel


Partition = tuple[int, str, int, int, int, tuple[int, ...], int]  # see zero3_partitions


def zero3_partitions(model: dict[str, Any], optim: dict[str, Any], d: int, mp: int, grid: RankGrid,
                     local_experts: dict[str, int]) -> Iterator[Partition]:
    """Where one ZeRO-3 optimizer file (data-parallel rank ``d`` of model-parallel rank ``mp``) keeps each
    trained parameter's partition: (flat group index, global name, partition rank, offset, size, the
    parameter's shape, partition count)."""
    rank = grid.rank_of(mp, d)
    groups = optim.get("ds_zero_partition_groups") or [
        {"partition_count": optim["partition_count"], "partition_rank": d} for _ in model["param_shapes"]]
    for index, (shapes, group) in enumerate(zip(model["param_shapes"], groups, strict=True)):
        offset, count = 0, group["partition_count"]
        for local, shape in shapes.items():
            size = math.ceil(math.prod(shape) / count)
            name = global_expert_name(local, grid.ep_rank(rank), local_experts)
            yield index, name, group["partition_rank"], offset, size, tuple(shape), count
            offset += size


def zero12_masters(ckpt_dir: Path, mp: int, grid: RankGrid, shapes: dict[str, tuple[int, ...]],
                   local_experts: dict[str, int], bf16: bool = False) -> RankState:
    """ZeRO-1/2 fp32 master weights of rank ``mp``: every data-parallel rank's fragments, joined in
    partition order (``zero12_fragments``)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for d in range(grid.dp):
        optim = load_file(ckpt_dir / zero_file(d, mp, "optim", bf16))["optimizer_state_dict"]
        flats = optim["single_partition_of_fp32_groups"]
        for group, name, position, start, numel in zero12_fragments(optim, d, mp, grid, local_experts):
            parts.setdefault(name, []).append((position, flats[group].narrow(0, start, numel)))
    return {name: partial(_fragments, p, tuple(shapes[name]), name) for name, p in parts.items()}


def zero3_masters(ckpt_dir: Path, mp: int, grid: RankGrid, local_experts: dict[str, int]) -> RankState:
    """ZeRO-3 fp32 master weights (and frozen weights) of rank ``mp``: each parameter's partitions from
    the ranks of its partition group, in partition order (``zero3_partitions``)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    meta: dict[str, tuple[tuple[int, ...], int]] = {}  # name -> (shape, partition count)
    for d in range(grid.dp):
        model = load_file(ckpt_dir / zero_file(d, mp, "model"))
        optim = load_file(ckpt_dir / zero_file(d, mp, "optim"))["optimizer_state_dict"]
        rank = grid.rank_of(mp, d)
        flats = optim["fp32_flat_groups"]
        groups = optim.get("ds_zero_partition_groups") or flats  # without the groups' list: one per flat group
        if not len(model["param_shapes"]) == len(flats) == len(groups):
            raise ConsolidationError(f"{ckpt_dir / zero_file(d, mp, 'optim')}: {len(flats)} "
                                     f"flat groups for {len(model['param_shapes'])} parameter groups")
        for group, name, position, offset, size, shape, count in zero3_partitions(model, optim, d, mp, grid,
                                                                                   local_experts):
            parts.setdefault(name, []).append((position, flats[group].narrow(0, offset, size)))
            meta[name] = (shape, count)
        for local, fragment in (model.get("frozen_param_fragments") or {}).items():
            expert = is_expert_name(local)
            name = global_expert_name(local, grid.ep_rank(rank), local_experts)
            parts.setdefault(name, []).append((grid.edp_rank(rank) if expert else d, fragment.flatten()))
            count = grid.world // (grid.tp * grid.ep * grid.pp) if expert else grid.dp
            meta[name] = (tuple(model["frozen_param_shapes"][local]), count)
    return {name: partial(_joined, p, meta[name][0], name, meta[name][1]) for name, p in parts.items()}


__all__ = ["ConsolidationError", "Piece", "RankGrid", "RankState", "is_expert_name", "load_file", "model_file",
           "module_state", "require_files", "stack_experts", "zero12_fragments", "zero12_masters", "zero3_masters",
           "zero3_partitions", "zero_file"]
