"""MoE-DiT: blocks against diffusers (SD3 JointTransformerBlock, Flux double and single blocks, HiDream-I1's
MoE), shapes and size errors, adaLN-Zero init, masking and null condition, determinism, gradients, expert
balancing discovery, and tensor parallelism (TP=2 against one rank)."""

from dataclasses import replace

import pytest
import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

from tests.parallel.harness import run_ranks
from xoron_dist.config import MoEConfig, load_config
from xoron_dist.config.generation import DiTConfig
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.common.rope_nd import AxialRoPE, grid_coords
from xoron_dist.model.generation.dit import MoEDiT, patchify, unpatchify
from xoron_dist.model.generation.dit_blocks import DualStreamBlock, SingleStreamBlock, attend, modulate, real_tokens
from xoron_dist.model.generation.flow import euler_sample, flow_loss, heun_sample
from xoron_dist.parallel.tensor import tp_slice
from xoron_dist.train.expert_balance import ExpertBalancer
from xoron_dist.utils.typed_config import ConfigError, from_dict, validate_tree

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
TINY = DiTConfig(
    hidden_size=HIDDEN,
    num_heads=HEADS,
    dual_layers=1,
    single_layers=1,
    patch_size=2,
    latent_channels=4,
    cond_dim=24,
    moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_intermediate_size=32),
)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, None),
        ({"time_shift": 3.0, "ffn": "gelu", "head_dim": 48}, None),
        ({"moe": {"top_k": 1}}, None),  # a partial moe mapping keeps the generator's defaults, not the LLM's
        ({"num_heads": 5}, "'model.image_gen.num_heads' = 5 is invalid: must divide hidden_size (1024)"),
        ({"time_shift": 0.0}, "'model.image_gen.time_shift' = 0.0 is invalid: must be > 0"),
        ({"cfg_dropout": 1.0}, "'model.image_gen.cfg_dropout' = 1.0 is invalid: a share of samples in [0, 1)"),
        ({"moe": {"top_k": 5}}, "'model.image_gen.moe.top_k' = 5 is invalid: must be <= num_experts (4)"),
        ({"dual_layers": 0, "single_layers": 0}, "'model.image_gen.dual_layers' = 0 is invalid: the generator needs"),
        ({"num_heads": 512}, "'model.image_gen.head_dim' = 2 is invalid: 2D-RoPE needs a head dim of at least 4"),
        ({"ffn": "relu"}, "model.image_gen.ffn"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    def build():
        cfg = from_dict(DiTConfig, fields, "model.image_gen")
        validate_tree(cfg, "model.image_gen")
        return cfg

    if message is None:
        cfg = build()
        moe = cfg.moe
        assert (moe.num_experts, moe.num_shared_experts, moe.expert_intermediate_size) == (4, 1, 1024)
        assert moe.top_k == fields.get("moe", {}).get("top_k", 2)
        assert cfg.dense_intermediate_size == (4096 if cfg.ffn == "gelu" else 2752)  # 2730 rounded up to 64s
        return
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomise(module, seed, std=0.2):
    """Every parameter random (the zero-initialised modulations and final layer too)."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * std)


def _renamed(state, mapping):
    """Our state dict under the oracle's names: ``mapping`` ours-module-prefix -> theirs."""
    out = {}
    for name, value in state.items():
        prefix = next(p for p in mapping if name.startswith(p + "."))
        out[mapping[prefix] + name[len(prefix) :]] = value
    return out


STREAM_NAMES = {
    "img_mod": "norm1.linear",
    "txt_mod": "norm1_context.linear",
    "img_attn.q_proj": "attn.to_q",
    "img_attn.k_proj": "attn.to_k",
    "img_attn.v_proj": "attn.to_v",
    "img_attn.out_proj": "attn.to_out.0",
    "img_attn.q_norm": "attn.norm_q",
    "img_attn.k_norm": "attn.norm_k",
    "txt_attn.q_proj": "attn.add_q_proj",
    "txt_attn.k_proj": "attn.add_k_proj",
    "txt_attn.v_proj": "attn.add_v_proj",
    "txt_attn.out_proj": "attn.to_add_out",
    "txt_attn.q_norm": "attn.norm_added_q",
    "txt_attn.k_norm": "attn.norm_added_k",
    "img_ffn.up_proj": "ff.net.0.proj",
    "img_ffn.down_proj": "ff.net.2",
    "txt_ffn.up_proj": "ff_context.net.0.proj",
    "txt_ffn.down_proj": "ff_context.net.2",
}


def _dual_inputs():
    return _randn(2, 12, HIDDEN, seed=1), _randn(2, 5, HIDDEN, seed=2), _randn(2, HIDDEN, seed=3)


def _flux_rope(text, rows, cols):
    """Flux's rope (axes (4, 4), text ids 0) and ours over the same [text ; image] positions."""
    coords = torch.cat((torch.zeros(text, 2, dtype=torch.long), grid_coords(rows, cols)))
    return FluxPosEmbed(theta=10000, axes_dim=[4, 4])(coords), AxialRoPE(HEAD_DIM, axes=2)(coords)


@pytest.mark.parametrize("oracle", ["sd3", "sd3.5-qk-norm", "flux"])
def test_dual_stream_block_equals_diffusers(oracle):
    """SD3 JointTransformerBlock (no QK-norm, no RoPE), with QK-RMSNorm (SD3.5), and FluxTransformerBlock
    (QK-RMSNorm and Flux's RoPE over [text ; image]): same weights, fp32 outputs within 1e-5."""
    qk_norm = oracle != "sd3"
    ours = DualStreamBlock(HIDDEN, HEADS, HEAD_DIM, 4 * HIDDEN, ffn="gelu", qk_norm=qk_norm)
    if oracle == "flux":
        theirs = FluxTransformerBlock(HIDDEN, HEADS, HEAD_DIM)
    else:
        theirs = JointTransformerBlock(HIDDEN, HEADS, HEAD_DIM, qk_norm="rms_norm" if qk_norm else None)
    _randomise(ours, seed=4)
    names = {k: v for k, v in STREAM_NAMES.items() if qk_norm or "_norm" not in k}
    theirs.load_state_dict(_renamed(ours.state_dict(), names), strict=True)
    img, txt, cond = _dual_inputs()
    with torch.no_grad():
        if oracle == "flux":
            flux_rope, rope = _flux_rope(5, 3, 4)
            want_txt, want_img = theirs(img, txt, cond, image_rotary_emb=flux_rope)
            got_img, got_txt = ours(img, txt, cond, rope)
        else:
            want_txt, want_img = theirs(img, txt, cond)
            got_img, got_txt = ours(img, txt, cond)
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, rtol=0, atol=1e-5)


