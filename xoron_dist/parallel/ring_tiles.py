"""Ring attention's tile plan: which (query half, key half) pairs of a ring step to compute, and how.

Every rank's rows carry global positions and, for packed documents, document ids. A tile (half of
this rank's query rows against half of a key block) is skipped when no query may see any key,
full when every query sees every key, the kernel's own causal diagonal when both sides hold the
same increasing positions, and otherwise masked with an explicit (rows x cols) mask built while its
kernel runs; rows that see none of a tile's keys are marked so the merge ignores them.

Host reads (issue 18: a GPU waits at each): a plan is made for every step of a layer call before
the ring turns. Zig-zag rows without documents need no data (``_zigzag_plans``: chunk indices
decide); any other rows are classified on the device, every tile of every step, and read back in
one ``tolist()`` (``_plans``). Before, each tile asked the host 4-7 questions, forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xoron_dist.parallel.checkpointing import host_read


def _allowed(q_meta: torch.Tensor, k_meta: torch.Tensor, causal: bool) -> torch.Tensor:
    """(Bm, rows, cols) bool, True = may attend: by position if causal, and within one document if packed.

    q_meta (1 or 2, Bm, rows), k_meta (1 or 2, Bm, cols): positions, then document ids if packed.
    """
    allowed = torch.ones(q_meta.shape[1], q_meta.shape[2], k_meta.shape[2], dtype=torch.bool, device=q_meta.device)
    if causal:
        allowed &= k_meta[0][:, None, :] <= q_meta[0][:, :, None]
    if q_meta.shape[0] == 2:
        allowed &= k_meta[1][:, None, :] == q_meta[1][:, :, None]
    return allowed


@dataclass(frozen=True)
class _Tile:
    """One (query rows, key rows) pair to attend; pairs that are entirely masked have no _Tile."""

    rows: slice
    cols: slice
    causal: bool = False  # same positions on both sides: the kernel's own causal mask is exact
    metas: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # set when the tile needs an explicit mask
    empty_rows: torch.Tensor | None = None  # (Bm, rows) True where a row sees no key of the tile

    def allowed(self) -> torch.Tensor | None:
        """(Bm, 1, rows, cols) bool, True = may attend; built only while its kernel call runs (it is rows x cols)."""
        return None if self.metas is None else _allowed(*self.metas)[:, None]


Plan = list[list[_Tile]]  # the tiles of one (local queries, key block) pair, grouped by key tile


def _halves(n: int) -> list[slice]:
    # Tiles follow the zig-zag chunks (two per rank), which is what makes causal skipping pay.
    return [slice(0, n // 2), slice(n // 2, n)] if n >= 2 and n % 2 == 0 else [slice(0, n)]


def _zigzag_plans(rank: int, sp: int, seq_local: int) -> list[Plan]:
    """The plan of every ring step for zig-zag rows without documents, from the layout alone (no data).

    Rank r holds chunks (r, 2·sp-1-r) of c = seq_local/2 rows; at step t it holds the block of rank
    j = (r - t) mod sp. A (query chunk a, key chunk b) tile is skipped if b > a, full if b < a, and
    the kernel's causal diagonal if b == a (full when c == 1: one row sees its one key).
    """
    chunk = seq_local // 2
    q_chunks = (rank, 2 * sp - 1 - rank)
    plans = []
    for step in range(sp):
        src = (rank - step) % sp
        plan = []
        for b, cols in zip((src, 2 * sp - 1 - src), _halves(seq_local), strict=True):
            tiles = [_Tile(rows, cols, causal=b == a and chunk > 1)
                     for a, rows in zip(q_chunks, _halves(seq_local), strict=True) if b <= a]
            if tiles:
                plan.append(tiles)
        plans.append(plan)
    return plans


_SKIP, _ONE_DOC, _FULL, _DIAGONAL, _ANY, _ALL, _SOME_EMPTY = range(7)  # the columns of _tile_flags


def _tile_flags(q_meta: torch.Tensor, k_meta: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(7,) bool on the device, in the order of the names above, and the (Bm, rows) rows that see no key.

    q_meta (1 or 2, Bm, rows), k_meta (1 or 2, Bm, cols): positions, then document ids if packed.
    Device work only: the caller reads the flags of every tile of a layer call in one go. The
    dense (Bm, rows, cols) mask exists only while this tile's flags are reduced from it.
    """
    q_pos, k_pos = q_meta[0], k_meta[0]
    yes = torch.ones((), dtype=torch.bool, device=q_pos.device)
    if causal:
        skip = (k_pos.amin(-1) > q_pos.amax(-1)).all()
        full = (k_pos.amax(-1) <= q_pos.amin(-1)).all()
    else:
        skip, full = ~yes, yes
    one_doc = yes
    if q_meta.shape[0] == 2:
        q_doc, k_doc = q_meta[1], k_meta[1]
        one_doc = ((q_doc.amin(-1) == q_doc.amax(-1)) & (k_doc.amin(-1) == k_doc.amax(-1))
                   & (q_doc[:, 0] == k_doc[:, 0])).all()
    # same positions on both sides, increasing: the kernel's own causal mask is exact
    diagonal = ((q_pos == k_pos).all() & (q_pos.diff(dim=-1) > 0).all()) if q_pos.shape == k_pos.shape else ~yes
    allowed = _allowed(q_meta, k_meta, causal)
    empty = ~allowed.any(-1)
    return torch.stack((skip, one_doc, full, diagonal, allowed.any(), allowed.all(), empty.any())), empty


