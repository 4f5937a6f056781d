"""Building blocks shared by every Xoron module: RMSNorm, SwiGLU, and the layer builder.

Model code never constructs ``nn.Linear``/``nn.Embedding`` for its big matrices
directly: it asks a ``LayerBuilder`` for a *column*-split, *row*-split or
*replicated* linear (Megatron's vocabulary). The default builder makes plain
single-rank layers; the tensor-parallel builder (``xoron_dist.parallel.tensor``,
issue #4) makes Megatron-core parallel layers from the same calls, so TP is a
property of the layers and not a second model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like DeepSeek/HF."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def mark_tp_split(param: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """Record that ``param`` is this rank's slice of a tensor split over tensor-parallel ranks.

    ``dim``: the split dimension; ``stride``: how many equal blocks the full dimension holds
    that are split separately (2 for a fused [gate; up] weight, so each rank gets half of both).
    Megatron's attribute names, which DeepSpeed reads to count the slice once in grad norms.
    """
    param.tensor_model_parallel = True
    param.partition_dim, param.partition_stride = dim, stride
    return param


def tp_slice(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim`` (see ``mark_tp_split`` for ``stride``)."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim)


def _uninitialized(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args)`` with storage but no initialisation, on the current default device (meta too)."""
    return skip_init(cls, *args, device=torch.get_default_device(), **kwargs)


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's place in the sequence-parallel group: it holds rows ``zigzag_positions(...)``
    of every sequence, and attention runs as ring attention over ``group``."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    latent: bool  # MLA: pass the latent + rope key around the ring instead of full K/V


@dataclass(frozen=True)
class ExpertSplit:
    """This rank's place in the expert-parallel group: it holds experts ``rank * (num_experts / size)``
    onwards, and tokens travel to them by all-to-all over ``group`` (``xoron_dist.parallel.experts``)."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    group_name: str  # DeepSpeed's name for the EP group (``ep_size_<size>``)
    data_group: object  # the expert-data-parallel group: the ranks holding replicas of the same experts
    capacity_factor: float | None = None  # None: dropless
    zero3: bool = False  # the run uses ZeRO-3 (expert parameters marked for stage-3 placement)


class LayerBuilder:
    """Makes the linear/embedding layers of a model, and the few operations that depend on how
    they are split; this one is single-rank (``xoron_dist.parallel.tensor`` has the TP one).

    ``column_linear``: output features may be split across tensor-parallel ranks.
    ``row_linear``: input features may be split (its output is then reduced).
    ``replicated_linear``: identical on every rank (small down-projections, routers).
    A column layer's caller sizes what follows by ``out_features // tp_size``.
    ``copy_to_tp``/``reduce_from_tp``: where a replicated tensor enters a split computation
    (backward sums its gradient over the ranks) / where split partial sums leave one.
    """

    tp_size: int = 1
    tp_rank: int = 0
    split_experts: bool = True  # routed experts split on their FFN dim over TP (else whole on every rank)
    sequence: SequenceSplit | None = None  # set when the sequence is split over SP ranks (ring attention)
    experts: ExpertSplit | None = None  # set when routed experts are spread over EP ranks

    # Layers are made uninitialised (skip_init): the model initialises every weight itself, in
    # one order, so that the random stream, and thus the weights, do not depend on the builder.
    def column_linear(self, in_features: int, out_features: int) -> nn.Module:
        return _uninitialized(nn.Linear, in_features, out_features, bias=False)

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        return _uninitialized(nn.Linear, in_features, out_features, bias=False)

    def replicated_linear(self, in_features: int, out_features: int) -> nn.Module:
        return _uninitialized(nn.Linear, in_features, out_features, bias=False)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return _uninitialized(nn.Embedding, num_embeddings, dim)

    def output_layer(self, dim: int, vocab: int) -> nn.Module:
        return _uninitialized(nn.Linear, dim, vocab, bias=False)

    def copy_to_tp(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce_from_tp(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's (batch, seq, vocab/tp) slice."""
        return logits

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (fp32) of logits (..., vocab/tp) against ids (...)."""
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

    def vocab_offset(self, rows: int) -> int:
        """Global id of this rank's first vocabulary row."""
        return self.tp_rank * (rows // self.tp_size)


def expert_tp_split(builder: LayerBuilder | None, intermediate: int) -> tuple[LayerBuilder, int]:
    """The builder routed experts split with, and their per-rank FFN width: ``builder`` when it splits
    experts over TP (``split_experts``, tp > 1), else a single-rank one (experts whole on every rank)."""
    split = builder is not None and builder.split_experts and builder.tp_size > 1
    expert_builder = builder if split else LayerBuilder()
    local = intermediate // expert_builder.tp_size
    if local * expert_builder.tp_size != intermediate:
        raise ValueError(f"expert_intermediate_size {intermediate} is not divisible by TP size "
                         f"{expert_builder.tp_size}")
    return expert_builder, local


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020); the dense FFN and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, builder: LayerBuilder) -> None:
        super().__init__()
        self.gate_proj = builder.column_linear(hidden, intermediate)
        self.up_proj = builder.column_linear(hidden, intermediate)
        self.down_proj = builder.row_linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
