"""LoRA out of the trainer: PEFT loads our exported adapter onto the exported HF model with our logits,
and the merged export is the base plus the adapters."""

import json
import warnings

import pytest
import torch

from xoron_dist.config import load_config
from xoron_dist.export.lora import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    LoRAExportError,
    export_hf_with_lora,
    merge_lora,
    split_adapters,
)
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.lora import apply_lora, is_adapter
from xoron_dist.train.consolidation import ConsolidatedCheckpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# a dense first layer (dense FFN adapters), MoE after it (shared + routed expert adapters), q low-rank
OVERRIDES = ["preset=tiny", "model.llm.dense_layers=1", "model.lora.enabled=true", "model.lora.rank=4",
             "model.lora.alpha=8", "model.lora.dropout=0.1"]


def _trained_like(cfg):
    """Our LLM with adapters whose B (and A) are random: an adapter as training leaves it."""
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    apply_lora(model, cfg.model.lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name):
                param.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = load_config(None, OVERRIDES)
    model = _trained_like(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = ConsolidatedCheckpoint(cfg, state, multimodal=False, step=3, source="in memory")
    out = export_hf_with_lora(ckpt, tmp_path_factory.mktemp("hf") / "export")
    merged = export_hf_with_lora(ckpt, tmp_path_factory.mktemp("hf") / "merged", merge=True)
    return cfg, model, state, out, merged


def _hf(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.eval()


def test_peft_loads_our_adapter_with_our_logits(exported):
    cfg, model, _, out, _ = exported
    config = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(_hf(out), out / ADAPTER_DIR).eval()
    # every adapter of ours was loaded (PEFT warns, not fails, on unknown keys: count them)
    loaded = {n for n, _ in wrapped.named_parameters() if "lora_" in n}
    ours = {n for n, _ in model.named_parameters() if is_adapter(n)}
    assert len(loaded) == len(ours)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = wrapped(ids).logits
        ref = model(ids).logits
        base = _hf(out)(ids).logits
    assert (base - ref).abs().max() > 1e-2  # the adapters matter ...
    assert (got - ref).abs().max().item() <= 1e-5  # ... and PEFT applies them as we do


def test_merged_export_equals_base_plus_adapter(exported):
    cfg, model, state, _, merged_dir = exported
    from safetensors.torch import load_file

    from xoron_dist.model.llm.hf import from_hf_state_dict

    merged = from_hf_state_dict({k: v for f in merged_dir.glob("model-*.safetensors") for k, v in load_file(f).items()})
    expected = merge_lora(state, cfg.model.lora)
    base, adapters = split_adapters(state)
    assert set(merged) == set(base) and not (merged_dir / ADAPTER_DIR).exists()
    scale = cfg.model.lora.scale
    name = "layers.0.attn.q_up.weight"  # by hand: W + scale B A
    by_hand = base[name] + scale * adapters["layers.0.attn.q_up.lora.B"] @ adapters["layers.0.attn.q_up.lora.A"]
    assert torch.allclose(merged[name], by_hand, atol=1e-6)
    e = 2  # one routed expert of the stacked weights
    gate_up = "layers.1.ffn.experts.gate_up"
    by_hand = base[gate_up][e] + scale * adapters[f"{gate_up}_lora.B"][e] @ adapters[f"{gate_up}_lora.A"][e]
    assert torch.allclose(merged[gate_up][e], by_hand, atol=1e-6)
    for key in base:
        assert torch.equal(merged[key], expected[key]), key
    # the merged plain model (no adapters) computes what the adapted one does
    plain = XoronLLM(cfg.llm).eval()
    plain.load_state_dict(merged)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
        assert (_hf(merged_dir)(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_merge_lora_refused_without_adapters():
    cfg = load_config(None, ["preset=tiny"])
    ckpt = ConsolidatedCheckpoint(cfg, XoronLLM(cfg.llm).state_dict(), multimodal=False)
    with pytest.raises(LoRAExportError, match="no LoRA adapters"):
        export_hf_with_lora(ckpt, "/nonexistent/never-written", merge=True)


def test_merged_export_over_an_adapter_export_leaves_no_stale_adapter(exported, tmp_path):
    cfg, _, state, _, _ = exported
    ckpt = ConsolidatedCheckpoint(cfg, state, multimodal=False)
    out = export_hf_with_lora(ckpt, tmp_path / "x")
    assert (out / ADAPTER_DIR / ADAPTER_CONFIG).is_file()
    export_hf_with_lora(ckpt, out, merge=True, force=True)
    assert not any((out / ADAPTER_DIR).iterdir())
