"""One slot's stream of packed batches, and the small state that resumes it exactly.

A slot (one loader worker of one DP rank, see ``order.py``) chains: blend draw -> row of the
dataset's epoch permutation -> ``ArrowSample`` -> documents (``TokenLayout``) -> look-ahead window
(``SequencePacker``) -> rows -> ``BatchBlock`` (a ``PackedBatch`` in one buffer). Its state after
any batch is::

    {"draws": int, "cursors": [int per dataset],            # blend position (BlendSampler)
     "window": [[dataset, position, piece], ...],           # documents drawn but not yet packed
     "pending": [dataset, position, next piece] | None,     # rest of a long text being split
     "skipped": {"too_long": [int per dataset], "malformed": [int per dataset]},
     "consecutive_skips": [int per dataset], "batches": int}

Everything else (permutations, open shards, the documents in the window) is rebuilt from it.

Bad samples: a multimodal sample too long for ``seq_len`` or a row whose media bytes do not
match its dimensions is skipped and counted (first one per dataset logged as a warning). More
than ``MAX_CONSECUTIVE_SKIPS`` skips in a row from one dataset stop the run with the last reason:
that is a setting or a broken dataset, not a stray sample.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from xoron_dist.data.batch import Allocate, BatchBlock, allocate_local
from xoron_dist.data.blend import BlendEntry, BlendSampler
from xoron_dist.data.packing import Document, SampleTooLongError, SequencePacker, TokenLayout, collate_block
from xoron_dist.data.shards import ArrowDataset, MalformedSampleError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 32


class TooManySkipsError(RuntimeError):
    """A dataset yielded ``MAX_CONSECUTIVE_SKIPS`` unusable samples in a row."""


class SlotStream:
    """Packed batches of one slot. ``state_dict()`` after a batch + a fresh stream + ``load_state_dict``
    gives the same next batches as continuing."""

    def __init__(self, datasets: Sequence[ArrowDataset], entries: Sequence[BlendEntry], layout: TokenLayout, *,
                 seed: int, slot: int, num_slots: int, micro_batch_size: int, lookahead: int, pad_id: int,
                 map_media: bool = False) -> None:
        self.datasets, self.entries, self.layout = list(datasets), list(entries), layout
        self.blend = BlendSampler(entries, seed, slot, num_slots)
        self.packer = SequencePacker(layout.seq_len, lookahead, self._next_document)
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.map_media = map_media  # media left in the shard files, not copied (``collate_block``)
        count = len(self.entries)
        self.pending: list[int] | None = None  # [dataset, position, index into _pieces]
        self._pieces: list[Document] = []
        self.skipped = {"too_long": [0] * count, "malformed": [0] * count}
        self.consecutive_skips = [0] * count
        self.batches = 0

    # ------------------------------------------------------------------ documents

    def _documents(self, dataset: int, position: int, row: int | None = None) -> list[Document]:
        """The documents of the sample at ``position`` of dataset ``dataset``'s stream (its ``row``,
        when known), with refs."""
        if row is None:
            row = self.blend.row_at(dataset, position)
        return self.layout.documents(self.datasets[dataset].sample(row), dataset, position)

    def _next_document(self) -> Document:
        if self.pending is not None:  # the rest of a long text being split
            dataset, position, index = self.pending
            self.pending = [dataset, position, index + 1] if index + 1 < len(self._pieces) else None
            return self._pieces[index]
        docs = self._draw()
        if len(docs) > 1:
            self._pieces = docs
            self.pending = [*docs[0].ref[:2], 1]
        return docs[0]

    def _draw(self) -> list[Document]:
        """Draw samples until one yields documents."""
        while True:
            dataset, position, row = self.blend.draw()
            try:
                docs = self._documents(dataset, position, row)
            except (SampleTooLongError, MalformedSampleError) as err:
                self._skip(dataset, err)
                continue
            self.consecutive_skips[dataset] = 0
            if docs:
                return docs

    def _skip(self, dataset: int, err: Exception) -> None:
        reason = "too_long" if isinstance(err, SampleTooLongError) else "malformed"
        counts = self.skipped[reason]
        if counts[dataset] == 0:
            logger.warning("skipping (and counting) unusable samples of dataset '%s', first: %s",
                           self.entries[dataset].name, err)
        counts[dataset] += 1
        self.consecutive_skips[dataset] += 1
        if self.consecutive_skips[dataset] >= MAX_CONSECUTIVE_SKIPS:
            raise TooManySkipsError(
                f"{MAX_CONSECUTIVE_SKIPS} samples in a row of dataset '{self.entries[dataset].name}' were unusable; "
                f"the last: {err}. Fix the data or the setting it names (e.g. raise the sequence length), or drop "
                "the dataset from the mix"
            ) from err

    # ------------------------------------------------------------------ batches

    def next_block(self, allocate: Allocate = allocate_local) -> BatchBlock:
        """The next batch, collated into a buffer from ``allocate`` (``BatchBlock.to_batch()`` reads it)."""
        rows = [self.packer.next_row() for _ in range(self.micro_batch_size)]
        self.batches += 1
        return collate_block(rows, self.layout.seq_len, self.pad_id, allocate, self.map_media)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.blend.state_dict(),
            "window": [list(doc.ref) for doc in self.packer.window],
            "pending": None if self.pending is None else list(self.pending),
            "skipped": copy.deepcopy(self.skipped),
            "consecutive_skips": list(self.consecutive_skips),
            "batches": self.batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.blend.load_state_dict(state)
        window = []
        for dataset, position, piece in state["window"]:
            docs = self._documents(int(dataset), int(position))
            window.append(docs[int(piece)])
        self.packer.window = window
        self.pending = None if state["pending"] is None else [int(v) for v in state["pending"]]
        if self.pending is not None:
            self._pieces = self._documents(self.pending[0], self.pending[1])
        self.skipped = {reason: [int(c) for c in counts] for reason, counts in state["skipped"].items()}
        self.consecutive_skips = [int(c) for c in state["consecutive_skips"]]
        self.batches = int(state["batches"])
