"""How tensor and expert parallelism split each multimodal part's parameters, read off the model on meta.

The parts are those of ``xoron_dist.model.summary.multimodal_parts`` (encoders and projectors of the
understood media, fusion layers, generators). ``part_splits(cfg)`` builds ``XoronMultimodalModel``
on the meta device (shapes only: no memory, no init cost beyond a second) and groups every part's
parameters by what parallelism does with them:

    tensor parallel   the module-name patterns of ``xoron_dist.model.sharding.tensor_plan``, matched as
                      ``parallel/tensor.py`` matches them; the split dim per kind as its swaps cut it:
                      colwise weight and bias dim 0, rowwise weight dim 1 (bias whole), routed experts
                      ``gate_up`` dim 1 (gate and up blocks apart) and ``down`` dim 2
    expert parallel   the routed experts of every ``MoEFeedForward`` (``parallel/experts.py`` spreads
                      each over the ep ranks: the generators' DiT MoEs and the LLM's); the video
                      encoder's ``MotionAwareMoE`` is no ``MoEFeedForward`` and stays whole

The result is plain data; ``xoron_dist.plan.parts`` does the per-layout arithmetic on it.
It sits in ``parallel/`` because it reads what ``parallelize`` would do to the model; the planner
(``xoron_dist.plan``, which never imports the model) takes the plain data it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xoron_dist.config import XoronConfig
from xoron_dist.model.modalities import generated, understood

if TYPE_CHECKING:  # torch only where the model is built
    from torch import nn


@dataclass(frozen=True)
class SplitTensors:
    """Parameters of one part that parallelism treats alike: ``numel`` elements in all, the largest
    tensor ``largest``. ``extent``/``unit``: the tensor-parallel split dim's length (per fused block)
    and the block it must split between (``extent`` 0: not split; ``what`` names the blocks).
    ``experts``: the expert count of an ``MoEFeedForward``'s stacked routed experts (0: not split by
    EP). ``where``: one of the parameters' names, for messages."""

    extent: int
    unit: int
    experts: int
    numel: int
    largest: int
    where: str
    what: str = ""


def builds_multimodal_model(cfg: XoronConfig) -> bool:
    """Whether the trainer builds ``XoronMultimodalModel`` for ``cfg``: an encoder or generator
    enabled, and Arrow data (``train/build.py``: synthetic text trains the LLM alone)."""
    return cfg.data.source == "arrow" and bool(understood(cfg) or generated(cfg))


def build_on_meta(cfg: XoronConfig) -> nn.Module:
    """``XoronMultimodalModel`` of ``cfg`` on the meta device (no pretrained vision weights read)."""
    import torch

    from xoron_dist.model.xoron import XoronMultimodalModel

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vision=dataclasses.replace(cfg.model.vision, pretrained_path=None)))
    with torch.device("meta"):
        return XoronMultimodalModel(cfg)


def part_names(model: nn.Module) -> list[str]:
    """The parts of a ``XoronMultimodalModel``, in ``multimodal_parts``' order."""
    names = [name for row in model.media for name in (row.encoder, row.projector)]
    names += ["fusion"] if model.fusion is not None else []
    return names + [row.generator for row in model.generators]


def part_splits(cfg: XoronConfig) -> list[tuple[str, tuple[SplitTensors, ...]]]:
    """(part, its parameters grouped by split) for every part of ``cfg``'s model; empty without any."""
    if not builds_multimodal_model(cfg):
        return []
    from xoron_dist.model.common.moe import MoEFeedForward
    from xoron_dist.model.common.sharding import match_plan
    from xoron_dist.model.sharding import tensor_plan

    model = build_on_meta(cfg)
    names = part_names(model)
    plan = {pattern: split for pattern, split in tensor_plan(model, cfg).items()
            if pattern.split(".", 1)[0] in names}  # the LLM's own plan is the planner's arithmetic
    splits: dict[int, tuple[int, int, str]] = {}  # id(param) -> (extent per block, unit, what)
    for name, module, split in match_plan(model, plan):
        for param, dim, blocks in _split_parameters(name, module, split.kind):
            splits[id(param)] = (param.shape[dim] // blocks, split.unit, split.what)
    experts = {id(p): moe.experts.num_experts for moe in model.modules() if isinstance(moe, MoEFeedForward)
               for p in moe.experts.parameters()}
    found = []
    for part in names:
        groups: dict[tuple[int, int, int], SplitTensors] = {}
        for name, param in getattr(model, part).named_parameters():
            extent, unit, what = splits.get(id(param), (0, 1, ""))
            key = (extent, unit, experts.get(id(param), 0))
            old = groups.get(key, SplitTensors(extent, unit, key[2], 0, 0, name, what))
            groups[key] = dataclasses.replace(old, numel=old.numel + param.numel(),
                                              largest=max(old.largest, param.numel()))
        found.append((part, tuple(groups.values())))
    return found


def _split_parameters(name: str, module: nn.Module, kind: str) -> list[tuple[nn.Parameter, int, int]]:
    """(parameter, split dim, fused blocks) of each weight ``parallel/tensor.py`` splits for ``kind``."""
    if kind == "colwise":
        return [(p, 0, 1) for p in (module.weight, module.bias) if p is not None]
    if kind == "rowwise":
        return [(module.weight, 1, 1)]
    if kind == "experts":
        return [(module.gate_up, 1, 2), (module.down, 2, 1)]
    if kind in ("enter", "leave"):
        return []
    raise ValueError(f"sharding plan: {name} is split as '{kind}', which only the LLM's vocabulary uses; "
                     "xoron_dist.parallel.part_splits knows the colwise, rowwise and experts splits of the parts")


__all__ = ["SplitTensors", "build_on_meta", "builds_multimodal_model", "part_names", "part_splits"]
