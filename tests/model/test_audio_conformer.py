"""Conformer encoder with RMLA: HF wav2vec2-conformer oracle, the RMLA = folded rotary MHA identity,
the latent cache, relative positions, padding, TP=2 parity."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import Wav2Vec2ConformerConfig
from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import (
    Wav2Vec2ConformerEncoderLayer,
    Wav2Vec2ConformerRotaryPositionalEmbedding,
)

from tests.parallel.harness import run_ranks
from xoron_dist.config import ConformerConfig, load_config
from xoron_dist.model.audio.conformer import (
    ConformerBlock,
    ConformerEncoder,
    RotaryLatentAttention,
    RotarySelfAttention,
)
from xoron_dist.model.common.rope_nd import AxialRoPE
from xoron_dist.parallel.tensor import tp_slice

INPUT = 12  # width of the frames the encoders read
TINY = ConformerConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, conv_kernel=5,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# HF's rotary conformer: head_size 8, RoPE over the whole head, applied to the block input.
HF_MODE = replace(TINY, attention="mha_rope", rope_on="input", conv_norm="batch", qk_nope_head_dim=0,
                  qk_rope_head_dim=8, v_head_dim=8, conv_kernel=7)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rope(cfg: ConformerConfig, frames: int, batch: int = 1, shift: float = 0.0):
    """The encoder's rope tables for frames shift, shift + 1, ... of ``batch`` clips."""
    encoder_rope = AxialRoPE(cfg.qk_rope_head_dim, axes=1, theta=cfg.rope_theta)
    positions = torch.arange(frames, dtype=torch.float32).expand(batch, -1) + shift
    return encoder_rope(positions[..., None])


@torch.no_grad()
def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic random (norm weights near 1, variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm1d):
            sub.running_mean.copy_(0.3 * torch.randn(sub.running_mean.shape, generator=gen))
            sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=gen))


def _hf_layer() -> tuple[Wav2Vec2ConformerEncoderLayer, Wav2Vec2ConformerConfig]:
    config = Wav2Vec2ConformerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     conv_depthwise_kernel_size=7, position_embeddings_type="rotary",
                                     hidden_act="swish", rotary_embedding_base=10000)
    config._attn_implementation = "eager"
    layer = Wav2Vec2ConformerEncoderLayer(config)
    _randomise(layer, seed=1)
    return layer.eval(), config


