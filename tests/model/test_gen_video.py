"""Video MoE-DiT: block-causal attention against dense SDPA with CausVid's mask, causality over chunks, the KV-cache
rollout against the full forward pass, per-chunk noise against diffusers' scheduler, 3D against 2D RoPE, motion-aware
routing, determinism, size errors, gradients, expert balancing discovery and the config section."""

import time
from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.parallel.harness import run_ranks
from xoron_dist.config import MoEConfig, load_config
from xoron_dist.config.video_generation import VideoDiTConfig
from xoron_dist.model.common.rope_nd import AxialRoPE, grid_coords
from xoron_dist.model.generation.dit_blocks import attend, real_tokens
from xoron_dist.model.generation.flow import euler_sample, heun_sample
from xoron_dist.model.generation.video_dit import (
    MotionRoutedMoE,
    VideoMoEDiT,
    block_causal_mask,
    chunk_noise,
    context_prefix,
    frame_motion,
    generate_video,
    text_dual_step,
    text_single_step,
    video_dual_step,
    video_flow_loss,
    video_patchify,
    video_single_step,
)
from xoron_dist.parallel.tensor import tp_slice
from xoron_dist.train.expert_balance import ExpertBalancer
from xoron_dist.utils.typed_config import ConfigError, from_dict, validate_tree

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, HEADS, HEAD_DIM, CHANNELS, CHUNK = 48, 4, 12, 4, 2
TINY = VideoDiTConfig(
    hidden_size=HIDDEN,
    num_heads=HEADS,
    dual_layers=1,
    single_layers=1,
    patch_size=2,
    latent_channels=CHANNELS,
    cond_dim=24,
    chunk_frames=CHUNK,
    motion_dim=8,
    moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_intermediate_size=32),
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomise(module, seed, std=0.2):
    """Every parameter random (the zero-initialised modulations and final layer too)."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * std)


def _model(seed=1, cfg=TINY):
    torch.manual_seed(0)
    model = VideoMoEDiT(cfg)
    _randomise(model, seed)
    return model


def _cond(batch=2, length=5, seed=8):
    states = _randn(batch, length, TINY.cond_dim, seed=seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, 3:] = False
    return states, mask


def _note(name, value):
    """A measured number, shown with ``pytest -s``."""
    print(f"{name}: {value:.3g}")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, None),
        ({"chunk_frames": 1, "context_clean_prob": 1.0, "moe": {"top_k": 1}}, None),
        ({"chunk_frames": 0}, "'model.video_gen.chunk_frames' = 0 is invalid: must be > 0"),
        ({"motion_dim": -1}, "'model.video_gen.motion_dim' = -1 is invalid: must be > 0"),
        ({"context_clean_prob": 1.5}, "'model.video_gen.context_clean_prob' = 1.5 is invalid: a probability in [0, 1]"),
        ({"num_heads": 256}, "'model.video_gen.head_dim' = 4 is invalid: 3D-RoPE needs a head dim of at least 6"),
        ({"num_heads": 5}, "'model.video_gen.num_heads' = 5 is invalid: must divide hidden_size (1024)"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    def build():
        cfg = from_dict(VideoDiTConfig, fields, "model.video_gen")
        validate_tree(cfg, "model.video_gen")
        return cfg

    if message is None:
        cfg = build()
        assert cfg.moe.num_experts == 4 and cfg.chunk_frames == fields.get("chunk_frames", 3)
        return
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)


def _causvid_mask(text_valid, frames, per_frame, chunk_frames):
    """The oracle mask over [text ; video], written from CausVid's rule: video query q sees video key kv iff
    ``kv < ends[q]`` with ends[q] the end of q's block of chunk_frames·frame_seqlen tokens; every video token sees
    the valid text; text sees only the valid text."""
    batch, length = text_valid.shape
    n = frames * per_frame
    block = chunk_frames * per_frame
    ends = (torch.arange(n) // block + 1) * block
    full = torch.zeros(batch, length + n, length + n, dtype=torch.bool)
    full[:, :, :length] = text_valid[:, None, :]
    full[:, length:, length:] = torch.arange(n)[None, :] < ends[:, None]
    return full[:, None]


@pytest.mark.parametrize("kind", ["dual", "single"])
def test_block_causal_attention_equals_dense_sdpa_with_causvid_mask(kind):
    """The video steps (text pass attending to text, video queries against [text ; video] keys, per-chunk
    modulation) equal the image generator's own block ``forward`` with one joint dense SDPA under CausVid's
    explicit mask, when every chunk has the same adaLN vector (what ``forward`` takes)."""
    model = _model(seed=2)
    frames, rows, cols = 6, 2, 3
    per_frame, n = rows * cols, frames * rows * cols
    img, txt, c = _randn(2, n, HIDDEN, seed=3), _randn(2, 5, HIDDEN, seed=4), _randn(2, HIDDEN, seed=5)
    valid = _cond()[1]
    rope_img = model.rope(grid_coords(frames, rows, cols))
    rope_all = model.rope(torch.cat((torch.zeros(5, 3, dtype=torch.long), grid_coords(frames, rows, cols))))
    dense = _causvid_mask(valid, frames, per_frame, CHUNK)
    chunk_ids = torch.arange(n) // (CHUNK * per_frame)
    mask = block_causal_mask(chunk_ids, valid, 5, 0)
    assert torch.equal(mask, dense[:, :, 5:])  # our mask builder is CausVid's rule
    c_chunks = c[:, None].expand(2, frames // CHUNK, HIDDEN)
    with torch.no_grad():
        if kind == "dual":
            block = model.dual_layers[0]
            want_img, want_txt = block(img, txt, c, rope_all, dense)
            got_txt, kv = text_dual_step(block, txt, c, valid[:, None, None])
            got_img, _ = video_dual_step(block, img, c_chunks, None, rope_img, [kv], mask)
        else:
            block = model.single_layers[0]
            joint_valid = torch.cat((valid, torch.ones(2, n, dtype=torch.bool)), 1)
            want = block(torch.cat((txt, img), 1), c, rope_all, dense, real_tokens(joint_valid))
            want_txt, want_img = want[:, :5], want[:, 5:]
            got_txt, kv = text_single_step(block, txt, c, valid, real_tokens(valid))
            got_img, _ = video_single_step(block, img, c_chunks, None, rope_img, [kv], mask)
    scale = float(torch.cat((want_img, want_txt), 1).abs().max())  # ~50: fp32 roundoff of different matmul shapes
    _note(f"dense CausVid oracle max |diff| / max |out| ({kind})", float((got_img - want_img).abs().max()) / scale)
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(got_txt, want_txt, rtol=0, atol=1e-6 * scale)


def test_later_chunks_never_change_earlier_ones():
    """Chunks <= k are unchanged when the latents and times of later chunks change; chunk k changes a later one."""
    model = _model(seed=6)
    latents, t = _randn(2, CHANNELS, 6, 4, 4, seed=7), torch.tensor([[0.2, 0.5, 0.9], [0.7, 0.1, 0.4]])
    cond = _cond()
    with torch.no_grad():
        base = model(latents, t, cond)
        worst = 0.0
        for k in (0, 1):
            end = (k + 1) * CHUNK
            other, other_t = latents.clone(), t.clone()
            other[:, :, end:] = _randn(2, CHANNELS, 6 - end, 4, 4, seed=10 + k)
            other_t[:, k + 1 :] = torch.rand(2, 2 - k, generator=torch.Generator().manual_seed(k))
            out = model(other, other_t, cond)
            worst = max(worst, float((out[:, :, :end] - base[:, :, :end]).abs().max()))
            assert not torch.allclose(out[:, :, end:], base[:, :, end:])
        earlier = latents.clone()
        earlier[:, :, :CHUNK] += 1.0
        assert (model(earlier, t, cond)[:, :, -CHUNK:] - base[:, :, -CHUNK:]).abs().max() > 1e-3
    scale = float(base.abs().max())  # fp32 roundoff of different attention shapes: 1.4e-6 absolute on some CPUs
    _note("causality: max |diff| of earlier chunks / max |out|", worst / scale)
    assert worst <= 1e-6 * scale, (worst, scale)  # as the CausVid oracle above; a leak moves outputs by > 1e-3


def _teacher_forced(model, noise, cond, steps, guidance, sampler):
    """Chunk k sampled with the full forward pass over [chunks < k (generated, t = 0) ; z_k at t]: no cache."""
    done = []
    for k, chunk in enumerate(noise.split(CHUNK, dim=2)):

        def velocity(z, t, _cond, drop, k=k):
            times = torch.cat((torch.zeros(z.shape[0], k), t[:, None]), dim=1)
            return model(torch.cat((*done, z), dim=2), times, cond, drop)[:, :, -CHUNK:]

        done.append(sampler(velocity, tuple(chunk.shape), None, generator=torch.Generator(), steps=steps,
                            guidance_scale=guidance, shift=1.5, noise=chunk))  # fmt: skip
    return torch.cat(done, dim=2)


@pytest.mark.parametrize("sampler, guidance", [(euler_sample, 2.5), (heun_sample, 1.0)], ids=["euler-cfg", "heun"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 5e-6)], ids=["fp64", "fp32"])
def test_kv_cache_rollout_equals_full_forward(sampler, guidance, dtype, tolerance):
    """The key equality: chunk-by-chunk generation with the KV cache (past chunks re-encoded at t = 0) gives the
    latents of the cache-free rollout where every step is one full forward pass under the block-causal mask,
    teacher-forced on the generated past, with the same noise and times. In fp64 the two agree to roundoff
    (~3e-15 relative: same computation); fp32 roundoff (different matmul shapes), amplified by 2 steps x 3
    chunks and by guidance, stays below 5e-6 of the latents' scale."""
    model = _model(seed=11).to(dtype)
    noise, (states, mask) = _randn(2, CHANNELS, 6, 4, 4, seed=12).to(dtype), _cond()
    cond = (states.to(dtype), mask)
    name = "euler" if sampler is euler_sample else "heun"
    cached = generate_video(model, tuple(noise.shape), cond, generator=torch.Generator(), steps=2,
                            guidance_scale=guidance, sampler=name, shift=1.5, noise=noise)  # fmt: skip
    full = _teacher_forced(model, noise, cond, 2, guidance, sampler)
    scale = float(full.abs().max())
    relative = float((cached - full).abs().max()) / scale
    _note(f"KV-cache rollout vs full forward max |diff| / max |latent| ({name}, {dtype})", relative)
    assert relative <= tolerance
    assert torch.equal(cached[:, :, :CHUNK], full[:, :, :CHUNK])  # the first chunk has no past: same computation
    assert scale > 0.1  # not a trivially zero clip


