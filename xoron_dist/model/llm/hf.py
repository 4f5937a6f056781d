"""Two-way mapping between XoronLLM and HF transformers ``DeepseekV3ForCausalLM``.

One table of (our name, HF name) pairs drives both directions, so they cannot
disagree. Used by the oracle tests (copy HF weights into ours, compare logits)
and by export (ours -> HF safetensors + config that loads in transformers).
Tensor layouts are identical on both sides (interleaved rope, stacked experts),
so the mapping only renames.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from xoron_dist.config import LLMConfig

# Per-layer parameters: ours (under "layers.{i}.") <-> HF (under "model.layers.{i}.").
_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.q_down.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn.q_up.weight", "self_attn.q_b_proj.weight"),
    ("attn.kv_down.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn.kv_up.weight", "self_attn.kv_b_proj.weight"),
    ("attn.out_proj.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.experts.gate_up", "mlp.experts.gate_up_proj"),
    ("ffn.experts.down", "mlp.experts.down_proj"),
    ("ffn.shared.gate_proj.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared.up_proj.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared.down_proj.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.gate_proj.weight", "mlp.gate_proj.weight"),
    ("ffn.up_proj.weight", "mlp.up_proj.weight"),
    ("ffn.down_proj.weight", "mlp.down_proj.weight"),
)
_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _translate(name: str, layer_re: re.Pattern, out_prefix: str, forward: bool) -> str:
    pairs_g = dict(_GLOBAL_NAMES) if forward else {hf: ours for ours, hf in _GLOBAL_NAMES}
    if name in pairs_g:
        return pairs_g[name]
    match = layer_re.match(name)
    pairs_l = dict(_LAYER_NAMES) if forward else {hf: ours for ours, hf in _LAYER_NAMES}
    if match and match.group(2) in pairs_l:
        return f"{out_prefix}{match.group(1)}.{pairs_l[match.group(2)]}"
    side = "XoronLLM" if forward else "DeepseekV3ForCausalLM"
    raise KeyError(f"no HF mapping for {side} tensor '{name}' (see xoron_dist/model/llm/hf.py)")


def to_hf_name(name: str) -> str:
    return _translate(name, _OURS_LAYER, "model.layers.", forward=True)


def from_hf_name(name: str) -> str:
    return _translate(name, _HF_LAYER, "layers.", forward=False)


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {from_hf_name(k): v for k, v in state.items()}


def hf_config_kwargs(cfg: LLMConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.DeepseekV3Config`` for the same architecture.

    Raises ``ValueError`` for what DeepseekV3 cannot express: MoE layers other than "every layer
    after the first ``dense_layers``" (``moe_layer_freq`` > 1) and the seed's router options
    (softmax scores, a norm on the router's input)."""
    unsupported = []
    if cfg.moe_layer_freq != 1 and any(cfg.is_moe_layer(i) != (i >= cfg.dense_layers) for i in range(cfg.num_layers)):
        unsupported.append(f"moe_layer_freq={cfg.moe_layer_freq} (DeepseekV3 puts MoE on every layer after "
                           "first_k_dense_replace)")
    if cfg.moe.router_score != "sigmoid":
        unsupported.append(f"moe.router_score={cfg.moe.router_score!r} (DeepseekV3's router is sigmoid)")
    if cfg.moe.router_norm:
        unsupported.append("moe.router_norm=true (DeepseekV3's router has no input norm)")
    if unsupported:
        raise ValueError("this LLM config has no DeepseekV3 equivalent: " + "; ".join(unsupported))
    rope: dict[str, Any] = {"rope_type": cfg.rope.type, "rope_theta": cfg.rope.theta}
    if cfg.rope.type == "yarn":
        rope.update(
            factor=cfg.rope.factor, original_max_position_embeddings=cfg.rope.original_max_positions,
            beta_fast=cfg.rope.beta_fast, beta_slow=cfg.rope.beta_slow,
            mscale=cfg.rope.mscale, mscale_all_dim=cfg.rope.mscale_all_dim,
        )
    elif cfg.rope.type == "longrope":
        rope.update(
            factor=cfg.rope.factor, original_max_position_embeddings=cfg.rope.original_max_positions,
            long_factor=list(cfg.rope.long_factor), short_factor=list(cfg.rope.short_factor),
        )
    return dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.dense_intermediate_size,
        moe_intermediate_size=cfg.moe.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        n_shared_experts=cfg.moe.num_shared_experts,
        n_routed_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        routed_scaling_factor=cfg.moe.routed_scaling_factor,
        norm_topk_prob=cfg.moe.norm_topk_prob,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=cfg.dense_layers,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=cfg.attention_dropout,
        num_nextn_predict_layers=0,
        hidden_act="silu",
    )
