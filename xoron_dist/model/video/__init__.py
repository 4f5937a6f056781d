"""Video understanding: ``encoder`` (``frame_encoder: own``: per-frame patches, 3D-RoPE, block-causal
in time, motion-routed temporal MoE), ``factorised`` (``frame_encoder: tower``: frames through the
vision tower, factorised spatial / causal temporal layers with the same MoE, k tokens per frame) and
``sharding`` (their tensor-parallel plans)."""

from xoron_dist.model.video.encoder import VideoEncoder, frames_to_patches
from xoron_dist.model.video.factorised import (
    TowerVideoEncoder,
    VideoTokenProjector,
    sample_frames,
    tower_clip_frames,
    tower_clip_sizes,
)

__all__ = ["TowerVideoEncoder", "VideoEncoder", "VideoTokenProjector", "frames_to_patches", "sample_frames",
           "tower_clip_frames", "tower_clip_sizes"]
