"""Training LoRA adapters: which parameters a stage trains, and LoRA+'s learning rate for B.

    add_adapters(model, cfg)          the run's ``model.lora`` adapters on the plain model (before freezing
                                      and parallelizing)
    freeze_for_stage(model, trains)   ``stages[i].trains``: all | base (adapters frozen) | adapters (base frozen)
    lora_plus_groups(groups, lr, r)   B matrices in their own optimizer groups at r x lr (LoRA+, Hayou et al.
                                      2024, arXiv:2402.12354); the schedule scales every group's lr alike

Frozen parameters are left out of the optimizer (``train.build.parameter_groups``), so ZeRO partitions
and reduces only what trains; a tensor-parallel slice of an adapter is a marked split parameter like
any other, and an expert-parallel rank's routed-expert adapters are expert parameters like its experts
(``parallel.experts``: DeepSpeed reduces them over the expert-data-parallel group, puts them in its MoE
optimizer groups and expert checkpoint files), so the layouts need nothing more.
"""

from __future__ import annotations

import logging

from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.lora import apply_lora, is_adapter, is_b_matrix

logger = logging.getLogger(__name__)


def add_adapters(model: nn.Module, cfg: XoronConfig) -> dict[str, int]:
    """Apply ``model.lora`` to the plain ``model`` (nothing when it is off); returns adapters per target."""
    lora = cfg.model.lora
    if not lora.enabled:
        return {}
    counts = apply_lora(model, lora)
    logger.info("LoRA rank %d, scale %.3g: %s", lora.rank, lora.scale,
                ", ".join(f"{n} {target}" for target, n in counts.items()))
    return counts


def freeze_for_stage(model: nn.Module, trains: str) -> int:
    """Freeze the base (``trains='adapters'``) or the adapters (``'base'``); returns the elements frozen."""
    if trains == "all":
        return 0
    frozen = 0
    for name, param in model.named_parameters():
        if is_adapter(name) == (trains == "base") and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def lora_plus_groups(groups: list[dict], model: nn.Module, lr: float, ratio: float) -> list[dict]:
    """``groups`` with the adapters' B matrices moved into groups of their own at ``ratio`` x ``lr``
    (named ``<group>_lora_B``; nothing changes when ``ratio`` is 1 or no B trains)."""
    if ratio == 1.0:
        return groups
    b_ids = {id(p) for name, p in model.named_parameters() if is_b_matrix(name)}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in b_ids]
        bs = [p for p in group["params"] if id(p) in b_ids]
        out.append({**group, "params": rest})
        if bs:
            out.append({**group, "params": bs, "lr": lr * ratio, "name": f"{group.get('name', 'group')}_lora_B"})
    return out


__all__ = ["add_adapters", "freeze_for_stage", "lora_plus_groups"]
