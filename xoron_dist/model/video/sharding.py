"""Tensor-parallel plan of the video encoder: attention heads split (q/k/v columns, out rows), the
temporal MoE's routed experts on their FFN dim (with ``split_experts``, as the LLM's) and its
shared expert; the patch and motion embeddings and the router stay whole."""

from __future__ import annotations

from xoron_dist.config import VideoConfig
from xoron_dist.model.common.sharding import SWIGLU_PLAN, TensorPlan, attention_plan, experts_plan, nest


def tensor_plan(cfg: VideoConfig, split_experts: bool = True) -> TensorPlan:
    plan = {**nest("layers.*.attn", attention_plan(cfg.hidden_size // cfg.num_heads, "model.video heads")),
            **nest("layers.*.ffn.shared", SWIGLU_PLAN)}
    if split_experts:
        plan.update(nest("layers.*.ffn.experts", experts_plan()))
    return plan