def test_single_stream_block_equals_flux_single_block():
    """Flux fuses out-proj and the MLP's down-projection into proj_out over [attn ; mlp]; ours keeps them apart."""
    ours = SingleStreamBlock(HIDDEN, HEADS, HEAD_DIM, 4 * HIDDEN, ffn="gelu", qk_norm=True)
    theirs = FluxSingleTransformerBlock(HIDDEN, HEADS, HEAD_DIM)
    _randomise(ours, seed=5)
    state = ours.state_dict()
    fused = {
        "proj_out.weight": torch.cat((state.pop("attn.out_proj.weight"), state.pop("ffn.down_proj.weight")), dim=1),
        "proj_out.bias": state.pop("attn.out_proj.bias"),
    }
    names = {k.replace("img_attn", "attn"): v for k, v in STREAM_NAMES.items() if k.startswith("img_attn.")}
    names.update({"mod": "norm.linear", "ffn.up_proj": "proj_mlp"})
    theirs.load_state_dict({**_renamed(state, names), **fused}, strict=True)
    img, txt, cond = _dual_inputs()
    flux_rope, rope = _flux_rope(5, 3, 4)
    with torch.no_grad():
        want_txt, want_img = theirs(img, txt, cond, image_rotary_emb=flux_rope)
        got = ours(torch.cat((txt, img), dim=1), cond, rope)
    torch.testing.assert_close(got, torch.cat((want_txt, want_img), dim=1), rtol=0, atol=1e-5)


