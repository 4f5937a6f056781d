"""HF transformers DeepseekV3ForCausalLM is the numerical oracle of the Xoron LLM backbone."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xoron_dist.config import load_config  # noqa: E402
from xoron_dist.model.llm import XoronLLM  # noqa: E402
from xoron_dist.model.llm.hf import (  # noqa: E402
    from_hf_state_dict,
    hf_config_kwargs,
    to_hf_state_dict,
)


def tiny_llm(*overrides: str):
    base = [
        "preset=tiny",
        "model.llm.max_position_embeddings=256",
        "model.llm.rope.original_max_positions=16",
        "model.llm.rope.factor=4.0",
    ]
    return load_config(None, base + list(overrides)).llm


def hf_twin(cfg, seed=0):
    """A random HF model of the same architecture, with a non-zero expert bias, and our copy of it."""
    torch.manual_seed(seed)
    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    ours = XoronLLM(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours


LONGROPE = [
    "model.llm.rope.type=longrope",
    "model.llm.rope.long_factor=[1.0, 1.5, 2.0, 4.0]",
    "model.llm.rope.short_factor=[1.0, 1.1, 1.2, 1.3]",
]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="yarn"),
        pytest.param(["model.llm.rope.mscale=0.7", "model.llm.rope.mscale_all_dim=0.5"], id="yarn-mscale"),
        pytest.param(LONGROPE, id="longrope"),
        pytest.param(["model.llm.rope.type=default"], id="rope-default"),
        pytest.param(["model.llm.dense_layers=1", "model.llm.q_lora_rank=null"], id="dense-first-no-qlora"),
        pytest.param(["model.llm.moe.routed_scaling_factor=2.5", "model.llm.moe.num_shared_experts=2"], id="scaled"),
    ],
)
def test_logits_match_hf(overrides):
    cfg = tiny_llm(*overrides)
    hf, ours = hf_twin(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > original_max_positions: YaRN/LongRoPE regime
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4


def test_latent_norms_keep_their_own_epsilon():
    """HF (as DeepSeek's reference) builds the q/kv latent norms with eps 1e-6 whatever rms_norm_eps is;
    using rms_norm_eps there (1e-2 here) put the logits 0.11 apart; with 1e-6 they agree to float rounding."""
    cfg = tiny_llm("model.llm.rms_norm_eps=1e-2")  # large, so a wrong epsilon would show plainly
    hf, ours = hf_twin(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def test_mapping_round_trip_into_hf():
    cfg = tiny_llm()
    ours = XoronLLM(cfg).eval()
    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    back = from_hf_state_dict(to_hf_state_dict(ours.state_dict()))
    assert back.keys() == ours.state_dict().keys()
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_unknown_tensor_name_is_reported():
    with pytest.raises(KeyError, match="no HF mapping for XoronLLM tensor 'layers.0.attn.bogus.weight'"):
        to_hf_state_dict({"layers.0.attn.bogus.weight": torch.zeros(1)})


def test_loss_matches_hf():
    cfg = tiny_llm()
    hf, ours = hf_twin(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), labels.flatten())
        got = ours(inputs, labels=labels).loss
    assert abs(got.item() - ref.item()) <= 1e-5


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_cached_generation_equals_uncached(temperature, top_p):
    cfg = tiny_llm()
    _, ours = hf_twin(cfg, seed=1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(11)
        runs.append(ours.generate_text(prompt, 30, temperature=temperature, top_p=top_p, use_cache=use_cache,
                                       generator=gen))
    assert runs[0].shape == (2, 37)
    assert torch.equal(runs[0], runs[1])


def test_greedy_generation_equals_hf_generate():
    cfg = tiny_llm()
    hf, ours = hf_twin(cfg, seed=2)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate_text(prompt, 20, temperature=0.0), ref)
