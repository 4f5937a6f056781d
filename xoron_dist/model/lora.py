"""LoRA adapters on a built Xoron model (Hu et al. 2021, arXiv:2106.09685; config: ``model.lora``).

``apply_lora(model, cfg)`` runs on the plain single-rank model, after it is built and before it is
parallelized, and leaves every base parameter where it was (same names, same tensors), so
checkpoints, the HF name map and stage freezing see the base model unchanged. It adds:

* on each targeted ``nn.Linear`` (MLA projections, dense and shared-expert SwiGLUs, projector
  linears) a child ``lora`` (``LinearLoRA``: ``A`` (rank, in), ``B`` (out, rank)) and a forward hook
  that adds ``scale · B(seam(A(dropout(x))))`` to the layer's output;
* on each ``RoutedExperts`` a swap for ``LoRARoutedExperts``, which computes with the stacked weights
  ``W_e + scale · B_e @ A_e`` (children ``gate_up_lora``, ``down_lora``: ``StackedLoRA``, A (experts,
  rank, in), B (experts, out, rank)): the experts' grouped matmul takes whole weights, so the delta is
  folded in, and a dropout on the input cannot be (PEFT's ``target_parameters`` has the same rule).

Init as PEFT's default (``init_lora_weights=True``): A kaiming-uniform (a = sqrt 5, nn.Linear's),
B zero, so a fresh adapter changes no output: the model with adapters is the base model exactly.

Tensor parallelism (``xoron_dist.parallel.tensor``) splits an adapter the way it splits the layer
under it, reading the rule from ``TP_RULES`` here (data, not code in the parallel layer): the factor
that touches the split dim is split with the base's unit, the other stays whole, and the ``seam``
(an identity on one rank) becomes a TP exchange:

    base        linear adapter                                stacked (experts) adapter
    colwise     B split on out; seam copy_to between A and B   gate_up: B split on out (stride 2);
                (A's gradient summed over TP)                  A enters through copy_to
    rowwise     A split on in; seam reduce_from between A      down: A split on in; B enters through
                and B (B whole, its input summed first)        copy_to (its gradient summed over TP)

Expert parallelism (``xoron_dist.parallel.experts``) gives each EP rank its experts' slice of a stacked
adapter the way it slices the stacked weights: ``StackedLoRA.expert(e)`` is expert e's A (rank, in) and
B (out, rank), with the same forward on that expert's (out, in) weight.

Adapter parameters are named ``<layer>.lora.A/B`` and ``<experts>.{gate_up,down}_lora.A/B``;
``is_adapter(name)`` tells them apart, ``is_b_matrix`` finds LoRA+'s B matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.lora import LoRAConfig
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.moe import MoEFeedForward, RoutedExperts

_ATTENTION = ("q_proj", "q_down", "q_up", "kv_down", "kv_up", "out_proj")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """The adapters cannot be applied as configured; the message names the setting to change."""


def _kaiming_(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (and PEFT's) init of A: kaiming-uniform with a = sqrt(5) over the input dim."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LinearLoRA(nn.Module):
    """``scale · B(seam(A(dropout(x))))``: x (..., in) -> (..., out). A (rank, in), B (out, rank)."""

    # base split kind -> (factor split, its dim, stride, what the seam becomes); see the module docstring
    TP_RULES = {"colwise": ("B", 0, 1, "enter"), "rowwise": ("A", 1, 1, "leave")}

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig) -> None:
        super().__init__()
        self.A = nn.Parameter(_kaiming_(torch.empty(cfg.rank, in_features)))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.seam = nn.Identity()
        self.scale = cfg.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.seam(F.linear(self.dropout(x), self.A.to(x.dtype))), self.B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """``scale · B @ A`` (out, in): what merging adds to the base weight."""
        return self.scale * self.B @ self.A


def _add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer: its output plus its adapter's on the same input."""
    return output + module.lora(args[0])


def attach_linear_lora(layer: nn.Module, adapter: LinearLoRA) -> None:
    """Give ``layer`` (an ``nn.Linear`` or its tensor-parallel replacement) ``adapter`` and the hook."""
    layer.lora = adapter
    layer.register_forward_hook(_add_lora)


class StackedLoRA(nn.Module):
    """Adapter of a stacked expert weight (experts, out, in): ``forward(W) = W + scale · B @ A`` per expert,
    A (experts, rank, in), B (experts, out, rank); ``adapts`` names the weight (``gate_up`` or ``down``).
    ``expert(e)`` is expert e's adapter alone (A (rank, in), B (out, rank), same forward on its (out, in)
    weight): what expert parallelism gives the rank holding expert e."""

    def __init__(self, experts: int, in_features: int, out_features: int, cfg: LoRAConfig, tp_rule: tuple,
                 adapts: str) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(experts, cfg.rank, in_features))
        for a in self.A.data:
            _kaiming_(a)
        self.B = nn.Parameter(torch.zeros(experts, out_features, cfg.rank))
        self.scale, self.adapts = cfg.scale, adapts
        self.TP_RULES = {"experts": tp_rule}
        self.whole = "A" if tp_rule[0] == "B" else "B"  # the factor every TP rank holds whole
        self.seam = nn.Identity()  # TP: copy_to on the whole factor (its gradient summed over the ranks)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.A.to(weight.dtype), self.B.to(weight.dtype)
        a, b = (self.seam(a), b) if self.whole == "A" else (a, self.seam(b))
        return weight + self.scale * torch.matmul(b, a)

    def delta(self) -> torch.Tensor:
        return self.scale * torch.matmul(self.B, self.A)

    def expert(self, e: int) -> StackedLoRA:
        """Expert ``e``'s adapter as a module of its own: copies of ``A[e]``, ``B[e]`` (trainable as these
        are), the same scale and seam (a tensor-parallel split of the stack stays split the same way)."""
        one = StackedLoRA.__new__(StackedLoRA)
        nn.Module.__init__(one)
        for factor in ("A", "B"):
            stacked = getattr(self, factor)
            setattr(one, factor, nn.Parameter(stacked[e].detach().clone(), requires_grad=stacked.requires_grad))
        one.scale, one.adapts, one.whole, one.seam = self.scale, self.adapts, self.whole, self.seam
        factor, dim, stride, seam = self.TP_RULES["experts"]
        one.TP_RULES = {"experts": (factor, dim - 1, stride, seam)}  # no expert dim any more
        return one


