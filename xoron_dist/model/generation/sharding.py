"""Tensor-parallel plan of the MoE-DiT image generator (``xoron_dist.model.common.sharding`` has the vocabulary).

Every attention (both streams of a dual-stream block, and the single-stream blocks): q/k/v split by
heads (their biases alike), out_proj by rows; the QK-RMSNorm weight, one for every head, stays whole
and enters the split heads through its ``weight_entry`` (its gradient summed over TP). Dense FFNs
(SwiGLU or GELU: ``up_proj``/``gate_proj`` by columns, ``down_proj`` by rows) and the MoE's shared
expert split their intermediate dim; the routed experts too (``split_experts``) or stay whole, for
expert parallelism, which spreads every ``MoEFeedForward`` as it does the LLM's. The adaLN
modulations, embedders, router and final layer stay whole: they are small, and every rank needs
their whole output.
"""

from __future__ import annotations

from xoron_dist.config.generation import DiTConfig
from xoron_dist.model.common.sharding import (
    ENTER,
    SWIGLU_PLAN,
    TensorPlan,
    TensorSplit,
    attention_plan,
    experts_plan,
    nest,
)


def _attention(cfg: DiTConfig) -> dict[str, TensorSplit]:
    # ``attention_plan`` leaves out_proj at unit 1: its input is heads · head_dim wide, split by heads
    plan = attention_plan(cfg.attention_head_dim, "model.image_gen heads")
    plan["out_proj"] = TensorSplit("rowwise", unit=cfg.attention_head_dim, what="model.image_gen heads")
    plan.update({"q_norm.weight_entry": ENTER, "k_norm.weight_entry": ENTER})
    return plan


def _ffn(split_experts: bool) -> dict[str, TensorSplit]:
    """A dense FFN or an MoE at the same place: the patterns of the one absent match nothing."""
    plan = {**SWIGLU_PLAN, **nest("shared", SWIGLU_PLAN)}
    if split_experts:
        plan.update(nest("experts", experts_plan()))
    return plan


def tensor_plan(cfg: DiTConfig, split_experts: bool = True) -> TensorPlan:
    attention = _attention(cfg)
    return {
        **nest("dual_layers.*.img_attn", attention),
        **nest("dual_layers.*.txt_attn", attention),
        **nest("dual_layers.*.img_ffn", _ffn(split_experts)),
        **nest("dual_layers.*.txt_ffn", SWIGLU_PLAN),
        **nest("single_layers.*.attn", attention),
        **nest("single_layers.*.ffn", _ffn(split_experts)),
    }