def _decide(flags: list[bool], q_meta: torch.Tensor, k_meta: torch.Tensor, causal: bool, rows: slice, cols: slice,
            empty: torch.Tensor) -> _Tile | None:
    """A tile from its flags: None (nothing to compute), full, causal diagonal, or explicitly masked."""
    if causal and flags[_SKIP]:
        return None  # every key comes after every query
    if q_meta.shape[0] == 1 or flags[_ONE_DOC]:  # unpacked, or one document on both sides: ids change nothing
        if flags[_FULL]:
            return _Tile(rows, cols)
        if flags[_DIAGONAL]:
            return _Tile(rows, cols, causal=True)
    if not flags[_ANY]:
        return None
    if flags[_ALL]:
        return _Tile(rows, cols)
    return _Tile(rows, cols, metas=(q_meta, k_meta, causal), empty_rows=empty if flags[_SOME_EMPTY] else None)


def _plans(q_meta: torch.Tensor, k_metas: Sequence[torch.Tensor], causal: bool) -> list[Plan]:
    """The plan of this rank's queries against each key block in ``k_metas``, from one read of the device.

    Every tile of every block is classified on the device (``_tile_flags``) and the flags come back
    in a single ``tolist()``: one host sync per layer call, whatever the number of tiles.
    """
    row_halves = _halves(q_meta.shape[-1])
    if not causal and q_meta.shape[0] == 1:  # no order, no documents: every tile is full
        return [[[_Tile(rows, cols) for rows in row_halves] for cols in _halves(k.shape[-1])] for k in k_metas]
    where, flags, empties = [], [], []
    for k_meta in k_metas:
        for cols in _halves(k_meta.shape[-1]):
            for rows in row_halves:
                tile_flags, empty = _tile_flags(q_meta[..., rows], k_meta[..., cols], causal)
                where.append((k_meta, rows, cols))
                flags.append(tile_flags)
                empties.append(empty)
    flags = torch.stack(flags)
    decided = iter(zip(where, host_read(flags.tolist, witness=flags), empties, strict=True))
    plans = []
    for k_meta in k_metas:
        plan = []
        for _ in _halves(k_meta.shape[-1]):
            tiles = []
            for _ in row_halves:
                (k, rows, cols), tile_flags, empty = next(decided)
                tile = _decide(tile_flags, q_meta[..., rows], k[..., cols], causal, rows, cols, empty)
                if tile is not None:
                    tiles.append(tile)
            if tiles:
                plan.append(tiles)
        plans.append(plan)
    return plans


def _plan(q_meta: torch.Tensor, k_meta: torch.Tensor, causal: bool) -> Plan:
    """The tiles of one (local queries, key block) pair that have anything to compute, grouped by key tile."""
    return _plans(q_meta, [k_meta], causal)[0]


__all__ = ["Plan"]