def test_chunk_noise_equals_diffusers_scale_noise_chunk_by_chunk():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0, eps = _randn(2, CHANNELS, 6, 4, 4, seed=13), _randn(2, CHANNELS, 6, 4, 4, seed=14)
    index = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(15))
    ours = chunk_noise(x0, eps, scheduler.sigmas[index], CHUNK)
    for k in range(3):
        frames = slice(k * CHUNK, (k + 1) * CHUNK)
        theirs = scheduler.scale_noise(x0[:, :, frames], scheduler.timesteps[index[:, k]], eps[:, :, frames])
        assert torch.equal(ours[:, :, frames], theirs)


def test_context_prefix_is_a_clean_prefix_and_never_the_last_chunk():
    gen = torch.Generator().manual_seed(16)
    clean = context_prefix(512, 4, 1.0, gen)
    lengths = clean.sum(1)
    assert torch.equal(clean, torch.arange(4)[None] < lengths[:, None])  # a prefix
    assert set(lengths.tolist()) == {1, 2, 3}
    assert not context_prefix(64, 1, 1.0, gen).any() and not context_prefix(64, 4, 0.0, gen).any()
    share = float(context_prefix(4000, 3, 0.5, gen).any(1).float().mean())
    assert abs(share - 0.5) < 0.05


