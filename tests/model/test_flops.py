"""The analytic FLOP count (xoron_dist.model.flops) against torch's FlopCounterMode on tiny models.

Like with like: the counter's SDPA formulas ignore ``is_causal``, so the analytic count is taken with
``causal=False`` here. Two known gaps are added explicitly, each an exact term:

* the CPU flash kernel takes one head dim for q, k and v, so MLA's narrower v runs zero-padded to the
  q/k width (``attention_kernels``): the kernel multiplies 2·b·h·s²·(qk − v) more per call in forward
  (and twice that in backward, whose two products with v use the padded width too);
* the kernel's backward recomputes the scores (q·kᵀ, 2·b·h·s²·qk), which model FLOPs leave out.
"""

import contextlib
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


# --- bench/gpu_check.py: the pieces that run without a GPU ----------------------------------------


def test_gpu_check_peer_is_the_dense_gpt_of_the_full_backbone():
    from bench.gpu_check import active_ffn_width, peer_config

    full = LLMConfig()  # pipelines/xoron_full.yaml's model: 6 dense layers (2048) and 6 MoE layers ((2 + 1) x 2048)
    assert active_ffn_width(full) == (6 * 2048 + 6 * 3 * 2048) // 12 == 4096
    peer = peer_config(full, 4096)
    assert (peer.hidden, peer.layers, peer.heads, peer.ffn, peer.vocab, peer.seq) == (1024, 12, 16, 4096, 151_936, 4096)


def _megatron_forward_on_cpu(monkeypatch) -> None:
    """Megatron-core's GPTModel forward asks CUDA for its buffers' device, its default causal mask and its RNG
    tracker's fork (dropout, off here); answer those on CPU so the same modules run and can be counted."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core import tensor_parallel

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(fused_softmax, "get_default_causal_mask", lambda sq: torch.ones(sq, sq).triu(1).bool())
    monkeypatch.setattr(tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())


def test_gpu_check_megatron_peer_flops_match_the_flop_counter(one_thread, monkeypatch):
    """The peer's FLOP formula against the Megatron-core GPTModel it describes (tiny, one gloo rank), the way
    bench/gpu_check.py calls it: its unfused attention (local spec) counts the full s², and has no recompute."""
    from bench.gpu_check import PeerConfig, build_megatron_gpt, gpt_forward_flops, megatron_single_rank

    peer = PeerConfig(hidden=32, layers=2, heads=4, ffn=48, vocab=64, seq=16)
    _megatron_forward_on_cpu(monkeypatch)
    batch = 3
    ids, positions = torch.randint(0, peer.vocab, (batch, peer.seq)), torch.arange(peer.seq).expand(batch, -1)
    with megatron_single_rank("gloo"):
        torch.manual_seed(0)
        model, spec = build_megatron_gpt(peer, torch.float32, torch.device("cpu"))
        if spec != "local":
            pytest.skip("Transformer Engine is installed: its layers run on CUDA only")
        with FlopCounterMode(display=False) as forward:
            losses = model(ids, positions, attention_mask=None, labels=ids)
        with FlopCounterMode(display=False) as both:
            model(ids, positions, attention_mask=None, labels=ids).float().mean().backward()
    assert losses.shape == (batch, peer.seq) and torch.isfinite(losses).all()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert any(p.shape == (2 * peer.ffn, peer.hidden) for p in matrices)  # SwiGLU of the stated width
    assert forward.get_total_flops() == gpt_forward_flops(peer, batch, causal=False)
    assert both.get_total_flops() == TRAIN_FACTOR * gpt_forward_flops(peer, batch, causal=False)
    attention = peer.layers * attention_flops(batch, peer.heads, peer.seq, peer.seq, 8, 8, causal=False)
    assert gpt_forward_flops(peer, batch, causal=True) == gpt_forward_flops(peer, batch, causal=False) - attention // 2


def test_gpu_check_mfu_report_and_part_failures(tmp_path, monkeypatch):
    import json

    import bench.gpu_check as gc

    got = gc.mfu(6e14, 2.0, 989.5)
    assert got["tflops"] == pytest.approx(300.0) and got["mfu"] == pytest.approx(300.0 / 989.5)
    assert gc.mfu(6e14, 2.0, None)["mfu"] is None
    path = gc.write_report(tmp_path / "out" / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    # a part that fails or overruns is recorded, and the driver goes on
    failed = gc.run_part("backbone", timeout=60, module="json.tool")  # json.tool refuses these arguments: exit status 2
    assert failed["status"] == "failed" and failed["returncode"] == 2 and "json.tool" in failed["tail"]
    assert gc.run_part("backbone", timeout=0.001)["status"] == "timeout"
    summary = gc.summarise({"backbone": failed}, "cpu")
    assert summary["ours"] is None and summary["ratio"] is None and summary["parts"]["backbone"] is failed
    ok = {"status": "ok", "result": {"ours": {"mfu": 0.4}, "peer": {"mfu": 0.5, "spec": "local"}}}
    assert gc.summarise({"backbone": ok}, "H200")["ratio"] == pytest.approx(0.8)
    # no GPU: the driver says so and exits 2 (bench/gpu_check.sh checks the same before starting it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 2 and not (tmp_path / "x.json").exists()
    with pytest.raises(gc.NoGPUError, match="needs a GPU"):
        gc.part_kernels()


def _step_syncs_body() -> dict:
    from bench.host_syncs import step_syncs

    return step_syncs(["data.source=synthetic_text", "train.log_every=1", "data.num_workers=0"], steps=4)


def test_gpu_check_syncs_part_cuts_the_run_into_steps():
    """``bench/gpu_check.py``'s syncs part on CPU: the counter's syncs per step, steps 2 and 3 (step 1 warms
    up; step 4 has no later start), alike from step to step; no CUDA column without CUDA."""
    from tests.parallel.harness import run_ranks

    [result] = run_ranks(_step_syncs_body, 1, timeout=240)
    assert result["steps"] == [2, 3] and result["cuda"] is None
    assert result["counted"][0] == result["counted"][1] > 0, result
