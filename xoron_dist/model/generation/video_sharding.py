"""Tensor-parallel plan of the video generator: the image generator's plan (``generation.sharding``), unchanged.

``VideoMoEDiT`` keeps the image generator's module names, and its ``MotionRoutedMoE`` the names of a
``MoEFeedForward`` (``router``, ``experts``, ``shared``), so every pattern of the image plan matches
the same modules: q/k/v split by heads, out_proj by rows, QK-norm weights entering through
``weight_entry``, dense FFNs and shared experts on their intermediate dim, routed experts too (or
whole, for expert parallelism, which spreads every ``MoEFeedForward``, these included).

What the video adds stays whole on every rank: ``motion_embed`` (C·p² -> motion_dim, small) and each
router's ``motion_norm``; the router reads whole tokens and whole motion, so its gradient and the
motion path's are complete on every rank, as the image routers' are. The cached keys/values of the
text and of past chunks are per rank, for the heads the rank holds (attention reads its local head
count off its q projection), so generation needs no communication beyond the blocks' own.
"""

from __future__ import annotations

from xoron_dist.config.video_generation import VideoDiTConfig
from xoron_dist.model.common.sharding import TensorPlan
from xoron_dist.model.generation.sharding import tensor_plan as image_tensor_plan


def tensor_plan(cfg: VideoDiTConfig, split_experts: bool = True) -> TensorPlan:
    """The video generator's plan: ``generation.sharding.tensor_plan`` (see the module docstring)."""
    return image_tensor_plan(cfg, split_experts)
