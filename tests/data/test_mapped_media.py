"""Media left in their shard files (``batch.mapped_file``): the trainer's process views them in its own
copy-on-write mapping of the shard instead of receiving a copy (the loader's zero-copy media)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.data import batch as batch_module
from xoron_dist.data.batch import BatchBlock, BlockLayout, ShardChangedError, allocate_local, mapped_file
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.data.schema import KINDS


def _file(path, payload: bytes):
    path.write_bytes(payload)
    stat = os.stat(path)
    return (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@pytest.mark.parametrize("workers", [0, 1])
def test_mapped_media_equal_copied_media_and_are_views_of_the_shards(tmp_path, arrow_tokenizer, workers):
    """The same batches with media mapped (the default) and copied (``pin_memory``, which needs them in the
    block; on CPU nothing is pinned); mapped media are views of a whole shard file, writable, and a write
    reaches neither the file nor the next batch that reads the same medium."""
    rows = {kind: make_rows(kind, 10, seed=i) for i, kind in enumerate(KINDS)}
    write_prepared(tmp_path, rows, arrow_tokenizer)
    shard_sizes = {p.stat().st_size for p in tmp_path.rglob("*.arrow")}
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.arrow")}

    def take(pin_memory):
        loader = ArrowDataLoader(tmp_path, data_config(tmp_path, num_workers=workers), arrow_tokenizer, seq_len=64,
                                 micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, pin_memory=pin_memory)
        batches = [loader.next_batch() for _ in range(12)]
        loader.close()
        return batches

    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else _nothing():
        copied = take(True)
    mapped = take(False)
    media = [t for b in mapped for t in b.images + b.videos + b.audios]
    assert media and all(_in_a_shard_mapping(t, shard_sizes) for t in media)  # views of the shards
    assert not any(_in_a_shard_mapping(t, shard_sizes) for b in copied for t in b.images + b.audios)
    for a, b in zip(mapped, copied, strict=True):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert all(torch.equal(x, y) for x, y in zip(a.images + a.videos + a.audios, b.images + b.videos + b.audios,
                                                     strict=True))
    for tensor in media:
        tensor.zero_()  # copy-on-write: this process's pages only
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.arrow")} == before
    again = take(False)
    assert all(torch.equal(x, y) for a, b in zip(again, copied, strict=True)
               for x, y in zip(a.images + a.audios, b.images + b.audios, strict=True))


def _in_a_shard_mapping(tensor: torch.Tensor, shard_sizes: set[int]) -> bool:
    """Whether ``tensor``'s bytes lie in a region this process mapped from a shard file (Linux: /proc)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *path = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= ptr < end:
            return bool(path) and path[0].endswith(".arrow") and os.path.getsize(path[0]) in shard_sizes
    return False


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_shard_changed_after_the_loader_opened_it_is_refused(tmp_path):
    path = tmp_path / "shard.arrow"
    key = _file(path, bytes(range(64)))
    path.write_bytes(bytes(64))  # prepared again after the loader read it: another mtime
    os.utime(path, ns=(key[2] + 10**9, key[2] + 10**9))
    with pytest.raises(ShardChangedError, match="shard.arrow changed after the loader opened it"):
        mapped_file(key)


def test_at_most_max_open_descriptors_stay_and_mappings_outlive_theirs(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_module, "MAX_OPEN", 2)
    batch_module._OPEN.clear()
    keys = [_file(tmp_path / f"{i}.arrow", bytes([i]) * 32) for i in range(3)]
    first = torch.from_numpy(mapped_file(keys[0])[:4])
    for key in keys[1:]:
        mapped_file(key)
    assert list(batch_module._OPEN) == keys[1:]  # the least recently used descriptor was closed
    assert first.tolist() == [0, 0, 0, 0]  # its mapping holds a descriptor of its own
    assert mapped_file(keys[0])[0] == 0  # and the file opens again when asked


def test_each_batch_views_its_own_mapping(tmp_path):
    """Two batches of one block (a medium left in a file): an in-place edit of one's medium leaves the
    other's and the file's bytes as they were."""
    block = _mapped_block(tmp_path)
    first, second = block.to_batch(), block.to_batch()
    first.images[0].zero_()
    assert second.images[0].flatten().tolist() == list(range(10, 16))
    assert (tmp_path / "shard.arrow").read_bytes() == bytes(range(100))


def _mapped_block(tmp_path) -> BatchBlock:
    """A one-row block whose first image is left in a 100-byte file (bytes 10..15), the second in the block (9s)."""
    key = _file(tmp_path / "shard.arrow", bytes(range(100)))
    layout = BlockLayout()
    for name in ("input_ids", "labels", "position_ids", "document_ids"):
        layout.add(name, np.dtype(np.int64), (1, 4))
    layout.add_run("images", np.dtype(np.uint8), [(2, 3, 1), (2, 2, 1)], [(key, 10), None])
    buffer, _ = allocate_local(layout.nbytes)
    data = buffer.numpy()
    data[:] = 0
    own = [e for e in layout.entries if e[0] == "images" and isinstance(e[3], int)][0][3]
    data[own : own + 4] = 9
    return BatchBlock(buffer, layout.entries, [[]], 0, layout.nbytes, None)


def test_materialize_copies_mapped_media_into_the_block(tmp_path):
    """What pinning does first: a block with a medium left in a file gets it copied in after the rest."""
    block = _mapped_block(tmp_path)
    whole = block.materialize()
    assert all(isinstance(entry[3], int) for entry in whole.entries)
    for batch in (block.to_batch(), whole.to_batch()):
        assert batch.images[0].flatten().tolist() == list(range(10, 16))
        assert batch.images[1].flatten().tolist() == [9, 9, 9, 9]
    start = whole.to_batch().images[0].data_ptr() - whole.buffer.data_ptr()
    assert 0 <= start < whole.nbytes  # now inside the block's own buffer
