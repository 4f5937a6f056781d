"""Shared-memory blocks that loader workers reuse for batch after batch, each crossing processes once.

Handing the trainer's process a fresh shared-memory tensor per batch costs more than making the
batch: the kernel zeroes and maps every page of the new segment (~2 ms for a 5 MB batch of
images), and the receiver fetches a file descriptor from the worker (a socket round trip served
by a worker thread that must win the worker's GIL), maps the segment and unmaps it later
(~0.25 ms of the trainer process's CPU per batch). So:

* ``SharedBlockPool`` (in a worker) keeps a few blocks and writes each batch into a free one.
  Byte 0 of a block is its busy flag: set when the worker fills the block, cleared by the
  trainer's process when the last tensor of that batch is garbage (``BatchBlock.to_batch``) or
  once the batch is copied to pinned memory. A busy block is never written. When every block is
  busy (the trainer holds many batches) the pool grows up to ``max_blocks``, then hands out
  one-off blocks that are not reused.
* ``ship`` sends a block's tensor (its file descriptor) only the first time; later batches in it
  carry just its id, and ``BlockRegistry`` (in the trainer's process) supplies the mapping it
  kept. A block the pool drops (too small) is named in the next batch, and the registry forgets it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from xoron_dist.data.batch import BatchBlock

HEADROOM = 1.25  # a new block is this much larger than the batch that needed it (batches vary in size)


class SharedBlockPool:
    """A worker's blocks: ``allocate`` is ``collate``'s ``batch.Allocate``; ``ship`` prepares a
    batch for the trip. ``resend``: send the tensor every time (for the DataLoader's pinning
    thread, which copies the batch before the loader sees it)."""

    def __init__(self, max_blocks: int = 6, resend: bool = False) -> None:
        self.max_blocks, self.resend = max_blocks, resend
        self.blocks: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # id -> (capacity,) uint8 and its numpy view
        self._next_id = 0
        self._sent: set[int] = set()
        self._retired: list[int] = []

    def allocate(self, nbytes: int) -> tuple[torch.Tensor, int | None]:
        free = [i for i, (_, data) in self.blocks.items() if data[0] == 0]
        fitting = [i for i in free if len(self.blocks[i][1]) >= nbytes]
        if fitting:
            pool_id = min(fitting, key=lambda i: len(self.blocks[i][1]))
        elif free or len(self.blocks) < self.max_blocks:
            if free:  # all too small: replace the largest free one
                retired = max(free, key=lambda i: len(self.blocks[i][1]))
                del self.blocks[retired]
                self._retired.append(retired)
            pool_id, self._next_id = self._next_id, self._next_id + 1
            block = torch.empty(int(nbytes * HEADROOM), dtype=torch.uint8).share_memory_()
            self.blocks[pool_id] = (block, block.numpy())
        else:
            return torch.empty(nbytes, dtype=torch.uint8).share_memory_(), None
        block, data = self.blocks[pool_id]
        data[0] = 1
        return block, pool_id

    def ship(self, block: BatchBlock) -> BatchBlock:
        """``block`` as it crosses to the trainer's process (see the module docstring)."""
        retired, self._retired = tuple(self._retired), []
        if block.pool_id is None or self.resend or block.pool_id not in self._sent:
            if block.pool_id is not None:
                self._sent.add(block.pool_id)
            return dataclasses.replace(block, retired=retired)
        return dataclasses.replace(block, buffer=None, retired=retired)


class BlockRegistry:
    """The trainer's side of ``SharedBlockPool.ship``: the pool blocks received, by (worker, id)."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}

    def receive(self, worker: int, block: BatchBlock) -> BatchBlock:
        for pool_id in block.retired:
            self.blocks.pop((worker, pool_id), None)
        if block.pool_id is None:
            return block
        if block.buffer is None:
            return dataclasses.replace(block, buffer=self.blocks[worker, block.pool_id])
        self.blocks[worker, block.pool_id] = block.buffer
        return block
