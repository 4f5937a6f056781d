"""Video encoders: 3D-RoPE relativity, exact temporal causality, motion-aware routing, frame/size handling;
the tower mode's T x k tokens, its causality, its shared tower's gradients, its config errors and TP=2."""

from dataclasses import replace

import pytest
import torch

from tests.model.test_xoron_multimodal import TINY as TINY_MULTIMODAL  # vision 32 wide on 4 px patches, video 24
from xoron_dist.config import VideoConfig, VisionConfig, load_config
from xoron_dist.model.common.rope_nd import apply_axial_rope
from xoron_dist.model.video import TowerVideoEncoder, VideoEncoder, frames_to_patches, sample_frames
from xoron_dist.model.vision import VisionTower

CFG = VideoConfig(enabled=True, hidden_size=24, num_layers=2, num_heads=2, patch_size=4, min_frames=1, max_frames=8,
                  min_resolution=8, max_resolution=16, temporal_experts=4, temporal_top_k=2,
                  expert_intermediate_size=32, motion_dim=8)




def _video(frames, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, height, width, 3), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VideoEncoder(CFG).eval()


def test_3d_rope_scores_depend_only_on_relative_offsets(encoder):
    attn = encoder.layers[0].attn
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 18, CFG.hidden_size, generator=gen)
    q, k = (proj(x).view(1, 18, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    coords = torch.randint(0, 6, (1, 18, 3), generator=gen)

    def scores(c):
        cos, sin = encoder.rope(c)
        return apply_axial_rope(q, cos, sin) @ apply_axial_rope(k, cos, sin).transpose(-1, -2)

    base = scores(coords)
    shifted = scores(coords + torch.tensor([7, -3, 11]))  # move every token in time and space
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-5)
    moved = coords.clone()
    moved[0, 0, 0] += 1  # one token one frame later: its relative offsets change, and so do its scores
    assert not torch.allclose(scores(moved)[..., 0, :], base[..., 0, :], atol=1e-3)


@pytest.mark.parametrize("frames", [1, 5, 7])
def test_odd_frame_counts_and_non_square_frames(encoder, frames):
    features, mask = encoder([_video(frames, 16, 12, seed=frames)])
    assert features.shape == (1, frames * 4 * 3, CFG.hidden_size)  # 16x12 px -> 4x3 patches per frame
    assert bool(mask.all()) and bool(torch.isfinite(features).all())


def test_changing_frame_k_leaves_earlier_frames_exactly_unchanged(encoder):
    video, other = _video(5, 16, 12, seed=2), _video(3, 16, 16, seed=3)
    per_frame = 4 * 3
    base, _ = encoder([video, other])
    for k in range(5):
        changed = video.clone()
        changed[k] = _video(1, 16, 12, seed=10 + k)[0]
        out, _ = encoder([changed, other])
        assert torch.equal(out[0, : k * per_frame], base[0, : k * per_frame]), k
        frame_k = slice(k * per_frame, (k + 1) * per_frame)
        assert not torch.allclose(out[0, frame_k], base[0, frame_k])  # while frame k itself changes
        assert torch.equal(out[1], base[1]), k  # the other video of the batch never sees it
    alone, _ = encoder([video])  # and a video's features do not depend on the batch's padding
    assert torch.equal(alone[0], base[0, : alone.shape[1]])


def test_router_reads_motion():
    torch.manual_seed(0)
    moe = VideoEncoder(CFG).layers[0].ffn
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, CFG.hidden_size, generator=gen)
    still = torch.zeros(64, CFG.motion_dim)
    moving = torch.randn(64, CFG.motion_dim, generator=gen) * 3
    chosen_still, _ = moe.router(torch.cat((x, moe.motion_norm(still)), dim=-1))
    chosen_moving, _ = moe.router(torch.cat((x, moe.motion_norm(moving)), dim=-1))
    assert not torch.equal(chosen_still.sort(dim=-1).values, chosen_moving.sort(dim=-1).values)
    # same content, different motion: the layer's output differs only through the routing
    assert not torch.allclose(moe(x, still), moe(x, moving))


