"""Parameter counts per component, for ``xoron build`` (works on the meta device: no memory)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from xoron_dist.config import LLMConfig, XoronConfig
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.modalities import generated, understood
from xoron_dist.model.xoron import XoronMultimodalModel

# Component of a parameter, by the first matching fragment of its name.
_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("embed_tokens.", "embedding"),
    ("lm_head.", "lm head"),
    (".attn.", "attention (MLA)"),
    (".ffn.router.", "routers"),
    (".ffn.experts.", "routed experts"),
    (".ffn.shared.", "shared experts"),
    (".ffn.", "dense FFN"),
    ("norm.", "norms"),
)


@dataclass
class ParameterSummary:
    rows: list[tuple[str, int]]  # (component, parameters), in model order
    total: int
    active_per_token: int  # what one token touches: all but the routed experts it was not sent to

    def format(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = [f"{name:<{width}}  {count:>15,}" for name, count in self.rows]
        lines.append("-" * (width + 17))
        lines.append(f"{'total':<{width}}  {self.total:>15,}")
        lines.append(f"{'active per token':<{width}}  {self.active_per_token:>15,}")
        return "\n".join(lines)


def component_of(name: str) -> str:
    for fragment, component in _COMPONENTS:
        if fragment in f".{name}":
            return component
    return "other"


def summarize(model: nn.Module, cfg: LLMConfig) -> ParameterSummary:
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied embedding / LM head counted once
            continue
        seen.add(id(param))
        component = component_of(name)
        counts[component] = counts.get(component, 0) + param.numel()
    total = sum(counts.values())
    routed = counts.get("routed experts", 0)
    active = total - routed + routed * cfg.moe.top_k // cfg.moe.num_experts
    return ParameterSummary(rows=list(counts.items()), total=total, active_per_token=active)


def build_on_meta(cfg: LLMConfig) -> XoronLLM:
    """The model with every tensor on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        return XoronLLM(cfg)


def multimodal_parts(cfg: XoronConfig) -> list[tuple[str, int]]:
    """Parameters of each part the multimodal model adds to the LLM (encoders and projectors of the
    understood media, fusion layers, generators), built on the meta device; empty without any."""
    if not (understood(cfg) or generated(cfg)):
        return []
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vision=dataclasses.replace(cfg.model.vision, pretrained_path=None)))  # sizes only: no file read
    with torch.device("meta"):
        model = XoronMultimodalModel(cfg)
    names = [name for row in model.media for name in (row.encoder, row.projector)]
    names += ["fusion"] if model.fusion is not None else []
    names += [row.generator for row in model.generators]
    return [(name, sum(p.numel() for p in getattr(model, name).parameters())) for name in names]