def _hf_to_ours(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {"ffn1_layer_norm": "ffn1_norm", "ffn1.intermediate_dense": "ffn1.fc1", "ffn1.output_dense": "ffn1.fc2",
             "ffn2_layer_norm": "ffn2_norm", "ffn2.intermediate_dense": "ffn2.fc1", "ffn2.output_dense": "ffn2.fc2",
             "self_attn_layer_norm": "attn_norm", "self_attn.linear_q": "attn.q_proj",
             "self_attn.linear_k": "attn.k_proj", "self_attn.linear_v": "attn.v_proj",
             "self_attn.linear_out": "attn.out_proj", "conv_module.layer_norm": "conv.norm",
             "conv_module.pointwise_conv1": "conv.pointwise_in", "conv_module.depthwise_conv": "conv.depthwise",
             "conv_module.batch_norm": "conv.depthwise_norm", "conv_module.pointwise_conv2": "conv.pointwise_out",
             "final_layer_norm": "final_norm"}
    ours = {}
    for key, value in hf.items():
        module, _, leaf = key.rpartition(".")
        if "pointwise_conv" in module:
            value = value.squeeze(-1)  # a 1x1 Conv1d (out, in, 1) is our Linear (out, in)
        ours[f"{names[module]}.{leaf}"] = value
    return ours


def test_mha_rope_block_equals_hf_wav2vec2_conformer() -> None:
    hf, config = _hf_layer()
    block = ConformerBlock(HF_MODE).eval()
    missing, unexpected = block.load_state_dict(_hf_to_ours(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    x = _randn(2, 11, 32, seed=2)
    positions = Wav2Vec2ConformerRotaryPositionalEmbedding(config)(x)
    mask = torch.ones(2, 11, dtype=torch.bool)  # HF's conv module reads padded frames: compare unpadded clips
    with torch.no_grad():
        ref = hf(x, relative_position_embeddings=positions)
        out = block(x, _rope(HF_MODE, 11, batch=2), mask)
    assert (out - ref).abs().max() <= 1e-5
    # conv_norm="layer" (our default) is a different block: the oracle really sees the norm.
    block_ln = ConformerBlock(replace(HF_MODE, conv_norm="layer")).eval()
    state = {k: v for k, v in _hf_to_ours(hf.state_dict()).items() if "running" not in k and "batches" not in k}
    block_ln.load_state_dict(state)
    with torch.no_grad():
        assert (block_ln(x, _rope(HF_MODE, 11, batch=2), mask) - ref).abs().max() > 1e-3


def _folded_mha(rmla: RotaryLatentAttention, cfg: ConformerConfig) -> RotarySelfAttention:
    """Rotary MHA whose W_k per head = [W_UK,i W_DKV ; W_KR] and W_v per head = W_UV,i W_DKV."""
    mha = RotarySelfAttention(replace(cfg, attention="mha_rope"))
    rank, nope, v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    w_dkv, w_kr = rmla.kv_down.weight[:rank], rmla.kv_down.weight[rank:]
    w_up = rmla.kv_up.weight.view(cfg.num_heads, nope + v, rank)
    w_k = torch.cat((w_up[:, :nope] @ w_dkv, w_kr.expand(cfg.num_heads, -1, -1)), dim=1)  # (h, nope+rope, hidden)
    w_v = w_up[:, nope:] @ w_dkv
    with torch.no_grad():
        mha.q_proj.load_state_dict(rmla.q_proj.state_dict())
        mha.out_proj.load_state_dict(rmla.out_proj.state_dict())
        mha.k_proj.weight.copy_(w_k.flatten(0, 1))
        mha.v_proj.weight.copy_(w_v.flatten(0, 1))
        mha.k_proj.bias.zero_()
        mha.v_proj.bias.zero_()
    return mha


def test_rmla_equals_folded_rotary_mha() -> None:
    """With the latent norm an identity, RMLA is rotary MHA (partial rotary, one rope key row shared by
    every head) whose key/value weights are the products of the latent projections."""
    rmla = RotaryLatentAttention(TINY)
    _randomise(rmla, seed=3)
    rmla.kv_norm = nn.Identity()
    mha = _folded_mha(rmla, TINY)
    x = _randn(2, 9, 32, seed=4)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 5:] = False
    rope = _rope(TINY, 9, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(rmla(x, rope, key_mask), mha(x, rope, key_mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rmla.attention_scores(x, rope), mha.attention_scores(x, rope),
                                   rtol=1e-5, atol=1e-5)


def test_latent_cache_equals_full_attention() -> None:
    rmla = RotaryLatentAttention(TINY)
    _randomise(rmla, seed=5)
    x = _randn(2, 10, 32, seed=6)
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0, 7:] = False
    cos, sin = _rope(TINY, 10, batch=2)
    with torch.no_grad():
        full = rmla(x, (cos, sin), key_mask)
        # Streaming: frames compressed into the cache chunk by chunk as they arrive ...
        cache = None
        for s in range(0, 10, 4):
            part = rmla.compress(x[:, s : s + 4], (cos[:, s : s + 4], sin[:, s : s + 4]), key_mask[:, s : s + 4])
            cache = part if cache is None else cache.extend(part)
        assert cache.latent.shape == (2, 10, TINY.kv_lora_rank) and cache.rope_key.shape == (2, 10, 4)
        # ... then queries attend against the latents with absorbed up-projections, 3 at a time.
        cached = torch.cat([rmla.attend_cached(x[:, s : s + 3], (cos[:, s : s + 3], sin[:, s : s + 3]), cache)
                            for s in range(0, 10, 3)], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # The whole encoder through the cached path.
    encoder = ConformerEncoder(TINY, INPUT).eval()
    frames = _randn(2, 10, 12, seed=7)
    with torch.no_grad():
        ref = encoder(frames, key_mask).hidden
        torch.testing.assert_close(encoder(frames, key_mask, query_chunk=4).hidden, ref, rtol=1e-5, atol=1e-5)
    mha = ConformerEncoder(replace(TINY, attention="mha_rope"), INPUT)
    with pytest.raises(ValueError, match="attention='rmla'"):
        mha(frames, query_chunk=4)


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="rmla"),
    pytest.param({"attention": "mha_rope"}, id="mha_rope-qk"),
    pytest.param({"attention": "mha_rope", "qk_nope_head_dim": 0}, id="mha_rope-full-rotary"),
])
def test_shifting_positions_leaves_scores_unchanged(variant) -> None:
    cfg = replace(TINY, **variant)
    block = ConformerBlock(cfg)
    _randomise(block, seed=8)
    x = _randn(1, 12, 32, seed=9)
    with torch.no_grad():
        scores = block.attn.attention_scores(x, _rope(cfg, 12))
        shifted = block.attn.attention_scores(x, _rope(cfg, 12, shift=1000.0))
    assert scores.shape == (1, 4, 12, 12)
    # fp32 angles of ~1000 rad carry ~1e-4 absolute error
    torch.testing.assert_close(shifted, scores, rtol=1e-3, atol=1e-3)
    assert (_rope(cfg, 12, shift=1000.0)[0] - _rope(cfg, 12)[0]).abs().max() > 0.1  # the tables did change


def test_input_rotation_is_not_relative() -> None:
    """wav2vec2-conformer's placement (RoPE before the projections) is why RMLA rotates q/k instead."""
    block = ConformerBlock(HF_MODE)
    _randomise(block, seed=8)
    x = _randn(1, 12, 32, seed=9)
    with torch.no_grad():
        change = block.attn.attention_scores(x, _rope(HF_MODE, 12, shift=1000.0)) - block.attn.attention_scores(
            x, _rope(HF_MODE, 12))
    assert change.abs().max() > 1e-2


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="rmla-layernorm"),
    pytest.param({"conv_norm": "batch"}, id="rmla-batchnorm"),
    pytest.param({"attention": "mha_rope"}, id="mha_rope"),
    pytest.param({"attention": "mha_rope", "rope_on": "input", "qk_nope_head_dim": 0}, id="mha_rope-input"),
])
def test_padding_invariance(variant) -> None:
    """A clip's outputs are the same alone or batched beside a longer clip; padding content is ignored."""
    cfg = replace(TINY, **variant)
    encoder = ConformerEncoder(cfg, INPUT)
    _randomise(encoder, seed=10)
    long_clip, short_clip = _randn(1, 13, 12, seed=11), _randn(1, 6, 12, seed=12)
    padded = torch.cat((long_clip, torch.cat((short_clip, 1e3 * _randn(1, 7, 12, seed=13)), dim=1)))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 6:] = False
    encoder.eval()  # BatchNorm's training statistics are over the batch: compare with its running ones
    with torch.no_grad():
        batched = encoder(padded, mask)
        alone = encoder(short_clip)
    assert batched.hidden[1, 6:].abs().max() == 0 and torch.equal(batched.mask, mask)
    torch.testing.assert_close(batched.hidden[1, :6], alone.hidden[0], rtol=1e-5, atol=1e-5)
    # In training, padded frames take no part in BatchNorm statistics either: garbage there changes nothing.
    encoder.train()
    other = padded.clone()
    other[1, 6:] = -other[1, 6:]
    with torch.no_grad():
        torch.testing.assert_close(encoder(other, mask).hidden, encoder(padded, mask).hidden, rtol=0, atol=0)