class LoRARoutedExperts(RoutedExperts):
    """``RoutedExperts`` computing with adapted weights; the same parameters (``gate_up``, ``down``) under
    the same names, plus ``gate_up_lora`` and ``down_lora``."""

    def __init__(self, experts: RoutedExperts, cfg: LoRAConfig) -> None:
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        self.gate_up, self.down = experts.gate_up, experts.down
        self.entry, self.exit = experts.entry, experts.exit
        e, two_i, hidden = experts.gate_up.shape
        # gate_up's rows hold [gate; up]: split with stride 2 like the base (``parallel.tensor._experts``)
        self.gate_up_lora = StackedLoRA(e, hidden, two_i, cfg, ("B", 1, 2, "enter"), "gate_up")
        self.down_lora = StackedLoRA(e, experts.down.shape[2], hidden, cfg, ("A", 2, 1, "enter"), "down")

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) with the adapters folded in."""
        return self.gate_up_lora(self.gate_up), self.down_lora(self.down)


def _linear_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(name, target) of every ``nn.Linear`` that ``targets`` adapt, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind = _target_kind(model, name)
            if kind in targets:
                found.append((name, kind))
    return found


def _target_kind(model: nn.Module, name: str) -> str | None:
    """Which LoRA target the linear layer ``name`` belongs to (None: no target's)."""
    parent_name, _, leaf = name.rpartition(".")
    if name.split(".")[0].endswith("_projector"):
        return "projector"
    if not _in_llm(name):
        return None
    if parent_name.endswith(".attn") and leaf in _ATTENTION:
        return "attention"
    if isinstance(model.get_submodule(parent_name), SwiGLU) and leaf in _SWIGLU:
        return "shared_experts" if parent_name.endswith(".ffn.shared") else "ffn"
    return None


def _in_llm(name: str) -> bool:
    """Whether ``name`` is in the LLM's decoder layers (an ``XoronLLM``'s, or ``llm.`` of the multimodal model)."""
    return name.startswith("layers.") or name.startswith("llm.layers.")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> dict[str, int]:
    """Add adapters to the plain ``model`` for ``cfg.targets`` (see the module docstring); returns the
    number of adapted weights per target (a target this model lacks, e.g. ``projector`` on a text-only
    model, counts 0). Raises ``LoRAError`` when no target matches anything."""
    counts = dict.fromkeys(cfg.targets, 0)
    for name, kind in _linear_targets(model, cfg.targets):
        layer = model.get_submodule(name)
        adapter = LinearLoRA(layer.in_features, layer.out_features, cfg).to(layer.weight.device, layer.weight.dtype)
        attach_linear_lora(layer, adapter)
        counts[kind] += 1
    if "routed_experts" in cfg.targets:
        for name, moe in list(model.named_modules()):
            if isinstance(moe, MoEFeedForward) and _in_llm(name):
                experts = moe.experts
                moe.experts = LoRARoutedExperts(experts, cfg).to(experts.gate_up.device, experts.gate_up.dtype)
                counts["routed_experts"] += 2
    if not any(counts.values()):
        raise LoRAError(f"model.lora.targets {cfg.targets} match no layer of this model; choose from attention, "
                        "ffn, shared_experts, routed_experts (the LLM) and projector (multimodal models)")
    return counts


def is_adapter(name: str) -> bool:
    """Whether the parameter (or state-dict entry) ``name`` belongs to a LoRA adapter."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora", "gate_up_lora", "down_lora") and parts[-1] in ("A", "B")


def is_b_matrix(name: str) -> bool:
    """Whether ``name`` is an adapter's B matrix (LoRA+ trains those at ``plus_ratio`` x the lr)."""
    return is_adapter(name) and name.endswith(".B")


def adapter_base(name: str) -> tuple[str, str]:
    """The base weight an adapter entry adapts and which factor it is: ``layers.0.attn.q_up.lora.A`` ->
    (``layers.0.attn.q_up.weight``, ``A``); ``...experts.gate_up_lora.B`` -> (``...experts.gate_up``, ``B``)."""
    owner, factor = name.rsplit(".", 1)
    owner, holder = owner.rsplit(".", 1)
    return (f"{owner}.weight" if holder == "lora" else f"{owner}.{holder.removesuffix('_lora')}"), factor


__all__ = ["LinearLoRA", "LoRAError", "LoRARoutedExperts", "StackedLoRA", "adapter_base", "apply_lora",
           "attach_linear_lora", "is_adapter", "is_b_matrix"]
