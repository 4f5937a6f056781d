"""Tensor-parallel plan of the LLM (``xoron_dist.model.common.sharding`` has the vocabulary).

MLA: the per-head projections (``q_proj`` or ``q_up``, ``kv_up``) are split by heads, ``out_proj``
by rows; the low-rank down-projections and their norms stay whole on every rank (they are small,
and the latent they make is what every head reads). The rope key, shared by every head, enters
the split region through ``rope_key_entry``. FFNs split their intermediate dim; routed experts too
(``split_experts``) or stay whole (for use with expert parallelism). The embedding and the LM
head split the vocabulary.
"""

from __future__ import annotations

from xoron_dist.config import LLMConfig
from xoron_dist.model.common.sharding import (
    ENTER,
    SWIGLU_PLAN,
    TensorPlan,
    TensorSplit,
    experts_plan,
    nest,
)


def tensor_plan(cfg: LLMConfig, split_experts: bool = True) -> TensorPlan:
    heads = TensorSplit("colwise", unit=cfg.qk_head_dim, what="model.llm attention heads")
    plan = {
        # the vocabulary is padded to a multiple of pad_vocab_multiple · tp (padding rows never predicted)
        "embed_tokens": TensorSplit("vocab_embedding", unit=cfg.pad_vocab_multiple, what="vocabulary rows"),
        "lm_head": TensorSplit("vocab_head", unit=cfg.pad_vocab_multiple, what="vocabulary rows"),
        "layers.*.attn.q_proj": heads,
        "layers.*.attn.q_up": heads,
        "layers.*.attn.kv_up": TensorSplit("colwise", unit=cfg.qk_nope_head_dim + cfg.v_head_dim,
                                           what="model.llm attention heads"),
        "layers.*.attn.out_proj": TensorSplit("rowwise", unit=cfg.v_head_dim, what="model.llm attention heads"),
        "layers.*.attn.rope_key_entry": ENTER,
        **nest("layers.*.ffn", SWIGLU_PLAN),  # dense layers
        **nest("layers.*.ffn.shared", SWIGLU_PLAN),
    }
    if split_experts:
        plan.update(nest("layers.*.ffn.experts", experts_plan()))
    return plan
