"""Auxiliary-loss-free expert balancing for every bias-routed MoE of a model, in one place.

DeepSeek-V3 §2.1.2: after each optimizer step every router's expert bias moves by
b_i += γ·sign(mean_load − load_i) (mean removed), where ``load`` is the number of tokens each
expert received during the step, summed over every rank that routes tokens (data x sequence
parallel), so every replica applies the same update and keeps bit-identical biases.

``ExpertBalancer(model)`` finds every ``ExpertBiasRouter`` of the model (the LLM's MoE layers,
the video encoder's temporal MoE, the generators' MoEs as they land) and groups them by family;
each family moves at its own rate (the router's ``bias_update_rate``, from its config section),
and a curriculum stage may switch the update off or override the LLM's rate. It counts loads
through hooks on the model: before each forward it clears the routers' counters, after the
forward it adds them to the step's load. Activation checkpointing re-runs routers in backward,
between those hooks, so recomputed tokens are never counted twice; nor is a blank input the
multimodal model encodes on a rank without that medium (``uncounted_routing``).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.model.common.moe import ExpertBiasRouter

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExpertBalancer:
    """The routers of ``model`` and the tokens each expert received since the last ``update``."""

    def __init__(self, model: nn.Module) -> None:
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertBiasRouter)]
        self.names = [name for name, _ in named]
        self.routers = [router for _, router in named]
        self.families = sorted({r.family for r in self.routers})
        device = self.routers[0].expert_bias.device if self.routers else torch.device("cpu")
        self.load = [torch.zeros(r.num_experts, device=device) for r in self.routers]
        self._hooks = [model.register_forward_pre_hook(self._clear),
                       model.register_forward_hook(self._harvest)] if self.routers else []

    # ------------------------------------------------------------------ counting

    def _clear(self, module: nn.Module, args) -> None:
        for router in self.routers:
            router.load.zero_()

    def _harvest(self, module: nn.Module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()):  # only training forwards are load
            return
        with torch.no_grad():
            for total, router in zip(self.load, self.routers, strict=True):
                total += router.load.to(total.device)

    def detach(self) -> None:
        """Remove the counting hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ what the trainer asks

    def of_family(self, family: str) -> list[int]:
        """Indices (into ``routers``) of one family's routers, in module order."""
        return [i for i, r in enumerate(self.routers) if r.family == family]

    def layer_ids(self, family: str = "llm") -> list[int]:
        """The decoder-layer index of each of a family's routers (for TensorBoard names)."""
        return [int(_LAYER.search(self.names[i]).group(1)) for i in self.of_family(family)]

    def biases(self, family: str = "llm") -> list[torch.Tensor]:
        return [self.routers[i].expert_bias for i in self.of_family(family)]

    def keep_fp32(self) -> None:
        """Cast the routers' bias and counters back to fp32 after an engine cast the model to bf16/fp16:
        updates of 1e-3 would round away in bf16 (8 mantissa bits), as HF keeps them fp32 too."""
        for router in self.routers:
            router.expert_bias.data = router.expert_bias.data.float()
            router.load.data = router.load.data.float()
        self.load = [load.float() for load in self.load]

    @torch.no_grad()
    def update(self, group: dist.ProcessGroup | None = None, enabled: bool = True,
               rates: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Apply the bias update from the load since the last call; returns each family's summed load
        (routers, experts). ``group``: the ranks that route different tokens through the same experts
        (data x sequence parallel), whose loads are summed first. ``rates``: family -> γ overriding the
        routers' own ``bias_update_rate`` (a curriculum stage's rate for the LLM)."""
        loaded = self.reduce(group)
        self.apply(loaded, enabled, rates)
        return loaded

    @torch.no_grad()
    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Each family's load since the last call, summed over ``group`` (see ``update``), and the counters
        cleared for the next step."""
        loaded: dict[str, torch.Tensor] = {}
        for family in self.families:
            load = torch.stack([self.load[i] for i in self.of_family(family)])
            if group is not None and dist.is_initialized():
                dist.all_reduce(load, group=group)
            loaded[family] = load
        for total in self.load:
            total.zero_()
        return loaded

    @torch.no_grad()
    def apply(self, loaded: dict[str, torch.Tensor], enabled: bool = True, rates: dict[str, float] | None = None,
              applied: torch.Tensor | None = None) -> None:
        """The bias update from ``reduce``'s loads (see ``update``). ``applied``: a 0/1 device flag whether the
        optimizer step was applied (a skipped step moves no bias), decided on the device without a read."""
        if not enabled:
            return
        rates = rates or {}
        for family, load in loaded.items():
            for i, row_load in zip(self.of_family(family), load, strict=True):
                router = self.routers[i]
                rate = rates.get(family, router.bias_update_rate)
                router.update_bias(row_load, rate if applied is None else applied * rate)


__all__ = ["ExpertBalancer"]
