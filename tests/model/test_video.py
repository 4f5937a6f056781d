"""Video encoder: 3D-RoPE relativity, exact temporal causality, motion-aware routing, frame/size handling."""

import pytest
import torch

from xoron_dist.config import VideoConfig
from xoron_dist.model.common.rope_nd import apply_axial_rope
from xoron_dist.model.video import VideoEncoder, frames_to_patches

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