def test_single_stream_ffn_on_the_real_tokens_equals_the_boolean_mask_write():
    """The FFN runs on the real tokens through flat indices made once per stack (``real_tokens``: one read
    of their count), against the boolean-mask write it replaced (three reads per block): values, grads."""
    from xoron_dist.utils.host_syncs import HostSyncCounter

    block = SingleStreamBlock(HIDDEN, HEADS, HEAD_DIM, 4 * HIDDEN, ffn="gelu", qk_norm=True)
    _randomise(block, seed=6)
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cond = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(2))
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    with HostSyncCounter() as syncs:
        real = real_tokens(valid)
        out = block(x, cond, None, valid[:, None, None], real)
    assert syncs.calls == {"__int__": 1}, syncs.calls
    shift, scale, gate = block.mod(torch.nn.functional.silu(cond)).chunk(3, dim=-1)
    h = modulate(x, shift, scale, block.eps)
    update = block.attn.out_proj(attend(*block.attn.qkv(h), None, valid[:, None, None]))
    want = x + gate[:, None] * update.index_put((valid,), update[valid] + block.ffn(h[valid]))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * weights).sum(), [x, *block.parameters()])
    for a, b in zip(got, torch.autograd.grad((want * weights).sum(), [x, *block.parameters()]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_ffn_equals_hidream_train_and_eval():
    """HiDream-I1's MOEFeedForwardSwiGLU (softmax gate, top-2 of 4 not renormalised, shared expert): with
    expert bias 0 and ``router_score: softmax`` the routing and outputs match in both its train path
    (masked loop) and eval path (``moe_infer``), and in train mode the gradients too."""
    theirs = MOEFeedForwardSwiGLU(HIDDEN, 4 * HIDDEN, num_routed_experts=4, num_activated_experts=2)
    width = theirs.experts[0].w1.out_features  # HiDream rounds 2/3 · 128 up to 256; its shared expert too
    assert theirs.shared_experts.w1.out_features == width
    cfg = MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_intermediate_size=width,
                    router_score="softmax", norm_topk_prob=False)  # fmt: skip
    ours = MoEFeedForward(HIDDEN, cfg, family="image_gen")
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.experts.gate_up.copy_(torch.stack([torch.cat((e.w1.weight, e.w3.weight)) for e in theirs.experts]))
        ours.experts.down.copy_(torch.stack([e.w2.weight for e in theirs.experts]))
        for mine, their in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            getattr(ours.shared, mine).weight.copy_(getattr(theirs.shared_experts, their).weight)
    x, weights = _randn(2, 24, HIDDEN, seed=6), _randn(2, 24, HIDDEN, seed=7)
    for train in (True, False):
        theirs.train(train)
        want = theirs(x)
        got = ours(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    theirs.train(True)
    (theirs(x) * weights).sum().backward()
    (ours(x) * weights).sum().backward()
    torch.testing.assert_close(ours.router.weight.grad, theirs.gate.weight.grad, rtol=1e-4, atol=1e-6)
    grads = torch.stack([torch.cat((e.w1.weight.grad, e.w3.weight.grad)) for e in theirs.experts])
    torch.testing.assert_close(ours.experts.gate_up.grad, grads, rtol=1e-4, atol=1e-6)


def _cond(batch=2, length=5, seed=8):
    states = _randn(batch, length, TINY.cond_dim, seed=seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, 3:] = False
    return states, mask


@pytest.mark.parametrize("size", [(32, 32), (16, 24)], ids=["256px-latent", "non-square"])
def test_output_shape(size):
    """A 256x256 image's latent (32x32 at /8: 256 tokens with patch 2) and a non-square one."""
    model = MoEDiT(TINY)
    latents = _randn(2, 4, *size, seed=9)
    out = model(latents, torch.rand(2), _cond())
    assert out.shape == latents.shape
    assert torch.equal(unpatchify(patchify(latents, 2), 2, size[0] // 2, size[1] // 2), latents)


def test_bad_sizes_are_one_line_errors():
    model = MoEDiT(TINY)
    with pytest.raises(ValueError, match=r"^latents of 15x16 do not split into 2x2 patches: [^\n]*$"):
        model(_randn(1, 4, 15, 16), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match=r"^latents have 3 channels; [^\n]*latent_channels = 4$"):
        model(_randn(1, 3, 16, 16), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match=r"cond_dim = 24"):
        model(_randn(1, 4, 16, 16), torch.rand(1), (_randn(1, 5, 7), None))


def test_adaln_zero_init_outputs_zero_and_same_seed_same_model():
    torch.manual_seed(0)
    a = MoEDiT(TINY)
    torch.manual_seed(0)
    b = MoEDiT(TINY)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    latents = _randn(2, 4, 8, 8, seed=10)
    assert torch.equal(a(latents, torch.rand(2), _cond()), torch.zeros_like(latents))
    _randomise(a, seed=11)
    _randomise(b, seed=11)
    t = torch.tensor([0.2, 0.9])
    assert torch.equal(a(latents, t, _cond()), b(latents, t, _cond()))
    block = a.dual_layers[0]  # zero modulation: the block is the identity
    torch.nn.init.zeros_(block.img_mod.weight), torch.nn.init.zeros_(block.img_mod.bias)
    torch.nn.init.zeros_(block.txt_mod.weight), torch.nn.init.zeros_(block.txt_mod.bias)
    img, txt, cond = _dual_inputs()
    assert all(torch.equal(x, y) for x, y in zip(block(img, txt, cond), (img, txt), strict=True))


def test_same_seed_same_generated_latents():
    model = MoEDiT(TINY)
    _randomise(model, seed=23)
    cond = _cond(1)
    for sampler in (euler_sample, heun_sample):
        runs = [
            sampler(
                model, (1, 4, 8, 8), cond, generator=torch.Generator().manual_seed(seed), steps=2, guidance_scale=3.0
            )
            for seed in (5, 5, 6)
        ]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_padding_and_dropped_prompts_are_invisible():
    """Padded text positions change nothing; a dropped sample sees only the learned null condition."""
    model = MoEDiT(TINY)
    _randomise(model, seed=12)
    latents, t = _randn(2, 4, 8, 8, seed=13), torch.tensor([0.3, 0.6])
    states, mask = _cond()
    base = model(latents, t, (states, mask))
    other = states.clone()
    other[1, 3:] += 5.0  # sample 1's padding
    torch.testing.assert_close(model(latents, t, (other, mask)), base, rtol=0, atol=1e-6)
    drop = torch.tensor([True, False])
    dropped = model(latents, t, (states, mask), drop)
    other = states.clone()
    other[0] += 5.0  # sample 0's whole prompt, and its length
    mask0 = mask.clone()
    mask0[0, 2:] = False
    torch.testing.assert_close(model(latents, t, (other, mask0), drop), dropped, rtol=0, atol=1e-6)
    assert not torch.allclose(dropped[0], base[0])
    torch.testing.assert_close(dropped[1], base[1], rtol=0, atol=1e-6)


def test_gradient_reaches_every_parameter():
    model = MoEDiT(TINY)
    _randomise(model, seed=14)
    x0 = _randn(4, 4, 8, 12, seed=15)
    states = _randn(4, 5, TINY.cond_dim, seed=16)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss = flow_loss(model, x0, (states, mask), torch.Generator().manual_seed(17), cfg_dropout=0.5)
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_routers_are_balanced_by_the_expert_balancer():
    """The trainer's balancer finds one ``image_gen`` router per block and counts only real tokens."""
    model = MoEDiT(TINY).train()
    _randomise(model, seed=18)
    balancer = ExpertBalancer(model)
    assert balancer.names == ["dual_layers.0.img_ffn.router", "single_layers.0.ffn.router"]
    assert balancer.families == ["image_gen"]
    assert [n for n, m in model.named_modules() if isinstance(m, MoEFeedForward)] == [
        "dual_layers.0.img_ffn",
        "single_layers.0.ffn",
    ]  # what expert parallelism spreads
    model(_randn(2, 4, 8, 8, seed=19), torch.rand(2), _cond()).sum().backward()
    before = [b.clone() for b in balancer.biases("image_gen")]
    load = balancer.update()["image_gen"]
    image_tokens, text_tokens = 2 * 16, 5 + 3
    assert load.sum(dim=1).tolist() == [2 * image_tokens, 2 * (image_tokens + text_tokens)]  # top-2
    assert any(not torch.equal(a, b) for a, b in zip(before, balancer.biases("image_gen"), strict=True))


TP_CFG = replace(TINY, dual_layers=2, single_layers=1)


def _tp_step(model, latents, t, cond, drop, weights):
    out = model(latents, t, cond, drop)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tp_body(full_state, inputs):
    from xoron_dist.model.generation.sharding import tensor_plan
    from xoron_dist.parallel import state
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    ctx = state.initialize(load_config(None, ["preset=tiny", "parallel.tp=2"]))
    model = MoEDiT(TP_CFG)
    model.load_state_dict(full_state)
    swapped = apply_tensor_parallel(model, tensor_plan(TP_CFG), ctx.rank, 2)
    out, grads = _tp_step(model, *inputs)
    meta = {
        n: (
            getattr(p, "tensor_model_parallel", False),
            getattr(p, "partition_dim", 0),
            getattr(p, "partition_stride", 1),
        )
        for n, p in model.named_parameters()
    }
    return {"out": out, "grads": grads, "meta": meta, "swapped": swapped}


@pytest.mark.multirank
def test_tp2_equals_single_rank():
    single = MoEDiT(TP_CFG)
    _randomise(single, seed=20)
    full_state = {k: v.clone() for k, v in single.state_dict().items()}
    states, mask = _cond()
    inputs = (_randn(2, 4, 8, 12, seed=21), torch.tensor([0.3, 0.8]), (states, mask), torch.tensor([False, True]))
    inputs = (*inputs, _randn(2, 4, 8, 12, seed=22))
    ref_out, ref_grads = _tp_step(single, *inputs)
    for rank, got in enumerate(run_ranks(_tp_body, 2, full_state, inputs)):
        # per attention: q, k, v, out, the 2 QK-norm entries (x 2 streams in a dual block); per FFN: dense 3, or
        # shared 3 + experts 3
        assert got["swapped"] == 2 * (12 + 3 + 6) + (6 + 6), rank
        torch.testing.assert_close(got["out"], ref_out, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        assert set(got["grads"]) == set(ref_grads)
        for name, grad in got["grads"].items():
            split, dim, stride = got["meta"][name]
            ref = tp_slice(ref_grads[name], dim, stride, rank, 2) if split else ref_grads[name]
            scale = max(float(ref.abs().max()), 1.0)
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale, msg=f"rank {rank} grad of {name}")


def test_text_tokens_are_counted_on_the_host_copies_of_the_mask_and_the_drop():
    """The generator heads give the DiT a prompt mask and a CFG drop that keep host copies
    (``prompt_states``, ``cfg_drop``): the stack's real tokens are then counted on the host, and the
    forward asks the device for nothing; the same output as with copy-less tensors (one read)."""
    from xoron_dist.utils.host_syncs import HostSyncCounter, prefix_mask, upload

    model = MoEDiT(TINY).train()
    _randomise(model, seed=30)
    latents, t = _randn(2, 4, 8, 8, seed=31), torch.tensor([0.3, 0.8])
    states = _randn(2, 5, TINY.cond_dim, seed=32)
    mask, drop = prefix_mask([5, 3], 5, "cpu"), upload([False, True], device="cpu", keep_host=True)
    with HostSyncCounter() as syncs:
        out = model(latents, t, (states, mask), drop)
    assert syncs.total == 0, syncs.calls
    with HostSyncCounter() as syncs:
        plain = model(latents, t, (states, mask.clone()), drop.clone())
    assert syncs.calls == {"__int__": 1}, syncs.calls
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_the_heads_cfg_drop_is_drawn_on_the_host_from_the_item_clock():
    """``cfg_drop``: the same item in the same step draws the same mask, another step another one; the share
    follows ``cfg_dropout``; the mask keeps its host copy (the DiT counts its text tokens there)."""
    from xoron_dist.model.generation.heads import ImageGenerator
    from xoron_dist.utils.host_syncs import host_copy

    head = ImageGenerator(load_config("pipelines/smoke.yaml", []))
    item = torch.zeros(8, 8, 3, dtype=torch.uint8)
    first = head.cfg_drop(item, 400, 0.25, torch.device("cpu"))
    assert torch.equal(first, head.cfg_drop(item, 400, 0.25, torch.device("cpu"))) and host_copy(first) is not None
    assert 60 < int(first.sum()) < 140  # about a quarter of 400
    head.clock.advance()
    assert not torch.equal(first, head.cfg_drop(item, 400, 0.25, torch.device("cpu")))
    assert not head.cfg_drop(item, 50, 0.0, torch.device("cpu")).any()
