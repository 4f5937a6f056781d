"""``model.lora``: low-rank adapters on a built model (``xoron_dist.model.lora``), off by default.

LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen weight W (out, in) gains ``scale · B @ A`` with
A (rank, in) kaiming-uniform, B (out, rank) zero, so a fresh adapter leaves the model's output
exactly as it was; ``scale`` = alpha / rank, or alpha / sqrt(rank) with ``rslora`` (Kalajdzievski
2023, arXiv:2312.03732). LoRA+ (Hayou et al. 2024, arXiv:2402.12354) trains the B matrices at
``plus_ratio`` times the learning rate.

Targets (the parts that get adapters):

    attention       the LLM's MLA projections (q_proj or q_down/q_up, kv_down, kv_up, out_proj)
    ffn             the LLM's dense SwiGLU layers (gate/up/down)
    shared_experts  the MoE layers' shared experts (gate/up/down)
    routed_experts  the MoE layers' routed experts: one stacked adapter per weight (A: experts x rank x
                    in, B: experts x out x rank), folded into the expert weights on the fly (no dropout)
    projector       every linear layer of the multimodal projectors
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xoron_dist.config.checks import positive
from xoron_dist.utils.typed_config import field_error

LORA_TARGETS = ("attention", "ffn", "shared_experts", "routed_experts", "projector")


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, linear layers only (the routed experts' adapters have none)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    rslora: bool = False
    plus_ratio: float = 1.0  # LoRA+: the B matrices' learning rate is plus_ratio x the run's

    def validate(self, where: str) -> None:
        positive(self, where, "rank", "alpha", "plus_ratio")
        if not 0.0 <= self.dropout < 1.0:
            raise field_error(f"{where}.dropout", self.dropout, "must be in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise field_error(f"{where}.targets", unknown[0], f"allowed targets are {', '.join(LORA_TARGETS)}")
        if self.enabled and not self.targets:
            raise field_error(f"{where}.targets", self.targets,
                              f"name at least one of {', '.join(LORA_TARGETS)} (or set lora.enabled: false)")

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / rank (alpha / sqrt(rank) with rslora)."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)
