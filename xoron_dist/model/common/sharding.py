"""How tensor parallelism may split a module: the vocabulary of the per-component sharding plans.

A component's plan (``xoron_dist/model/<component>/sharding.py``) maps module-name patterns
(relative to the component; ``*`` stands for one dotted segment: ``layers.*.attn.out_proj``) to a
``TensorSplit``; ``xoron_dist.parallel.tensor``
reads the plan and swaps each matched module for its tensor-parallel counterpart holding this
rank's slice of the full weight. The model code itself stays single-rank: it never asks how
many ranks there are (attention modules read their local head count off their weights).

    kind               module            what tensor parallelism does with it
    colwise            nn.Linear         output features (and bias) split; input copied in
    rowwise            nn.Linear         input features split; partial outputs summed (bias added once)
    vocab_embedding    nn.Embedding      vocabulary rows split (padded to a multiple of the TP size)
    vocab_head         LMHead            vocabulary rows split; vocab-parallel cross-entropy
    experts            RoutedExperts     every expert's FFN dim split (gate/up rows, down columns)
    enter              SplitEntry        identity forward, gradient summed over the TP ranks
    leave              SplitExit         sum over the TP ranks forward, identity backward

``unit``: the split must fall between blocks of this many features (an attention head), so the
number of blocks must divide by the TP size; ``what`` names the blocks in the error.

``SplitEntry``/``SplitExit`` are the two places where a tensor crosses into or out of a region
that tensor parallelism splits, but that is not already the input of a column layer or the
output of a row layer: MLA's rope key, shared by every head, and the routed experts' rows. In the
single-rank model they are identities.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

SplitKind = Literal["colwise", "rowwise", "vocab_embedding", "vocab_head", "experts", "enter", "leave"]


@dataclass(frozen=True)
class TensorSplit:
    kind: SplitKind
    unit: int = 1
    what: str = ""


COLWISE = TensorSplit("colwise")
ROWWISE = TensorSplit("rowwise")
ENTER = TensorSplit("enter")
LEAVE = TensorSplit("leave")

TensorPlan = Mapping[str, TensorSplit]


class SplitEntry(nn.Identity):
    """Where a tensor every TP rank holds whole enters a split computation (see the module docstring)."""


class SplitExit(nn.Identity):
    """Where the partial results of a split computation are summed (see the module docstring)."""


SWIGLU_PLAN: dict[str, TensorSplit] = {"gate_proj": COLWISE, "up_proj": COLWISE, "down_proj": ROWWISE}


def attention_plan(head_dim: int, what: str) -> dict[str, TensorSplit]:
    """q/k/v split by heads, out rows: a multi-head attention's projections."""
    split = TensorSplit("colwise", unit=head_dim, what=what)
    return {"q_proj": split, "k_proj": split, "v_proj": split, "out_proj": ROWWISE}


def experts_plan() -> dict[str, TensorSplit]:
    """Routed experts split on their FFN dim: the stacked weights, and the rows' way in and out."""
    return {"": TensorSplit("experts"), "entry": ENTER, "exit": LEAVE}


def nest(prefix: str, plan: TensorPlan) -> dict[str, TensorSplit]:
    """``plan`` for a submodule at ``prefix`` (a pattern: ``layers.*.ffn``)."""
    return {(f"{prefix}.{name}" if name else prefix): split for name, split in plan.items()}


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the dotted ``name`` segment by segment (``*`` is one segment, or part of one)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def match_plan(model: nn.Module, plan: TensorPlan) -> list[tuple[str, nn.Module, TensorSplit]]:
    """The (name, module, split) of every module of ``model`` that ``plan`` matches, in module order.
    A module matched by two patterns is an error in the plan."""
    found = []
    for name, module in model.named_modules():
        hits = [split for pattern, split in plan.items() if name_matches(name, pattern)]
        if len(hits) > 1:
            raise ValueError(f"sharding plan: module '{name}' is matched by {len(hits)} patterns")
        if hits:
            found.append((name, module, hits[0]))
    return found


def perceiver_plan(hidden: int, num_heads: int) -> dict[str, TensorSplit]:
    """A Perceiver resampler (``xoron_dist.model.common.perceiver``): every layer's heads and FFN split;
    the in/out projections and the latents whole."""
    return {**nest("layers.*.attn", attention_plan(hidden // num_heads, "projector heads")),
            **nest("layers.*.ffn", SWIGLU_PLAN)}