def test_motion_is_the_patch_difference_with_the_previous_frame():
    static = _video(1, 8, 8, seed=5).expand(4, -1, -1, -1).contiguous()  # four identical frames
    patches, coords = frames_to_patches(static, CFG)
    assert coords[:, 0].tolist() == [t for t in range(4) for _ in range(4)]
    torch.manual_seed(0)
    enc = VideoEncoder(CFG).train()
    seen = []
    enc.layers[0].ffn.router.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    enc([static])
    router_motion = seen[0][:, CFG.hidden_size:]
    # RMSNorm of a zero motion embedding is zero: a static clip routes on content alone
    assert torch.equal(router_motion, torch.zeros_like(router_motion))


def test_frames_are_subsampled_and_resized_into_the_configured_range():
    patches, coords = frames_to_patches(_video(40, 48, 24, seed=6), CFG)
    # 40 frames -> max_frames 8; longer side 48 -> max_resolution 16 (aspect kept: 16x8) -> 4x2 patches
    assert coords[:, 0].max().item() == CFG.max_frames - 1
    assert patches.shape == (8 * 4 * 2, 3 * CFG.patch_size**2)
    small, _ = frames_to_patches(_video(2, 4, 6, seed=7), CFG)  # longer side 6 -> min_resolution 8: 5x8 -> 2x2
    assert small.shape[0] == 2 * 2 * 2
    assert float(patches.abs().max()) <= 1.0


def test_expert_load_counts_real_tokens_and_balances_biases():
    from xoron_dist.train.expert_balance import ExpertBalancer

    torch.manual_seed(0)
    enc = VideoEncoder(CFG).train()
    balancer = ExpertBalancer(enc)
    assert balancer.families == ["video"]
    enc([_video(3, 16, 12, seed=8), _video(2, 8, 8, seed=9)])  # 36 + 8 real tokens, padded to 36 each
    assert [load.sum().item() for load in balancer.load] == [44.0 * CFG.temporal_top_k] * CFG.num_layers
    load = balancer.update()["video"]  # at the encoder's own rate (model.video.bias_update_rate)
    assert load.sum().item() == 44 * CFG.temporal_top_k * CFG.num_layers
    assert all(total.sum().item() == 0 for total in balancer.load)
    for router, layer_load in zip(balancer.routers, load, strict=True):
        busiest, idlest = int(layer_load.argmax()), int(layer_load.argmin())
        if layer_load[busiest] > layer_load[idlest]:
            assert router.expert_bias[busiest] < router.expert_bias[idlest]


# --------------------------------------------------------------------------- frame_encoder: tower

VISION = VisionConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=16,
                      patch_size=4, max_patches=16)
TOWER_CFG = replace(CFG, frame_encoder="tower", tokens_per_frame=3)


def _tower_encoder(seed=0, frames=None):
    torch.manual_seed(seed)
    tower = VisionTower(VISION)
    encoder = TowerVideoEncoder(TOWER_CFG, VISION.hidden_size, frames=frames)
    encoder.use_tower(tower)
    return tower.eval(), encoder.eval()


def test_tower_encoder_emits_k_tokens_per_frame():
    _, encoder = _tower_encoder()
    # 5 frames of 16x12 px and 3 of 8x8 (the tower's native grids differ: patches are padded per frame)
    features, mask = encoder([_video(5, 16, 12, seed=20), _video(3, 8, 8, seed=21)])
    k = TOWER_CFG.tokens_per_frame
    assert features.shape == (2, 5 * k, TOWER_CFG.hidden_size)
    assert mask.sum(dim=1).tolist() == [5 * k, 3 * k] and bool(mask[1, : 3 * k].all())
    assert bool(torch.isfinite(features).all())
    _, fixed = _tower_encoder(frames=4)  # the model's setting: every clip resampled to T = 4 frames
    features, mask = fixed([_video(9, 16, 12, seed=22), _video(1, 8, 8, seed=23)])
    assert features.shape[1] == 4 * k and mask.sum(dim=1).tolist() == [4 * k, 4 * k]
    assert sample_frames(_video(9, 4, 4, seed=24), 4, 8).shape[0] == 4
    assert sample_frames(_video(20, 4, 4, seed=24), None, 8).shape[0] == TOWER_CFG.max_frames


