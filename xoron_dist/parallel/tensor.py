"""Tensor parallelism: the layer builder whose layers are split over the TP group.

Built from Megatron-core's ``tensor_parallel`` primitives: its conjugate communication
functions (``copy_to``: identity forward, all-reduce of the gradient backward; ``reduce_from``:
all-reduce forward, identity backward), ``VocabParallelEmbedding`` and
``vocab_parallel_cross_entropy``. The model asks the builder for column-, row- or replicated
linears and does not change (``xoron_dist.model.layers.LayerBuilder``):

    column_linear   weight (out/tp, in)   y_local = x W_local^T           (x copied in: copy_to)
    row_linear      weight (out, in/tp)   y = reduce_from(x_local W_local^T)
    output_layer    a column layer over the (padded) vocabulary; the loss is vocab-parallel
    embedding       vocabulary rows split; each rank embeds its ids, then an all-reduce

Every split parameter carries Megatron's ``tensor_model_parallel``/``partition_dim``/
``partition_stride`` attributes: the model initialises it as the slice of a full tensor drawn
from the same seed (so a TP model starts from exactly the single-rank weights), and DeepSpeed
counts it once per TP group in the gradient norm.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.layers import LayerBuilder, SequenceSplit, mark_tp_split
from xoron_dist.parallel.experts import expert_split

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (
        VocabParallelEmbedding,
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel size {tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T``: the output features are split; no bias (Xoron has none)."""

    def __init__(self, in_features: int, out_features: int, tp: int) -> None:
        super().__init__()
        self.weight = mark_tp_split(nn.Parameter(torch.empty(_split(out_features, tp, "out_features"),
                                                             in_features)), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_model_parallel_region(x), self.weight)


class RowParallelLinear(nn.Module):
    """``y = sum over ranks of x_local W_local^T``: the input features are split."""

    def __init__(self, in_features: int, out_features: int, tp: int) -> None:
        super().__init__()
        self.weight = mark_tp_split(nn.Parameter(torch.empty(out_features,
                                                             _split(in_features, tp, "in_features"))), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))


class TensorParallelBuilder(LayerBuilder):
    """Layers split over Megatron-core's tensor-parallel group (``parallel_state`` must be up)."""

    def __init__(self, split_experts: bool = True) -> None:
        self.split_experts = split_experts
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # Our own initialisation (full tensor, then this rank's slice) replaces Megatron's.
        self._megatron = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                             perform_initialization=False)

    def column_linear(self, in_features: int, out_features: int) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, self.tp_size)

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.tp_size)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        _split(num_embeddings, self.tp_size, "vocabulary rows")
        layer = VocabParallelEmbedding(num_embeddings, dim, init_method=nn.init.zeros_, config=self._megatron)
        mark_tp_split(layer.weight, dim=0)
        return layer

    def output_layer(self, dim: int, vocab: int) -> nn.Module:
        return ColumnParallelLinear(dim, vocab, self.tp_size)

    def copy_to_tp(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(x)

    def reduce_from_tp(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(logits)

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Megatron's kernel needs a real id everywhere; ignored positions are masked by the caller.
        return vocab_parallel_cross_entropy(logits.float(), targets.clamp(min=0))


def layer_builder(cfg) -> LayerBuilder:
    """The builder for a run (``cfg``: XoronConfig): layers split over TP when tp > 1, routed experts
    spread over the expert-parallel group when ep > 1, and the sequence split over the
    context-parallel group (ring attention) when sp > 1."""
    builder = TensorParallelBuilder(cfg.parallel.tp_experts) if cfg.parallel.tp > 1 else LayerBuilder()
    builder.experts = expert_split(cfg)
    if cfg.parallel.sp > 1:
        builder.sequence = SequenceSplit(parallel_state.get_context_parallel_group(),
                                         parallel_state.get_context_parallel_rank(),
                                         parallel_state.get_context_parallel_world_size(), cfg.parallel.ring_latent)
    return builder
