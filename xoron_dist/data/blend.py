"""Blending datasets by weight: which datasets a stage reads, and which one each draw takes.

``resolve_blend`` turns the manifest, a stage's ``kinds`` filter and a ``mix`` (dataset -> weight;
empty = each dataset in proportion to its rows) into the list of datasets with normalised weights.
A dataset missing from a non-empty ``mix`` gets weight 0, and a dataset with weight 0 is not read.

``BlendSampler`` is one slot's draw sequence (see ``order.py`` for slots): draw ``k`` picks a
dataset from a uniform number that is a pure function of ``(seed, slot, k)`` (generated in blocks
of ``BLOCK`` by ``numpy.random.default_rng``), then takes that dataset's next position in this
slot's share of its stream. Each dataset advances its own cursor, so a small dataset simply wraps
into more epochs than a large one. The sampler's whole state is the draw counter and one cursor
per dataset, so it resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from xoron_dist.data.order import EpochOrder, derive_seed
from xoron_dist.data.schema import KINDS, DatasetInfo
from xoron_dist.utils.typed_config import field_error

BLOCK = 4096  # draws per generated block of uniforms


@dataclass(frozen=True)
class BlendEntry:
    name: str
    kind: str
    rows: int
    weight: float  # normalised: the weights of a blend sum to 1


def resolve_blend(
    datasets: Mapping[str, DatasetInfo],
    *,
    kinds: Sequence[str] | None = None,
    mix: Mapping[str, float] | None = None,
    kinds_field: str = "stages.kinds",
    mix_field: str = "data.mix",
    where: str = "the prepared data",
) -> list[BlendEntry]:
    """The datasets to read, sorted by name, with weights summing to 1. Errors name the config field."""
    if not datasets or all(info.rows == 0 for info in datasets.values()):
        raise field_error("data.path", where, "its manifest lists no datasets with rows; prepare data there first "
                                              "(xoron prep --out PATH INPUT...) or point data.path elsewhere")
    available = {name: info for name, info in sorted(datasets.items()) if info.rows > 0}
    if kinds:
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown:
            raise field_error(kinds_field, list(kinds), f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
        chosen = {name: info for name, info in available.items() if info.kind in kinds}
        if not chosen:
            have = sorted({info.kind for info in available.values()})
            raise field_error(kinds_field, list(kinds), f"matches no dataset in {where}, which holds kinds {have}")
    else:
        chosen = available
    if mix:
        for name, weight in mix.items():
            if name not in datasets:
                raise field_error(f"{mix_field}.{name}", weight,
                                  f"no dataset '{name}' in {where}; datasets: {', '.join(sorted(datasets))}")
            if weight > 0 and name not in chosen:
                reason = (f"its kind '{datasets[name].kind}' is not in {kinds_field} = {list(kinds)}"
                          if kinds and name in available else "it has no rows")
                raise field_error(f"{mix_field}.{name}", weight, f"dataset '{name}' cannot be read: {reason}")
        weights = {name: float(mix.get(name, 0.0)) for name in chosen}
    else:
        weights = {name: float(info.rows) for name, info in chosen.items()}
    total = sum(weights.values())
    if total <= 0:
        raise field_error(mix_field, dict(mix or {}), f"every weight is 0 for the datasets {sorted(chosen)}")
    return [BlendEntry(name, chosen[name].kind, chosen[name].rows, weight / total)
            for name, weight in weights.items() if weight > 0]


class BlendSampler:
    """One slot's draws over ``entries``: ``next()`` -> (dataset index, stream position)."""

    def __init__(self, entries: Sequence[BlendEntry], seed: int, slot: int, num_slots: int) -> None:
        self.entries = list(entries)
        self.seed, self.slot, self.num_slots = seed, slot, num_slots
        self.orders = [EpochOrder(seed, entry.name, entry.rows) for entry in self.entries]
        cumulative = np.cumsum([entry.weight for entry in self.entries])
        self._bounds = cumulative / cumulative[-1]
        self.draws = 0
        self.cursors = [0] * len(self.entries)
        self._block: tuple[int, np.ndarray] | None = None
        # the draws from ``_resolved_from`` to the end of its block, resolved at once:
        # (dataset, stream position, row) each, which one by one cost ~0.5 us a draw
        self._resolved: list[tuple[int, int, int]] = []
        self._resolved_from = 0

    def _picks(self, block: int) -> np.ndarray:
        """(BLOCK,) the dataset indices of the draws of block ``block``."""
        if len(self.entries) == 1:
            return np.zeros(BLOCK, np.int64)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng(derive_seed("xoron-blend", self.seed, self.slot, block))
            picks = np.searchsorted(self._bounds, rng.random(BLOCK), side="right")
            self._block = (block, np.minimum(picks, len(self.entries) - 1))
        return self._block[1]

    def pick(self, draw: int) -> int:
        """The dataset index of draw ``draw``: a pure function of (seed, slot, draw)."""
        block, offset = divmod(draw, BLOCK)
        return int(self._picks(block)[offset])

    def _resolve(self) -> None:
        block, offset = divmod(self.draws, BLOCK)
        datasets = self._picks(block)[offset:]
        positions, rows = np.empty(len(datasets), np.int64), np.empty(len(datasets), np.int64)
        for dataset in np.unique(datasets).tolist():
            where = np.flatnonzero(datasets == dataset)
            counts = self.cursors[dataset] + np.arange(len(where))
            positions[where] = counts * self.num_slots + self.slot  # slot_position(count, slot, num_slots)
            rows[where] = self.orders[dataset].rows_at(positions[where])
        self._resolved = list(zip(datasets.tolist(), positions.tolist(), rows.tolist(), strict=True))
        self._resolved_from = self.draws

    def draw(self) -> tuple[int, int, int]:
        """The next draw: (dataset index, stream position, row of the dataset)."""
        index = self.draws - self._resolved_from
        if index >= len(self._resolved):
            self._resolve()
            index = 0
        drawn = self._resolved[index]
        self.draws += 1
        self.cursors[drawn[0]] += 1
        return drawn

    def next(self) -> tuple[int, int]:
        """The next draw: (dataset index, stream position)."""
        return self.draw()[:2]

    def row_at(self, dataset: int, position: int) -> int:
        return self.orders[dataset].row_at(position)[1]

    def state_dict(self) -> dict[str, object]:
        return {"draws": self.draws, "cursors": list(self.cursors)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        cursors = [int(c) for c in state["cursors"]]
        if len(cursors) != len(self.entries):
            raise ValueError(f"blend state has {len(cursors)} cursors for {len(self.entries)} datasets")
        self.draws, self.cursors = int(state["draws"]), cursors
        self._resolved = []
