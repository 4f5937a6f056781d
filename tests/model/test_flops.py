"""The analytic FLOP count (xoron_dist.model.flops) against torch's FlopCounterMode on tiny models.

Like with like: the counter's SDPA formulas ignore ``is_causal``, so the analytic count is taken with
``causal=False`` here. Two known gaps are added explicitly, each an exact term:

* the CPU flash kernel takes one head dim for q, k and v, so MLA's narrower v runs zero-padded to the
  q/k width (``attention_kernels``): the kernel multiplies 2·b·h·s²·(qk − v) more per call in forward
  (and twice that in backward, whose two products with v use the padded width too);
* the kernel's backward recomputes the scores (q·kᵀ, 2·b·h·s²·qk), which model FLOPs leave out.
"""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xoron_dist.config import LLMConfig, MoEConfig, VisionConfig
from xoron_dist.model.flops import (
    TRAIN_FACTOR,
    attention_flops,
    flop_counter_formulas,
    llm_forward_flops,
    llm_step_flops,
    total,
    vision_forward_flops,
    vision_step_flops,
)
from xoron_dist.model.llm.model import XoronLLM
from xoron_dist.model.vision.tower import VisionTower

BATCH, SEQ = 2, 12


def _tiny_llm(q_lora_rank: int | None, v_head_dim: int) -> LLMConfig:
    # layer 0 dense (dense_layers=1), layer 1 MoE: both kinds of feed-forward in one model
    return LLMConfig(vocab_size=200, special_token_slots=8, pad_vocab_multiple=16, hidden_size=32, num_layers=2,
                     num_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=v_head_dim, dense_layers=1, moe_layer_freq=1, dense_intermediate_size=48,
                     moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16, num_shared_experts=1))


def _measure(model: torch.nn.Module, run) -> tuple[dict[str, int], int]:
    """Forward FLOPs per module (names without the root class) and the total of forward + backward."""
    def by_module(counter: FlopCounterMode) -> dict[str, int]:
        root = type(model).__name__
        return {("" if name == root else name.removeprefix(root + ".")): sum(ops.values())
                for name, ops in counter.get_flop_counts().items() if name != "Global"}

    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as forward:
        run(model)
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as both:
        out = run(model)
        out.backward()
    return by_module(forward), both.get_total_flops()


@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(None, 16), (16, 8)], ids=["q_proj-v_eq_qk", "q_lora-narrow_v"])
def test_llm_components_match_flop_counter(one_thread, q_lora_rank, v_head_dim):
    cfg = _tiny_llm(q_lora_rank, v_head_dim)
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    measured, measured_step = _measure(model, lambda m: m(ids, labels=ids).loss)
    analytic = llm_forward_flops(cfg, BATCH, SEQ, causal=False)

    qk = cfg.qk_head_dim
    padding = attention_flops(BATCH, cfg.num_heads, SEQ, SEQ, 0, qk - v_head_dim, causal=False)  # v padded to qk
    recompute = attention_flops(BATCH, cfg.num_heads, SEQ, SEQ, qk, 0, causal=False)  # scores again in backward
    assert (padding == 0) == (v_head_dim == qk)

    for name, flops in analytic.items():  # every projection and feed-forward piece, exactly
        if not name.endswith(".core"):
            assert measured[name] == flops, name
    for i in range(cfg.num_layers):
        attn = f"layers.{i}.attn"
        # the core module also runs kv_up (it expands the latent into keys and values)
        assert measured[f"{attn}.core"] == analytic[f"{attn}.core"] + analytic[f"{attn}.kv_up"] + padding
        assert measured[attn] == total(analytic, attn) + padding
        assert measured[f"layers.{i}.ffn"] == total(analytic, f"layers.{i}.ffn")
        assert measured[f"layers.{i}"] == total(analytic, f"layers.{i}") + padding
    assert "layers.1.ffn.experts" in analytic and "layers.0.ffn" in analytic  # both layer kinds were checked
    assert measured[""] == total(analytic) + cfg.num_layers * padding
    # fwd + bwd = 3 x forward (model FLOPs) + the kernel's recomputed scores + the padded v in backward
    expected_step = TRAIN_FACTOR * (total(analytic) + cfg.num_layers * padding) + cfg.num_layers * recompute
    assert measured_step == expected_step


def test_moe_counts_only_the_chosen_experts():
    cfg = _tiny_llm(None, 16)

    def experts(num_experts: int, top_k: int) -> int:
        moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_intermediate_size=16)
        return llm_forward_flops(dataclasses.replace(cfg, moe=moe), 1, 8)["layers.1.ffn.experts"]

    assert experts(16, 2) == experts(4, 2) == llm_forward_flops(cfg, 1, 8)["layers.1.ffn.experts"]
    assert experts(4, 4) == 2 * experts(4, 2)


def test_causal_halving_and_step_factor():
    cfg = _tiny_llm(16, 8)
    causal, full = llm_forward_flops(cfg, 3, 64, causal=True), llm_forward_flops(cfg, 3, 64, causal=False)
    for name in full:
        assert causal[name] == (full[name] // 2 if name.endswith(".core") else full[name])
    assert llm_step_flops(cfg, 3, 64) == 3 * total(causal)
    with pytest.raises(ValueError, match="seq > 0"):
        llm_forward_flops(cfg, 1, 0)


def test_vision_tower_matches_flop_counter(one_thread):
    cfg = VisionConfig(enabled=True, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=28,
                       patch_size=7)
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    pixels = torch.randn(2, 3, 28, 28)
    measured, measured_step = _measure(tower, lambda m: m(pixels).features.square().sum())
    patches = (28 // 7) ** 2
    analytic = vision_forward_flops(cfg, images=2, patches=patches)
    assert measured["patch_embed"] == analytic["patch_embed"]
    for i in range(cfg.num_layers):
        layer = f"encoder.layers.{i}"
        projections = sum(measured[f"{layer}.patch.self_attn.{p}_proj"] for p in ("q", "k", "v", "out"))
        assert projections == analytic[f"{layer}.patch.self_attn"]  # (not a module call of its own)
        assert measured[f"{layer}.patch.mlp"] == analytic[f"{layer}.patch.mlp"]
        assert measured[layer] == total(analytic, layer)
    assert measured[""] == total(analytic)
    head_dim = cfg.hidden_size // cfg.num_heads
    recompute = cfg.num_layers * attention_flops(2, cfg.num_heads, patches, patches, head_dim, 0, causal=False)
    # the pixels need no gradient: the patch embedding's backward is its weight gradient alone
    assert measured_step == vision_step_flops(cfg, 2, patches) + recompute
    assert vision_step_flops(cfg, 2, patches) == TRAIN_FACTOR * total(analytic) - analytic["patch_embed"]
