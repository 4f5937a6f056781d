"""Video understanding: ``encoder`` (per-frame patches, 3D-RoPE, causal in time, motion-routed
temporal MoE) and ``sharding`` (its tensor-parallel plan)."""

from xoron_dist.model.video.encoder import VideoEncoder, frames_to_patches

__all__ = ["VideoEncoder", "frames_to_patches"]