def test_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match="conv_kernel' = 4.*odd"):
        ConformerEncoder(replace(TINY, conv_kernel=4), INPUT)
    with pytest.raises(ValueError, match="rope_on.*attention: mha_rope"):
        ConformerEncoder(replace(TINY, rope_on="input"), INPUT)
    with pytest.raises(ValueError, match="qk_rope_head_dim' = 3.*even"):
        ConformerEncoder(replace(TINY, qk_rope_head_dim=3), INPUT)
    encoder = ConformerEncoder(TINY, INPUT)
    with pytest.raises(ValueError, match="input_dim is 12"):
        encoder(torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="mask must be bool"):
        encoder(torch.zeros(1, 4, 12), torch.ones(1, 4))


# --------------------------------------------------------------------------- TP=2

TP_VARIANTS = {
    "rmla": ({}, None),
    "rmla-cached": ({}, 3),
    "mha_rope-batchnorm": ({"attention": "mha_rope", "conv_norm": "batch"}, None),
}


def _tp_step(encoder: ConformerEncoder, frames, mask, weights, query_chunk):
    out = encoder(frames, mask, query_chunk=query_chunk).hidden
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in encoder.named_parameters()}


def _tp_body(states, frames, mask, weights):
    from xoron_dist.model.audio.sharding import tensor_plan
    from xoron_dist.parallel import state
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    ctx = state.initialize(load_config(None, ["preset=tiny", "parallel.tp=2"]))
    results = {}
    for name, (variant, query_chunk) in TP_VARIANTS.items():
        cfg = replace(TINY, **variant)
        encoder = ConformerEncoder(cfg, INPUT)
        encoder.load_state_dict(states[name])
        assert apply_tensor_parallel(encoder, tensor_plan(cfg), ctx.rank, 2) > 0
        out, grads = _tp_step(encoder, frames, mask, weights, query_chunk)
        meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                    getattr(p, "partition_stride", 1)) for n, p in encoder.named_parameters()}
        results[name] = {"out": out, "grads": grads, "meta": meta}
    return results


@pytest.mark.multirank
def test_tp2_equals_single_rank() -> None:
    frames = _randn(2, 9, 12, seed=14)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    weights = _randn(2, 9, 32, seed=15)
    states, refs = {}, {}
    for name, (variant, query_chunk) in TP_VARIANTS.items():
        encoder = ConformerEncoder(replace(TINY, **variant), INPUT)
        _randomise(encoder, seed=16)
        states[name] = {k: v.clone() for k, v in encoder.state_dict().items()}
        refs[name] = _tp_step(encoder, frames, mask, weights, query_chunk)
    for rank, results in enumerate(run_ranks(_tp_body, 2, states, frames, mask, weights)):
        for name, (ref_out, ref_grads) in refs.items():
            got = results[name]
            torch.testing.assert_close(got["out"], ref_out, rtol=1e-5, atol=1e-5, msg=f"{name} rank {rank}")
            assert set(got["grads"]) == set(ref_grads)
            assert any(split for split, _, _ in got["meta"].values())
            for param, grad in got["grads"].items():
                split, dim, stride = got["meta"][param]
                ref = tp_slice(ref_grads[param], dim, stride, rank, 2) if split else ref_grads[param]
                scale = max(float(ref.abs().max()), 1.0)  # fp32 sums in another order
                torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m, r=rank, n=name, p=param: f"{n} rank {r} grad {p}: {m}")
