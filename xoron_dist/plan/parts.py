"""Per-rank parameters of the multimodal parts: encoders, projectors, fusion layers, generators.

The parts exist where the trainer builds ``XoronMultimodalModel`` (an encoder or generator enabled,
Arrow data). ``xoron_dist.parallel.part_splits`` reads, once per model/data config, how tensor and
expert parallelism split each part's parameters, off the model built on the meta device; here that
becomes the parameters one rank holds for a layout's tp and ep, exactly as ``parallelize`` leaves them:

    tensor parallel   the tensors the plan splits hold 1/tp of their elements; the rest is whole
    expert parallel   the routed experts of the generators' ``MoEFeedForward``s hold num_experts/ep
                      experts per rank; they are expert weights, which ZeRO partitions over the
                      expert-data-parallel ranks (dp·sp/ep), as the LLM's. The video encoder's
                      ``MotionAwareMoE`` experts are dense weights, whole on every EP rank.

A split that does not divide (an encoder's FFN width over tp: the layout validator checks the heads,
not those) stops the trainer with ``TensorSplitError``; ``split_problem`` names it, and the planner
refuses that layout.

Not modelled here (memory and cost take the counts only):

    activations   the parts' saved tensors depend on how many images, videos and clips a
                  micro-batch holds (the data mix, not the config) and on each item's size
                  (resolution, frames, seconds; up to ``max_patches``), and the generators'
                  autoencoders and the vocoder work at pixel/waveform resolution, where no
                  per-token rule holds. The LLM's activations already cover the media placeholder
                  tokens (they are part of ``seq_len``).
    compute       the parts' FLOPs and their TP all-reduces / EP all-to-alls scale with the same
                  media per micro-batch (see ``xoron_dist.plan.cost``).
    freezing      every part counts as trained (gradients, optimizer states); a curriculum stage
                  that freezes one needs less. The LLM's estimate makes the same assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

from xoron_dist.config import XoronConfig
from xoron_dist.parallel.part_splits import SplitTensors, part_splits

# repr of (model config, data config, tp_experts) -> profiles. The search asks several times for
# each of thousands of candidates, all sharing one model and data config object: the last answer is
# kept by identity too (it holds those objects, so their ids cannot be reused), skipping the repr
# (the planner never changes a config in place).
_PROFILES: dict[str, tuple[PartProfile, ...]] = {}
_LAST: list[tuple[object, object, bool, tuple[PartProfile, ...]]] = []


class PartSplitError(ValueError):
    """A multimodal part does not split over the tensor-parallel size (the trainer would refuse it too)."""


@dataclass(frozen=True)
class ParameterCount:
    """Parameters on one rank: ``dense`` (replicated over dp·sp) and routed ``expert`` weights
    (replicated over the expert-data-parallel ranks, dp·sp/ep)."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: ParameterCount) -> ParameterCount:
        return ParameterCount(self.dense + other.dense, self.expert + other.expert)


@dataclass(frozen=True)
class PartProfile:
    """One part (``vision``, ``image_projector``, ``fusion``, ``image_gen``, ...) by how it splits."""

    name: str
    groups: tuple[SplitTensors, ...]

    @property
    def whole(self) -> int:
        """Parameters of the single-rank part (``multimodal_parts``' count)."""
        return sum(g.numel for g in self.groups)

    def on_rank(self, tp: int, ep: int) -> ParameterCount:
        """This part's parameters on one rank of a layout with ``tp`` and ``ep``."""
        dense = expert = 0
        for g in self.groups:
            n = g.numel // (tp if g.extent else 1)
            if g.experts:
                expert += n // ep
            else:
                dense += n
        return ParameterCount(dense, expert)

    def largest_tensor(self, tp: int, ep: int) -> int:
        """Elements of this part's largest tensor on one rank (EP keeps one tensor per local expert)."""
        return max((g.largest // (tp if g.extent else 1) // (g.experts if g.experts and ep > 1 else 1)
                    for g in self.groups), default=0)

    def split_problem(self, tp: int) -> str | None:
        """Why tensor parallelism cannot split this part over ``tp`` ranks, or None."""
        for g in self.groups:
            if g.extent and g.extent % (g.unit * tp):
                size = f"{g.extent // g.unit} {g.what or 'blocks'} of {g.unit}" if g.unit > 1 else \
                    f"{g.extent} features"
                return (f"{self.name}.{g.where} ({size}) does not split over parallel.tp = {tp}: tensor parallelism "
                        f"would stop with TensorSplitError; pick a tp that divides {g.extent // g.unit}")
        return None


@dataclass(frozen=True)
class PartParameters:
    """One part's parameters on one rank, next to the single-rank part's."""

    name: str
    params: ParameterCount
    whole: int


def part_profiles(cfg: XoronConfig) -> tuple[PartProfile, ...]:
    """The multimodal parts of ``cfg``'s model in ``multimodal_parts``' order; empty without any."""
    if _LAST and _LAST[0][0] is cfg.model and _LAST[0][1] is cfg.data and _LAST[0][2] == cfg.parallel.tp_experts:
        return _LAST[0][3]
    key = repr((cfg.model, cfg.data, cfg.parallel.tp_experts))
    if key not in _PROFILES:
        _PROFILES[key] = tuple(PartProfile(name, groups) for name, groups in part_splits(cfg))
    _LAST[:] = [(cfg.model, cfg.data, cfg.parallel.tp_experts, _PROFILES[key])]
    return _PROFILES[key]


def part_parameters(cfg: XoronConfig, tp: int, ep: int) -> list[PartParameters]:
    """Every part's parameters on one rank of a layout with ``tp`` and ``ep`` (``PartSplitError``
    when a part does not split over ``tp``)."""
    problem = split_problem(cfg, tp)
    if problem:
        raise PartSplitError(problem)
    return [PartParameters(p.name, p.on_rank(tp, ep), p.whole) for p in part_profiles(cfg)]


def split_problem(cfg: XoronConfig, tp: int) -> str | None:
    """The first part that does not split over ``tp`` ranks, as a message; None when all do."""
    return next((msg for p in part_profiles(cfg) if (msg := p.split_problem(tp)) is not None), None)


def largest_part_tensor(cfg: XoronConfig, tp: int, ep: int) -> int:
    """Elements of the largest parameter tensor of any part on one rank (0 without parts)."""
    return max((p.largest_tensor(tp, ep) for p in part_profiles(cfg)), default=0)


__all__ = ["ParameterCount", "PartParameters", "PartProfile", "PartSplitError", "largest_part_tensor",
           "part_parameters", "part_profiles", "split_problem"]
