"""Tensor parallelism: the single-rank model's layers swapped for ones split over the TP group.

``apply_tensor_parallel(model, plan, rank, size)`` walks the component sharding plans
(``xoron_dist.model.sharding``; vocabulary in ``xoron_dist.model.common.sharding``) and replaces
each matched module by its tensor-parallel counterpart, holding this rank's slice of the module's
full weight; the model's code does not change, and every TP size starts from exactly the
single-rank weights. The layers are built from Megatron-core's ``tensor_parallel`` primitives
(``VocabParallelEmbedding``, ``vocab_parallel_cross_entropy``, the gather of logits) and two
conjugate communication functions of ours, ``copy_to`` (identity forward, all-reduce of the
gradient backward) and ``reduce_from`` (all-reduce forward, identity backward) over Megatron's TP
group. Ours because Megatron's (``mappings._reduce``) all-reduces ``input_.contiguous()`` and
returns ``input_``: a strided tensor, such as the gradient einsum's backward hands a ``copy_to``,
is reduced in a copy that is thrown away, and the sum over the ranks silently lost.

    colwise          weight (out/tp, in), bias split    y_local = copy_to(x) W_localᵀ + b_local
    rowwise          weight (out, in/tp), bias whole    y = reduce_from(x_local W_localᵀ) + b
    vocab_embedding  rows split (padded to a multiple of pad_vocab_multiple·tp), Megatron's layer
    vocab_head       an LM head over this rank's rows; the loss is Megatron's vocab-parallel CE
    experts          every routed expert's FFN dim split (gate/up rows, down columns)
    enter / leave    copy_to / reduce_from modules in place of the model's identity seams
    (LoRA adapter)   split like the layer it adapts, by the rule the adapter carries (``_split_adapters``)

Every split parameter carries Megatron's ``tensor_model_parallel``/``partition_dim``/
``partition_stride`` attributes, which DeepSpeed reads to count it once per TP group in the
gradient norm. A swapped module keeps its parameter names and their order (optimizer states and
checkpoints are laid out in that order), and weights shared between modules (tied embeddings)
are shared again after the swap.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.common.moe import RoutedExperts
from xoron_dist.model.common.sharding import TensorPlan, TensorSplit, match_plan
from xoron_dist.model.llm.head import LMHead
from xoron_dist.model.lora import attach_linear_lora

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (
        VocabParallelEmbedding,
        gather_from_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the tensor-parallel group (a new contiguous tensor; ``x`` is untouched)."""
    group = parallel_state.get_tensor_model_parallel_group()
    x = x.contiguous().clone() if x.is_contiguous() else x.contiguous()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; the gradient summed over the TP ranks backward (inverse of ``_ReduceFromRegion``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    """Partial results summed over the TP ranks forward; the gradient passed through backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x)


class TensorSplitError(ValueError):
    """A module the sharding plan splits does not divide over the tensor-parallel ranks."""


def mark_tp_split(param: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """Record that ``param`` is this rank's slice of a tensor split over tensor-parallel ranks.

    ``dim``: the split dimension; ``stride``: how many equal blocks the full dimension holds that
    are split separately (2 for a fused [gate; up] weight, so each rank gets half of both).
    Megatron's attribute names, which DeepSpeed reads to count the slice once in grad norms.
    """
    param.tensor_model_parallel = True
    param.partition_dim, param.partition_stride = dim, stride
    return param


def tp_slice(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim`` (see ``mark_tp_split`` for ``stride``)."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim)


def _split_param(full: torch.Tensor, dim: int, rank: int, size: int, where: str, split: TensorSplit,
                 stride: int = 1) -> nn.Parameter:
    """This rank's slice of ``full`` along ``dim`` as a new, marked parameter (checks divisibility)."""
    extent = full.shape[dim] // stride
    unit = split.unit * size
    if extent % unit:
        what = split.what or "features"
        raise TensorSplitError(
            f"tensor parallelism cannot split {where} (dim {dim}: {extent // split.unit} {what}"
            f"{'' if split.unit == 1 else f' of {split.unit}'}) over tp = {size} ranks; use a tensor-parallel "
            f"size that divides {extent // split.unit}")
    param = nn.Parameter(tp_slice(full.detach(), dim, stride, rank, size).clone(), requires_grad=full.requires_grad)
    return mark_tp_split(param, dim, stride)


def _keep_order(new: nn.Module, old: nn.Module) -> nn.Module:
    """Register ``new``'s parameters in ``old``'s order (optimizer states are laid out in that order)."""
    order = [name for name in old._parameters if name in new._parameters]
    new._parameters = {name: new._parameters[name] for name in order + [n for n in new._parameters if n not in order]}
    return new


class ColumnParallelLinear(nn.Module):
    """``y_local = copy_to(x) W_localᵀ + b_local``: the output features (and bias) are split."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Where the whole input enters the split layer: identity forward, gradient summed over TP."""
        return copy_to_tensor_model_parallel_region(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.enter(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = reduce_from(x_local W_localᵀ) + b``: the input features are split, the bias added once."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class CopyToTensorParallel(nn.Module):
    """Identity forward, gradient all-reduced over TP (replaces a ``SplitEntry``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(x)


class ReduceFromTensorParallel(nn.Module):
    """All-reduce over TP forward, identity backward (replaces a ``SplitExit``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(x)


class VocabParallelLMHead(LMHead):
    """``LMHead`` over this rank's rows of the (TP-padded) vocabulary: Megatron's vocab-parallel loss for the
    one-piece head, and for the chunked one ``LinearCrossEntropy`` with its statistics all-reduced over TP."""

    def __init__(self, head: LMHead, weight: nn.Parameter, rank: int) -> None:
        nn.Module.__init__(self)
        self.usable, self.chunk_tokens = head.usable, head.chunk_tokens
        self.weight = weight
        self.vocab_offset = rank * weight.shape[0]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_model_parallel_region(hidden), self.weight)

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Megatron's kernel needs a real id everywhere; ignored positions are masked by the caller.
        return vocab_parallel_cross_entropy(logits.float(), targets.clamp(min=0))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(logits)

    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(hidden)  # backward: the ranks' parts of ∂hidden summed

    def vocab_reduce(self, tensor: torch.Tensor, op: str) -> None:
        """The chunked loss's per-token statistics over this rank's rows -> over every row (in place)."""
        reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
        dist.all_reduce(tensor, op=reduce_op, group=parallel_state.get_tensor_model_parallel_group())


def _padded_rows(weight: torch.Tensor, multiple: int, size: int) -> torch.Tensor:
    """The vocabulary weight with zero rows appended up to a multiple of ``multiple · size`` (Megatron's
    rule: every rank holds the same number of rows; padding rows are never predicted)."""
    rows = math.ceil(weight.shape[0] / (multiple * size)) * multiple * size
    return F.pad(weight.detach(), (0, 0, 0, rows - weight.shape[0]))


def _colwise(module, split, rank, size, name):
    bias = None if module.bias is None else _split_param(module.bias, 0, rank, size, f"{name}.bias", split)
    return ColumnParallelLinear(_split_param(module.weight, 0, rank, size, f"{name}.weight", split), bias)


def _rowwise(module, split, rank, size, name):
    return RowParallelLinear(_split_param(module.weight, 1, rank, size, f"{name}.weight", split), module.bias)


def _vocab_embedding(module, split, rank, size, name):
    full = _padded_rows(module.weight, split.unit, size)
    config = ModelParallelConfig(tensor_model_parallel_size=size, use_cpu_initialization=True,
                                 perform_initialization=False)
    layer = VocabParallelEmbedding(full.shape[0], full.shape[1], init_method=nn.init.zeros_, config=config)
    layer.weight = _split_param(full, 0, rank, size, f"{name}.weight", split)
    layer.weight.requires_grad_(module.weight.requires_grad)
    return layer


def _vocab_head(module, split, rank, size, name):
    full = _padded_rows(module.weight, split.unit, size)
    weight = _split_param(full, 0, rank, size, f"{name}.weight", split)
    weight.requires_grad_(module.weight.requires_grad)
    return VocabParallelLMHead(module, weight, rank)


def _experts(module: RoutedExperts, split, rank, size, name):
    module.gate_up = _split_param(module.gate_up, 1, rank, size, f"{name}.gate_up", split, stride=2)
    module.down = _split_param(module.down, 2, rank, size, f"{name}.down", split)
    return module


_SWAPS = {
    "colwise": _colwise,
    "rowwise": _rowwise,
    "vocab_embedding": _vocab_embedding,
    "vocab_head": _vocab_head,
    "experts": _experts,
    "enter": lambda *_: CopyToTensorParallel(),
    "leave": lambda *_: ReduceFromTensorParallel(),
}


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Names under which the same parameter appears more than once (tied weights), first name first."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Make the parameters named in each group of ``ties`` one parameter again (the first name's)."""
    for first, *others in ties:
        param = model.get_parameter(first)
        for other in others:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, param)


def _split_adapters(old: nn.Module, new: nn.Module, split: TensorSplit, rank: int, size: int, name: str) -> None:
    """The LoRA adapters of a split layer, split the same way: each adapter's ``TP_RULES`` (data in
    ``xoron_dist.model.lora``) name, for the layer's split kind, the factor to split (dim, stride) and
    what its identity ``seam`` becomes; a linear layer's adapter moves onto the layer's replacement."""
    for child, adapter in list(old.named_children()):
        rules = getattr(adapter, "TP_RULES", None)
        if rules is None:
            continue
        if split.kind not in rules:
            raise TensorSplitError(f"the LoRA adapter of {name} has no tensor-parallel rule for a '{split.kind}' "
                                   f"split; drop its target from model.lora.targets")
        factor, dim, stride, seam = rules[split.kind]
        setattr(adapter, factor, _split_param(getattr(adapter, factor), dim, rank, size, f"{name}.{child}.{factor}",
                                              split, stride))
        adapter.seam = _SWAPS[seam]()
        if new is not old:
            attach_linear_lora(new, adapter)


def apply_tensor_parallel(model: nn.Module, plan: TensorPlan, rank: int, size: int) -> int:
    """Swap every module ``plan`` matches for its counterpart split over ``size`` TP ranks (this is
    rank ``rank``); returns how many modules were swapped. Vocabulary splits need the plan's
    ``unit`` = the vocabulary padding multiple."""
    ties = shared_parameters(model)
    matched = match_plan(model, plan)
    for name, module, split in matched:
        new = _SWAPS[split.kind](module, split, rank, size, name)
        _split_adapters(module, new, split, rank, size, name)
        if new is not module:
            replace_submodule(model, name, _keep_order(new, module))
    retie(model, ties)
    return len(matched)


__all__ = ["ColumnParallelLinear", "CopyToTensorParallel", "ReduceFromTensorParallel", "RowParallelLinear",
           "TensorSplitError", "VocabParallelLMHead", "apply_tensor_parallel", "mark_tp_split", "retie",
           "replace_submodule", "shared_parameters", "tp_slice"]