def test_tower_encoder_changing_frame_k_leaves_earlier_frames_exactly_unchanged():
    _, encoder = _tower_encoder()
    video, other = _video(5, 16, 12, seed=25), _video(3, 16, 16, seed=26)
    k = TOWER_CFG.tokens_per_frame
    with torch.no_grad():
        base, _ = encoder([video, other])
        for frame in range(5):
            changed = video.clone()
            changed[frame] = _video(1, 16, 12, seed=30 + frame)[0]
            out, _ = encoder([changed, other])
            assert torch.equal(out[0, : frame * k], base[0, : frame * k]), frame
            assert not torch.allclose(out[0, frame * k: (frame + 1) * k], base[0, frame * k: (frame + 1) * k])
            assert torch.equal(out[1], base[1]), frame  # the other video of the batch never sees it
        alone, _ = encoder([other])  # nor does a video depend on the batch's padding (frames, patches)
    torch.testing.assert_close(alone[0], base[1, : alone.shape[1]], rtol=1e-5, atol=1e-5)


def test_tower_encoder_routes_on_feature_motion():
    _, encoder = _tower_encoder()
    seen = []
    encoder.layers[0].ffn.router.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        encoder([_video(1, 8, 8, seed=27).expand(3, -1, -1, -1).contiguous()])  # a still clip
        encoder([_video(3, 8, 8, seed=28)])  # a moving one
    still, moving = (s[:, TOWER_CFG.hidden_size:] for s in seen)
    assert torch.equal(still, torch.zeros_like(still))  # no motion anywhere in a still clip
    assert torch.equal(moving[:4], torch.zeros_like(moving[:4])) and bool(moving[4:].abs().sum() > 0)


TOWER_MODEL = [*TINY_MULTIMODAL, "model.video.frame_encoder=tower", "model.video.tokens_per_frame=2",
               "data.video_tokens=6"]


@pytest.mark.parametrize("seed_path", [False, True], ids=["tower", "tower-with-compressor"])
def test_model_shares_the_vision_tower_and_its_gradients_reach_it(seed_path):
    """With the vision seed path on, images get k compressed tokens but video frames keep the patch grid."""
    from xoron_dist.model.xoron import XoronMultimodalModel

    torch.manual_seed(0)
    extra = ["model.vision.compressor_tokens=3", "model.vision.dual_stream_layers=1"] if seed_path else []
    model = XoronMultimodalModel(load_config(None, [*TOWER_MODEL, *extra]))
    assert model.video.tower is model.vision
    assert not [n for n, _ in model.named_parameters() if n.startswith("video.tower")]  # the tower lives once
    assert not [n for n in model.state_dict() if n.startswith("video.") and "patch_embed" in n]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 200, (1, 12), generator=gen)
    videos = [_video(4, 16, 12, seed=40)]
    seen = []  # what the tower hands the video encoder: the patch grid, never the compressed tokens
    hook = model.vision.register_forward_hook(
        lambda m, args, kwargs, o: seen.append((len(args[0]), o.features.shape[1], int(o.grids[0].prod()))),
        with_kwargs=True)
    out = model(ids, labels=ids, videos=videos, video_spans=torch.tensor([[0, 2, 6]]))
    hook.remove()
    frames = [(tokens, grid) for count, tokens, grid in seen if count == 3]  # the clip's 3 sampled frames
    assert frames and all(tokens == grid for tokens, grid in frames)
    out.loss.backward()
    tower_grads = [p.grad for n, p in model.named_parameters() if n.startswith("vision.encoder.")]
    assert tower_grads and all(g is not None for g in tower_grads)
    assert sum(float(g.abs().sum()) for g in tower_grads) > 0
    assert float(model.video.in_proj.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="data.video_tokens"):  # a span packed with another length
        model(ids, labels=ids, videos=videos, video_spans=torch.tensor([[0, 2, 4]]))


