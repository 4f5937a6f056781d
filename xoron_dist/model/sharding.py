"""The tensor-parallel plan of a whole model, composed from the plans beside each component.

``tensor_plan(model, cfg)`` returns module-name pattern -> ``TensorSplit`` for an ``XoronLLM``
(its own plan) or an ``XoronMultimodalModel`` (the LLM's under ``llm.``, each understood medium's
encoder and projector under their names in the modality table, each generator under its name, the
fusion layers under ``fusion.``). ``xoron_dist.parallel.tensor`` applies it.
"""

from __future__ import annotations

from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.common.sharding import TensorPlan, nest, perceiver_plan
from xoron_dist.model.fusion.sharding import tensor_plan as fusion_plan
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.sharding import tensor_plan as llm_plan


def tensor_plan(model: nn.Module, cfg: XoronConfig) -> TensorPlan:
    split_experts = cfg.parallel.tp_experts
    if isinstance(model, XoronLLM):
        return llm_plan(cfg.llm, split_experts)
    plan = dict(nest("llm", llm_plan(cfg.llm, split_experts)))
    for row in model.media:
        encoder = getattr(model, row.encoder)
        if encoder is not None:  # None on a pipeline stage after the first (the encoders sit on stage 0)
            plan.update(nest(row.encoder, row.tensor_plan(cfg, encoder)))
        plan.update(nest(row.projector, perceiver_plan(cfg.llm.hidden_size, cfg.model.projector.num_heads)))
    for row in model.generators:
        plan.update(nest(row.generator, row.generator_plan(cfg)))
    if model.fusion is not None:
        plan.update(nest("fusion", fusion_plan(cfg.model.fusion, cfg.llm.hidden_size)))
    return plan


def checkpoint_blocks() -> tuple[type, ...]:
    """The blocks activation checkpointing recomputes: decoder layers and the encoders' blocks."""
    from xoron_dist.model.llm import DecoderLayer
    from xoron_dist.model.video.encoder import VideoLayer
    from xoron_dist.model.vision.blocks import VisionBlock

    return (DecoderLayer, VisionBlock, VideoLayer)


def zero3_leaves() -> tuple[type, ...]:
    """Modules ZeRO-3 gathers whole: MoE blocks, whose data-dependent expert calls would break its
    prefetch trace."""
    from xoron_dist.model.common.moe import MoEFeedForward
    from xoron_dist.model.video.encoder import MotionAwareMoE

    return (MoEFeedForward, MotionAwareMoE)
