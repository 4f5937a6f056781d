"""Video encoder memory: the tower mode (factorised, k tokens a frame) vs today's own encoder (dense T·h·w mask).

One 32-frame 384x384 clip through each encoder's forward, at a reduced width (the same video width,
heads, layers and temporal MoE for both; fp32; batch 1):

    own     ``VideoEncoder``: 16 px patches -> 24² = 576 a frame, 18,432 tokens in one block-causal
            attention with a dense (1, 1, n, n) mask. The peer (the code before).
    tower   ``TowerVideoEncoder``: every frame through a SigLIP-geometry vision tower (14 px patches,
            384 px -> 27² = 729 a frame, native resize with max_patches 729), then factorised
            spatial / causal temporal layers and k = 64 tokens a frame. Ours; its peak includes
            the tower's.

Peak memory: ``tests.plan.memory_meter.LiveTensorMeter``, the peak of live tensor bytes during the
call minus the bytes alive before it (weights and the input clip excluded): deterministic, no
allocator noise; buffers an ATen kernel keeps to itself (SDPA's blocked scores) are not tensors
and are not counted, for either encoder. Two modes: ``inference`` (``torch.no_grad``) and
``training`` (grad enabled: the activations kept for backward, up to the forward's end). The
dense mask's bytes are also given analytically (n² bool).

    python -m bench.video_encoder_memory [--frames 32] [--size 384] [--width 96] [--layers 1]

Writes bench/out/video_encoder_memory.json. Headline: the inference forward's peak, ratio = own/tower
(lower is better; goal >= 4x, the n² mask gone); the training forward's ratio is beside it (there the
activations kept for backward, which grow with the token count, not with its square, weigh more).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine, write_result
from tests.plan.memory_meter import LiveTensorMeter
from xoron_dist.config import VideoConfig, VisionConfig
from xoron_dist.model.video import TowerVideoEncoder, VideoEncoder
from xoron_dist.model.vision import VisionTower

MIB = 2**20


def build(args) -> tuple[VideoEncoder, TowerVideoEncoder, VisionTower]:
    video = VideoConfig(enabled=True, hidden_size=args.width, num_layers=args.layers, num_heads=4, patch_size=16,
                        min_frames=1, max_frames=args.frames, min_resolution=128, max_resolution=args.size,
                        temporal_experts=4, temporal_top_k=2, expert_intermediate_size=2 * args.width,
                        motion_dim=16)
    vision = VisionConfig(enabled=True, hidden_size=args.width, num_layers=args.layers, num_heads=4,
                          intermediate_size=2 * args.width, image_size=args.size, patch_size=14,
                          max_patches=(args.size // 14) ** 2)
    torch.manual_seed(0)
    own = VideoEncoder(video).eval()
    tower = VisionTower(vision).eval()
    ours = TowerVideoEncoder(VideoConfig(**{**video.__dict__, "frame_encoder": "tower", "tokens_per_frame": 64}),
                             vision.hidden_size).eval()
    ours.use_tower(tower)
    return own, ours, tower


def measure(encoder, clip: torch.Tensor, grad: bool) -> tuple[float, float, tuple[int, ...]]:
    """(peak MiB above the bytes alive before, seconds, output shape) of one forward."""
    with torch.set_grad_enabled(grad), LiveTensorMeter() as meter:
        start = time.perf_counter()
        features, _ = encoder([clip])
        seconds = time.perf_counter() - start
        shape = tuple(features.shape)
        del features
    return (meter.peak - meter.baseline) / MIB, seconds, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()
    own, ours, _ = build(args)
    clip = torch.randint(0, 256, (args.frames, args.size, args.size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    own_tokens = args.frames * (args.size // 16) ** 2
    rows = {}
    print(f"{'mode':<10} {'encoder':<6} {'peak MiB':>10} {'seconds':>8}  output")
    for mode, grad in (("inference", False), ("training", True)):
        rows[mode] = {}
        for name, encoder in (("own", own), ("tower", ours)):
            peak, seconds, shape = measure(encoder, clip, grad)
            rows[mode][name] = {"peak_mib": round(peak, 1), "seconds": round(seconds, 2), "output": list(shape)}
            print(f"{mode:<10} {name:<6} {peak:>10.1f} {seconds:>8.2f}  {shape}")
    ratios = {mode: round(r["own"]["peak_mib"] / r["tower"]["peak_mib"], 2) for mode, r in rows.items()}
    print(f"peak ratio own/tower: {ratios}; own's dense mask alone: {own_tokens**2 / MIB:.0f} MiB")
    result = {
        "metric": f"peak live tensor memory of one forward (no_grad) of a {args.frames}-frame {args.size} px clip "
                  "(fp32, reduced width), the tower mode (per-frame tower, factorised causal layers, 64 tokens a "
                  "frame) vs today's own encoder (block-causal attention over all T*h*w tokens, dense mask); "
                  "lower is better, ratio = peer/ours",
        "unit": "MiB",
        "ours": rows["inference"]["tower"]["peak_mib"],
        "peer": rows["inference"]["own"]["peak_mib"],
        "peer_name": "VideoEncoder (frame_encoder: own, the code before)",
        "ratio": ratios["inference"],
        "goal": 4.0,
        "machine": machine(),
        "config": {"frames": args.frames, "size": args.size, "width": args.width, "layers": args.layers,
                   "heads": 4, "own_patch": 16, "tower_patch": 14, "tokens_per_frame": 64, "dtype": "float32"},
        "own_tokens": own_tokens,
        "own_dense_mask_mib": round(own_tokens**2 / MIB, 1),
        "tower_patches_per_frame": (args.size // 14) ** 2,
        "ratio_by_mode": ratios,
        "rows": rows,
    }
    print(f"wrote {write_result('video_encoder_memory', result)}")


if __name__ == "__main__":
    main()
