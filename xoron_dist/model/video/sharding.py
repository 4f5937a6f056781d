"""Tensor-parallel plans of the video encoders, as data.

``own`` (``encoder.py``): attention heads split (q/k/v columns, out rows), the temporal MoE's routed
experts on their FFN dim (with ``split_experts``, as the LLM's) and its shared expert; the patch and
motion embeddings and the router stay whole.

``tower`` (``factorised.py``): the same split for both factorised attentions (``spatial``,
``temporal``) and the MoE of each layer, and for the frame compressor's cross-attention (its heads);
``in_proj``, ``motion_embed``, the norms, the compressor's queries and the router stay whole. The
vision tower the frames run through is not in this plan: it is the model's ``vision`` and is split by
``vision.sharding``'s plan, once.
"""

from __future__ import annotations

from xoron_dist.config import VideoConfig
from xoron_dist.model.common.sharding import SWIGLU_PLAN, TensorPlan, attention_plan, experts_plan, nest


def tensor_plan(cfg: VideoConfig, split_experts: bool = True, factorised: bool = False) -> TensorPlan:
    heads = attention_plan(cfg.hidden_size // cfg.num_heads, "model.video heads")
    attentions = ("spatial", "temporal") if factorised else ("attn",)
    plan = {name: split for attn in attentions for name, split in nest(f"layers.*.{attn}", heads).items()}
    plan.update(nest("layers.*.ffn.shared", SWIGLU_PLAN))
    if split_experts:
        plan.update(nest("layers.*.ffn.experts", experts_plan()))
    if factorised:
        plan.update(nest("compress.attn", heads))
    return plan