def test_3d_rope_of_one_frame_is_2d_rope_on_the_spatial_dims():
    """At frame 0 the time pairs are not rotated, and (row, col) get exactly the image generator's 2D rope for a
    head of 4·(D//6) dims: the tables are equal, and attention with 3D rope equals 2D-rope attention on head dims
    [D//6·2, D//6·6) (the rest unrotated); q, k, v are the model's own, from a one-frame clip."""
    model = _model(seed=17)
    third = 2 * (HEAD_DIM // 6)
    coords = grid_coords(3, 4)
    cos3, sin3 = model.rope(torch.cat((torch.zeros(12, 1, dtype=torch.long), coords), dim=1))
    cos2, sin2 = AxialRoPE(2 * third, axes=2, theta=TINY.rope_theta)(coords)
    assert torch.equal(cos3[:, : third // 2], torch.ones(12, third // 2)) and not sin3[:, : third // 2].any()
    assert torch.equal(cos3[:, third // 2 :], cos2) and torch.equal(sin3[:, third // 2 :], sin2)
    block = model.dual_layers[0]
    with torch.no_grad():
        q, k, v = block.img_attn.qkv(model.patch_embed(_randn(1, 12, CHANNELS * 4, seed=18)))
        got = attend(q, k, v, (cos3, sin3), None)
        perm = [*range(third, 3 * third), *range(third)]  # spatial dims first; dot products do not see the order
        want = attend(q[..., perm], k[..., perm], v, (cos2, sin2), None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _panning_clip(frames=6, size=8, speed=2):
    """A random latent texture panned ``speed`` latent pixels (one patch) to the right per frame (wrapping)."""
    texture = _randn(1, CHANNELS, size, size, seed=19)
    return torch.stack([texture.roll(f * speed, dims=-1) for f in range(frames)], dim=2)


def _routing(model, latents):
    """Expert sets chosen by the first block's router for every image token: (tokens, k) sorted."""
    seen = []
    hook = model.dual_layers[0].img_ffn.router.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        model(latents, torch.tensor([0.3]), _cond(1))
    hook.remove()
    return seen[0].sort(dim=-1).values


def test_router_sees_motion():
    """Hiding the motion input (motion_embed = 0) changes no routing for a static clip (its motion is exactly zero),
    nor for any token whose patch did not change since the previous frame (frame 0 included), but changes the
    experts chosen for a share of the moving patches. Freshly initialised model (adaLN-Zero: the router's token
    input has unit RMS, as its motion input has; randomised modulations would drown the motion)."""
    torch.manual_seed(0)
    model = VideoMoEDiT(TINY)
    moving = _panning_clip()
    static = moving[:, :, :1].expand(moving.shape).contiguous()
    moved = (frame_motion(video_patchify(moving, 2), 16)[0] != 0).any(-1)  # (tokens,) patch changed
    assert not moved[:16].any() and moved.sum() == 80  # 5 frames x 16 patches, all but 16 that wrapped onto equals
    routes = {name: _routing(model, clip) for name, clip in (("static", static), ("moving", moving))}
    with torch.no_grad():
        model.motion_embed.weight.zero_()
    blind = {name: _routing(model, clip) for name, clip in (("static", static), ("moving", moving))}
    assert torch.equal(routes["static"], blind["static"])
    changed = (routes["moving"] != blind["moving"]).any(-1)
    assert not changed[~moved].any()
    share = float(changed[moved].float().mean())
    _note("share of moving tokens routed differently when the router is blind to motion", share)
    assert share > 0.1
    static_vs_moving = float((routes["static"] != routes["moving"]).any(-1)[16:].float().mean())
    _note("share of tokens (frames >= 1) routed differently, static vs panning clip", static_vs_moving)


def test_same_seed_same_generated_latents_and_size_errors():
    model = _model(seed=22)
    cond = _cond(1)
    for sampler in ("euler", "heun"):
        runs = [
            generate_video(
                model,
                (1, CHANNELS, 4, 4, 4),
                cond,
                generator=torch.Generator().manual_seed(seed),
                steps=2,
                guidance_scale=3.0,
                sampler=sampler,
            )  # fmt: skip
            for seed in (5, 5, 6)
        ]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match=r"^latents have 5 frames: not a whole number of chunks of chunk_frames = 2 "
                                         r"latent frames; use a multiple of 2 \(e.g. 4\)$"):  # fmt: skip
        model(_randn(1, CHANNELS, 5, 4, 4), torch.rand(1), cond)
    with pytest.raises(ValueError, match=r"^latent frames of 7x4 do not split into 2x2 patches: [^\n]*$"):
        generate_video(model, (1, CHANNELS, 4, 7, 4), cond, generator=torch.Generator(), steps=1)
    with pytest.raises(ValueError, match=r"^latents have 3 channels; [^\n]*latent_channels = 4$"):
        model(_randn(1, 3, 4, 4, 4), torch.rand(1), cond)
    with pytest.raises(ValueError, match=r"^t has shape \(1, 3\); expected \(batch,\) = \(1,\) or \(batch, chunks\) "
                                         r"= \(1, 2\)[^\n]*$"):  # fmt: skip
        model(_randn(1, CHANNELS, 4, 4, 4), torch.rand(1, 3), cond)


def test_gradient_reaches_every_parameter():
    model = _model(seed=23, cfg=replace(TINY, cfg_dropout=0.5))
    x0, cond = _randn(4, CHANNELS, 6, 4, 4, seed=24), _cond(4)
    loss = video_flow_loss(model, x0, cond, torch.Generator().manual_seed(25))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_routers_are_motion_routed_and_found_by_the_expert_balancer():
    model = _model(seed=26).train()
    balancer = ExpertBalancer(model)
    assert balancer.names == ["dual_layers.0.img_ffn.router", "single_layers.0.ffn.router"]
    assert balancer.families == ["video_gen"]
    assert all(isinstance(m, MotionRoutedMoE) for m in (model.dual_layers[0].img_ffn, model.single_layers[0].ffn))
    assert model.dual_layers[0].img_ffn.router.weight.shape == (4, HIDDEN + TINY.motion_dim)
    model(_randn(2, CHANNELS, 4, 4, 4, seed=27), torch.rand(2, 2), _cond()).sum().backward()
    before = [b.clone() for b in balancer.biases("video_gen")]
    load = balancer.update()["video_gen"]
    video_tokens, text_tokens = 2 * 4 * 4, 5 + 3
    assert load.sum(dim=1).tolist() == [2 * video_tokens, 2 * (video_tokens + text_tokens)]  # top-2
    assert any(not torch.equal(a, b) for a, b in zip(before, balancer.biases("video_gen"), strict=True))


TP_CFG = replace(TINY, dual_layers=2, single_layers=1)


def _tp_step(model, latents, t, cond, drop, weights):
    out = model(latents, t, cond, drop)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tp_body(full_state, inputs):
    from xoron_dist.model.generation.video_sharding import tensor_plan
    from xoron_dist.parallel import state
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    ctx = state.initialize(load_config(None, ["preset=tiny", "parallel.tp=2"]))
    model = VideoMoEDiT(TP_CFG)
    model.load_state_dict(full_state)
    apply_tensor_parallel(model, tensor_plan(TP_CFG), ctx.rank, 2)
    out, grads = _tp_step(model, *inputs)
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}  # fmt: skip
    return {"out": out, "grads": grads, "meta": meta}


@pytest.mark.multirank
def test_tp2_equals_single_rank():
    start = time.perf_counter()
    single = _model(seed=28, cfg=TP_CFG)
    full_state = {k: v.clone() for k, v in single.state_dict().items()}
    inputs = (_randn(2, CHANNELS, 4, 4, 4, seed=29), torch.tensor([[0.3, 0.8], [0.5, 0.1]]), _cond(),
              torch.tensor([False, True]), _randn(2, CHANNELS, 4, 4, 4, seed=30))  # fmt: skip
    ref_out, ref_grads = _tp_step(single, *inputs)
    for rank, got in enumerate(run_ranks(_tp_body, 2, full_state, inputs)):
        torch.testing.assert_close(got["out"], ref_out, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        for name, grad in got["grads"].items():
            split, dim, stride = got["meta"][name]
            ref = tp_slice(ref_grads[name], dim, stride, rank, 2) if split else ref_grads[name]
            scale = max(float(ref.abs().max()), 1.0)
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale, msg=f"rank {rank} grad of {name}")
    _note("TP=2 test seconds", time.perf_counter() - start)
