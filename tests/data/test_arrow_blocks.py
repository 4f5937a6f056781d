"""One-buffer batches (``BatchBlock``) and the workers' reused shared-memory blocks."""

import gc

import numpy as np
import pytest
import torch

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.data.batch import ALIGN, BatchBlock, BlockLayout, allocate_local
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.data.schema import KINDS
from xoron_dist.data.shared_blocks import BlockRegistry, SharedBlockPool

INT64 = np.dtype(np.int64)


def _block(allocate, rows=2, seq=8, images=((2, 3, 3),)) -> BatchBlock:
    """A small batch written through ``allocate``: token tensors numbered, images filled with 7."""
    layout = BlockLayout()
    for name in ("input_ids", "labels", "position_ids", "document_ids"):
        layout.add(name, INT64, (rows, seq))
    layout.add_run("images", np.dtype(np.uint8), list(images))
    buffer, pool_id = allocate(layout.nbytes)
    data = buffer.numpy()
    for _, dtype, shape, offset in layout.entries:
        size = int(np.prod(shape)) * dtype.itemsize
        data[offset : offset + size].view(dtype)[:] = np.arange(size // dtype.itemsize) % 100 if dtype == INT64 else 7
    return BatchBlock(buffer, layout.entries, [[] for _ in range(rows)], 0, layout.nbytes, pool_id)


def test_layout_aligns_each_tensor_and_batch_views_share_the_buffer():
    layout = BlockLayout()
    layout.add("input_ids", INT64, (3, 5))
    start = layout.add_run("audios", np.dtype(np.int16), [(3,), (5,)])
    layout.add("labels", INT64, (3, 5))
    offsets = [offset for *_, offset in layout.entries]
    assert offsets[0] == ALIGN and start % ALIGN == 0 and offsets[-1] % ALIGN == 0
    assert offsets[1:3] == [start, start + 6]  # a run is back to back
    block = _block(allocate_local)
    batch = block.to_batch()
    assert batch.input_ids.shape == (2, 8) and batch.input_ids.dtype == torch.int64
    start, end = block.buffer.data_ptr(), block.buffer.data_ptr() + block.nbytes
    assert all(start <= t.data_ptr() < end for t in (batch.input_ids, batch.labels, batch.images[0]))  # views
    assert batch.images[0].shape == (2, 3, 3) and (batch.images[0] == 7).all()


def test_pool_reuses_a_block_only_after_every_tensor_of_its_batch_is_gone():
    pool = SharedBlockPool(max_blocks=2)
    first = _block(pool.allocate)
    batch = first.to_batch()
    image = batch.images[0]
    del batch
    gc.collect()
    second = _block(pool.allocate)
    assert second.pool_id != first.pool_id  # the image still pins the first block
    del image
    gc.collect()
    third = _block(pool.allocate)
    assert third.pool_id == first.pool_id and third.buffer.data_ptr() == first.buffer.data_ptr()
    # both pool blocks busy (second and third never released): a one-off block, not pooled
    held = second.to_batch(), third.to_batch()
    assert _block(pool.allocate).pool_id is None and len(pool.blocks) == 2
    assert all((b.images[0] == 7).all() for b in held)


def test_blocks_cross_once_and_retired_blocks_are_forgotten():
    pool, registry = SharedBlockPool(max_blocks=1), BlockRegistry()
    sent = pool.ship(_block(pool.allocate))
    assert sent.buffer is not None
    received = registry.receive(0, sent).to_batch()
    del received
    gc.collect()
    again = pool.ship(_block(pool.allocate))
    assert again.buffer is None and again.pool_id == sent.pool_id  # the receiver already maps it
    assert torch.equal(registry.receive(0, again).to_batch().input_ids, _block(allocate_local).to_batch().input_ids)
    gc.collect()
    bigger = pool.ship(_block(pool.allocate, seq=4096))  # the free block is too small: replaced
    assert bigger.buffer is not None and bigger.retired == (sent.pool_id,)
    registry.receive(0, bigger)
    assert list(registry.blocks) == [(0, bigger.pool_id)]
    assert SharedBlockPool(resend=True).ship(_block(SharedBlockPool(resend=True).allocate)).buffer is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pinning_copies_the_batch_and_frees_its_block():
    pool = SharedBlockPool()
    block = _block(pool.allocate)
    pinned = block.pin_memory()
    assert pinned.buffer.is_pinned() and pinned.pool_id is None
    assert pool.blocks[block.pool_id][1][0] == 0
    assert (pinned.to_batch().images[0] == 7).all()


def test_held_batches_are_never_overwritten(tmp_path, arrow_tokenizer):
    # a trainer that keeps every batch: the worker's pool fills up, then one-off blocks follow
    rows = {kind: make_rows(kind, 10, seed=i) for i, kind in enumerate(KINDS)}
    write_prepared(tmp_path, rows, arrow_tokenizer)

    def loader(workers):
        return ArrowDataLoader(tmp_path, data_config(tmp_path, num_workers=workers), arrow_tokenizer, seq_len=64,
                               micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)

    worker, in_process = loader(1), loader(0)
    kept = [worker.next_batch() for _ in range(20)]
    expected = [in_process.next_batch() for _ in range(20)]
    worker.close()
    for a, b in zip(kept, expected, strict=True):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.image_spans, b.image_spans)
        assert all(torch.equal(x, y) for x, y in zip(a.images + a.audios, b.images + b.audios, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pinned_batches_from_workers_match_unpinned_ones(tmp_path, arrow_tokenizer):
    rows = {kind: make_rows(kind, 10, seed=i) for i, kind in enumerate(KINDS)}
    write_prepared(tmp_path, rows, arrow_tokenizer)

    def take(pin_memory):
        loader = ArrowDataLoader(tmp_path, data_config(tmp_path, num_workers=2), arrow_tokenizer, seq_len=64,
                                 micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, pin_memory=pin_memory)
        batches = [loader.next_batch() for _ in range(12)]
        loader.close()
        return batches

    for a, b in zip(take(True), take(False), strict=True):
        assert a.input_ids.is_pinned() and all(t.is_pinned() for t in a.images)
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert all(torch.equal(x, y) for x, y in zip(a.images + a.audios, b.images + b.audios, strict=True))


def test_the_pinning_path_runs_against_a_stand_in(monkeypatch):
    """What DataLoader(pin_memory=True) does to a worker's item on a GPU machine, run on CPU: torch's own
    pin_memory walk over ``(worker, state, block)`` calls ``BatchBlock.pin_memory``, which copies the
    block's bytes once into page-locked memory (here a stand-in with ``Tensor.pin_memory``'s contract:
    a new tensor holding the same bytes) and gives the shared pool block back at once."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def stand_in(self, device=None):
        copy = self.clone()
        pinned.append(copy.data_ptr())
        return copy

    pool = SharedBlockPool()
    block = _block(pool.allocate)
    expected = block.to_batch()
    expected = [t.clone() for t in (expected.input_ids, expected.labels, *expected.images)]
    monkeypatch.setattr(torch.Tensor, "pin_memory", stand_in)
    worker, state, out = pin_memory((1, {"position": [3, 4]}, block))
    assert (worker, state) == (1, {"position": [3, 4]})
    assert pinned == [out.buffer.data_ptr()] and out.pool_id is None  # one copy, of the block's bytes
    assert pool.blocks[block.pool_id][1][0] == 0  # the pool block is free for the worker again
    batch = out.to_batch()
    assert all(torch.equal(a, b) for a, b in zip(expected, (batch.input_ids, batch.labels, *batch.images),
                                                  strict=True))


def test_batches_go_to_a_gpu_without_waiting(monkeypatch):
    """The trainer's host-to-device copy is asynchronous on CUDA (from pinned memory), plain elsewhere."""
    from xoron_dist.train.sources import TextBatch, to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append(
        (str(device), non_blocking)) or self)
    packed = _block(allocate_local).to_batch()
    text = TextBatch(packed.input_ids, packed.labels)
    for batch in (packed, text):
        calls.clear()
        to_device(batch, torch.device("cuda", 0))
        assert calls and set(calls) == {("cuda:0", True)}
        calls.clear()
        to_device(batch, torch.device("cpu"))
        assert set(calls) == {("cpu", False)}