def test_tower_mode_config_errors_are_one_line_and_name_the_fix():
    from xoron_dist.model.video import tower_clip_frames
    from xoron_dist.utils.typed_config import ConfigError

    with pytest.raises(ConfigError, match="model.vision.enabled: true"):
        tower_clip_frames(load_config(None, [*TOWER_MODEL, "model.vision.enabled=false"]))
    with pytest.raises(ConfigError, match=r"data.video_tokens.*multiple of 2 in \[2, 16\]"):
        tower_clip_frames(load_config(None, [*TOWER_MODEL, "data.video_tokens=7"]))
    assert tower_clip_frames(load_config(None, TOWER_MODEL)) == 3


def test_tower_mode_hashes_apart_and_own_mode_keeps_the_hash():
    from xoron_dist.train.checkpoint import config_hash

    own = config_hash(load_config(None, TINY_MULTIMODAL))
    assert config_hash(load_config(None, [*TINY_MULTIMODAL, "model.video.frame_encoder=own",
                                          "model.video.tokens_per_frame=64"])) == own
    assert config_hash(load_config(None, TOWER_MODEL)) != own


def _tp_video_body(state_dict, videos, weights):
    from xoron_dist.parallel import state
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    ctx = state.initialize(load_config(None, ["preset=tiny", "parallel.tp=2"]))
    pair = _TowerPair()
    pair.load_state_dict(state_dict)
    assert apply_tensor_parallel(pair, pair.plan(), ctx.rank, 2) > 0
    out, grads = _tp_step(pair, videos, weights)
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in pair.named_parameters()}
    return out, grads, meta


class _TowerPair(torch.nn.Module):
    """The tower and the video encoder that uses it, in one tree (as in the model)."""

    def __init__(self):
        super().__init__()
        self.vision, self.video = _tower_encoder()
        self.video.train()

    def plan(self):
        from xoron_dist.model.common.sharding import nest
        from xoron_dist.model.video.sharding import tensor_plan
        from xoron_dist.model.vision.sharding import tensor_plan as vision_plan

        return {**nest("vision", vision_plan(VISION)), **nest("video", tensor_plan(TOWER_CFG, factorised=True))}


def _tp_step(pair, videos, weights):
    out, _ = pair.video(videos)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in pair.named_parameters() if p.grad is not None}


@pytest.mark.multirank
def test_tower_encoder_tp2_equals_single_rank():
    from tests.parallel.harness import run_ranks
    from xoron_dist.parallel.tensor import tp_slice

    videos = [_video(3, 16, 12, seed=50), _video(2, 8, 8, seed=51)]
    pair = _TowerPair()
    weights = torch.randn(2, 3 * TOWER_CFG.tokens_per_frame, TOWER_CFG.hidden_size,
                          generator=torch.Generator().manual_seed(52))
    ref_out, ref_grads = _tp_step(pair, videos, weights)
    plan = pair.plan()
    assert {p for p in plan if p.startswith("video.")} >= {"video.layers.*.spatial.q_proj",
                                                           "video.layers.*.temporal.out_proj",
                                                           "video.compress.attn.q_proj"}
    for rank, (out, grads, meta) in enumerate(run_ranks(_tp_video_body, 2, pair.state_dict(), videos, weights)):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        assert set(grads) == set(ref_grads) and any(split for split, _, _ in meta.values())
        for name, grad in grads.items():
            split, dim, stride = meta[name]
            ref = tp_slice(ref_grads[name], dim, stride, rank, 2) if split else ref_grads[name]
            scale = max(float(ref.abs().max()), 1.0)
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale, msg=f"rank {rank} grad {name}")
