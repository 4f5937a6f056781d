"""The LLM's fast paths give what the plain computation gives: the rotary table of the default positions,
the one-buffer latent cache, and decoding under inference mode."""

from __future__ import annotations

import torch

from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.attention import LatentKVCache

TINY = ["preset=tiny", "model.llm.max_position_embeddings=256"]


def test_rope_span_equals_the_angles_of_those_positions():
    model = XoronLLM(load_config(None, TINY).llm)
    for start, length in [(0, 5), (3, 1), (0, 40), (37, 5), (0, 3)]:  # grows the table, then reads inside it
        cos, sin = model.rope.span(start, length, torch.device("cpu"))
        ref_cos, ref_sin = model.rope(torch.arange(start, start + length)[None])
        assert cos.shape == (1, length, model.cfg.qk_rope_head_dim // 2) and cos.dtype == torch.float32
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-7)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-7)
    assert model.rope._table[0].shape[0] == 80  # 40, then doubled for position 41; never rebuilt per call


def test_default_positions_give_the_logits_of_explicit_ones():
    torch.manual_seed(0)
    model = XoronLLM(load_config(None, TINY).llm).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        explicit = model(ids, position_ids=torch.arange(12).expand(2, -1)).logits
        default = model(ids).logits
    torch.testing.assert_close(default, explicit, rtol=1e-5, atol=1e-5)


def test_cache_parts_are_views_of_one_buffer_per_layer():
    cfg = load_config(None, TINY).llm
    cache = LatentKVCache.allocate(cfg, batch=2, max_len=9, device=torch.device("cpu"), dtype=torch.float32)
    latent, rope_key = torch.randn(2, 3, cfg.kv_lora_rank), torch.randn(2, 3, cfg.qk_rope_head_dim)
    cached = cache.write(1, latent, rope_key)
    assert cached.shape == (2, 3, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert torch.equal(cache.latent[1][:, :3], latent) and torch.equal(cache.rope_key[1][:, :3], rope_key)
    assert sum(t.nbytes for t in cache.latent + cache.rope_key) == sum(e.nbytes for e in cache.entries)


def test_model_trains_after_decoding_under_inference_mode():
    """Ids and rotary tables made while decoding are plain tensors: a training step may use them."""
    torch.manual_seed(0)
    model = XoronLLM(load_config(None, TINY).llm)
    out = model.generate_text(torch.randint(0, 1000, (1, 4)), 6, temperature=0)
    assert not out.is_inference() and model.training
    assert not model.rope._table[0].is_inference()
    loss = model(out[:, :-1], labels=out[:, 1:]).loss
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
