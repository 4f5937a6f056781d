"""Tensor-parallel plan of the fusion layers: each layer's cross-attention split by heads and its FFN
by the intermediate dim; norms and gates stay whole."""

from __future__ import annotations

from xoron_dist.config import FusionConfig
from xoron_dist.model.common.sharding import SWIGLU_PLAN, TensorPlan, attention_plan, nest


def tensor_plan(cfg: FusionConfig, hidden: int) -> TensorPlan:
    return {**nest("layers.*.attn", attention_plan(hidden // cfg.num_heads, "model.fusion heads")),
            **nest("layers.*.ffn", SWIGLU_PLAN)}
