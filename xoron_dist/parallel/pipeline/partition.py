"""Pipeline partitioning: contiguous runs of decoder layers per stage, minimising the busiest stage.

Pure Python (no torch): the planner (``xoron plan``) calls it on parameter counts without
building a model, the trainer on parameter counts or measured costs (``split.py``).
Costs: one entry per decoder layer, plus what only the first stage (embedding; the multimodal
encoders) and only the last stage (final norm, LM head, loss; generator heads) carry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageCosts:
    """What each piece of the LLM costs: one entry per decoder layer, plus what only the first
    stage (embedding; later the multimodal encoders) and only the last stage (final norm, LM head,
    loss; later the generator heads) carry. Any unit, as long as it is the same for all."""

    layers: tuple[float, ...]
    first: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class PipelinePartition:
    """Which layers each stage holds: stage ``s`` holds layers ``bounds[s][0] .. bounds[s][1] - 1``."""

    bounds: tuple[tuple[int, int], ...]
    stage_costs: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.bounds)

    def layers_of(self, stage: int) -> range:
        return range(*self.bounds[stage])

    def describe(self) -> str:
        parts = [f"stage {s}: layers {a}-{b - 1} (cost {c:.3g})"
                 for s, ((a, b), c) in enumerate(zip(self.bounds, self.stage_costs, strict=True))]
        return "; ".join(parts)


def partition_layers(costs: StageCosts, pp: int) -> PipelinePartition:
    """Split the layers into ``pp`` contiguous runs (each at least one layer) that minimise the
    largest stage cost; among equally good splits, the one that puts layers on earlier stages.

    Exact dynamic programme over (stages, layers): O(pp * L^2), instant for any real model.
    """
    layers = list(costs.layers)
    n = len(layers)
    if pp < 1:
        raise ValueError(f"pp = {pp}: a pipeline has at least one stage")
    if n < pp:
        raise ValueError(f"{n} layer(s) cannot fill {pp} pipeline stages: every stage holds at least one layer")
    prefix = [0.0]
    for cost in layers:
        prefix.append(prefix[-1] + cost)

    def stage_cost(stage: int, start: int, stop: int) -> float:
        extra = (costs.first if stage == 0 else 0.0) + (costs.last if stage == pp - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: the smallest possible largest cost when stages 0..k-1 hold layers 0..i-1.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for i in range(k, n - (pp - k) + 1):
            for j in range(k - 1, i):  # stage k-1 holds layers j..i-1
                value = max(best[k - 1][j], stage_cost(k - 1, j, i))
                if value < best[k][i] or (value == best[k][i] and j > cut[k][i]):
                    best[k][i], cut[k][i] = value, j
    bounds, stop = [], n
    for k in range(pp, 0, -1):
        start = cut[k][stop]
        bounds.append((start, stop))
        stop = start
    bounds.reverse()
    return PipelinePartition(tuple(bounds), tuple(stage_cost(s, a, b) for s, (a, b) in enumerate(bounds)))


__all__ = ["PipelinePartition", "StageCosts", "partition_layers"]
