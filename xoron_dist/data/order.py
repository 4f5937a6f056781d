"""Sample order: a seeded permutation per dataset and epoch, split disjointly over (DP rank, worker).

**Stream.** Dataset ``name`` with ``rows`` rows is read as an endless stream: position ``P`` is
row ``permutation(epoch)[P % rows]`` with ``epoch = P // rows``, and ``permutation(epoch)`` is
``numpy.random.default_rng(key).permutation(rows)`` with ``key`` = sha256 of
``(seed, name, epoch)`` (never Python's ``hash()``, which changes per process). Every epoch visits
every row once, in a fresh order.

**Split.** A data-parallel job has ``D`` ranks and each rank ``W`` loader workers (0 workers count
as 1: the same data as one worker). They form ``S = D * W`` *slots*; slot
``s = worker * D + dp_rank``. Position ``P`` belongs to slot ``P % S``, that is to DP rank
``P % D`` and worker ``(P // D) % W``; slot ``s`` reads positions ``s, s + S, s + 2S, ...`` in
that order, so its ``j``-th sample of a dataset is position ``j * S + s``.

**Remainder.** When ``rows`` is not a multiple of ``S`` nothing is dropped or repeated: positions
run on across the epoch boundary, so the last ``rows % S`` rows of epoch e go to the first slots
and epoch e+1 continues with the next slot. Within any epoch each row belongs to exactly one slot;
the slots reach the end of an epoch at slightly different times (one more sample for some), which
is also why a dataset blended with others is consumed at each slot's own pace.

TP/PP/SP ranks of one model replica pass the same ``dp_rank`` and therefore read the same slot.
The split depends on ``D`` and ``W``: resuming with other values is refused by the loader.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 128-bit seed from ``parts`` (ints and strings), identical in every process and Python run."""
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "little")


def slot_index(dp_rank: int, worker: int, dp_size: int) -> int:
    """The slot of worker ``worker`` on data-parallel rank ``dp_rank`` (see the module docstring)."""
    return worker * dp_size + dp_rank


def slot_position(count: int, slot: int, num_slots: int) -> int:
    """Stream position of the ``count``-th sample (from 0) that slot ``slot`` reads from a dataset."""
    return count * num_slots + slot


class EpochOrder:
    """The permutation of one dataset's rows per epoch; keeps the last two epochs in memory.

    Memory: ``rows`` * 4 bytes per cached epoch (uint32 indices) in each process that reads.
    """

    _CACHED_EPOCHS = 2  # a slot's look-ahead window can straddle one epoch boundary

    def __init__(self, seed: int, name: str, rows: int) -> None:
        if rows <= 0:
            raise ValueError(f"dataset '{name}' has no rows")
        self.seed, self.name, self.rows = seed, name, rows
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """(rows,) the order of epoch ``epoch``."""
        if epoch not in self._cache:
            if len(self._cache) >= self._CACHED_EPOCHS:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng(derive_seed("xoron-order", self.seed, self.name, epoch))
            dtype = np.uint32 if self.rows < 2**32 else np.uint64
            self._cache[epoch] = rng.permutation(self.rows).astype(dtype)
        return self._cache[epoch]

    def row_at(self, position: int) -> tuple[int, int]:
        """(epoch, row) of stream position ``position``."""
        epoch, index = divmod(position, self.rows)
        return epoch, int(self.permutation(epoch)[index])

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The rows of increasing stream ``positions`` (int64 array), as ``row_at`` gives them one by one."""
        epochs, index = np.divmod(positions, self.rows)
        rows = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs).tolist():
            where = epochs == epoch
            rows[where] = self.permutation(epoch)[index[where]]
        return rows
