"""``PackedBatch``: one micro-batch of packed rows, the unit the Arrow loader hands the trainer.

Each row holds several documents (samples, or pieces of a long text) back to back, then padding.
Documents never see each other: ``document_ids`` separates them (the model masks attention by it)
and ``position_ids`` restart at 0 in each one. Media sit outside the token tensors: every image,
video and audio clip occupies a run of ``<|x_pad|>`` placeholders in ``input_ids`` whose place is
given by its span ``(row, start, length)``; the encoder's output replaces those positions
(understanding), or the generator is trained to produce the medium (``*_is_target``).

Padding: ``input_ids`` = the tokenizer's pad id, ``labels`` = -100, ``position_ids`` = 0,
``document_ids`` = -1.

``BatchBlock`` is the same batch laid out in *one* flat byte buffer (every tensor at a 64-byte
aligned offset): ``collate`` writes straight into it and ``to_batch()`` turns it into a
``PackedBatch`` of views without copying. A loader worker hands the trainer's process one
shared-memory block per batch, one file descriptor, instead of a dozen tensors (each its own
shared-memory segment and descriptor hand-over, most of a batch's cost) and several media copies.

**Media stay in the shards.** A medium read as is from a prepared shard need not be in the block at
all: its entry then names the shard file and the byte offset there (``collate_block(map_media=True)``)
and ``to_batch`` views it in that file's mapping (``mapped_file``: a private copy-on-write mapping of
each file per batch, so the tensor is writable and a write reaches neither the file nor another
batch). A batch's ~5 MB of media then cross no copy at all, neither into the block nor out of it: the shard's page
cache is the one copy (what the loader's benchmark calls zero-copy media to the trainer).
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from xoron_dist.model.common.noise import keep_content_keys
from xoron_dist.model.llm.head import IGNORE_INDEX  # -100: the label of positions without loss
from xoron_dist.model.modalities import MODALITIES
from xoron_dist.utils.host_syncs import host_values, keep_host_copy

PAD_DOCUMENT = -1  # document id of padding

# PackedBatch's fields per medium of the modality table: its tensors, and its list of media
_TENSORS = ("input_ids", "labels", "position_ids", "document_ids",
            *(f"{row.name}_{part}" for row in MODALITIES for part in ("spans", "is_target")))
_TENSOR_LISTS = tuple(row.batch_field for row in MODALITIES)
# read by the model on the host: the spans, the target flags and the document ids (the documents' lengths)
_HOST_COPIED = ("document_ids", *(f"{row.name}_{part}" for row in MODALITIES for part in ("spans", "is_target")))


def _empty_spans() -> torch.Tensor:
    return torch.zeros((0, 3), dtype=torch.long)


def _empty_flags() -> torch.Tensor:
    return torch.zeros((0,), dtype=torch.bool)


@dataclass
class PackedBatch:
    """Rows of ``seq_len`` tokens, each packed with whole documents; shapes in the field comments.

    ``labels[b, t]`` is the target for the token after position t (``input_ids[b, t + 1]``) when
    that token is trained on and lies in the same document, else -100. ``sample_ids[b]`` lists the
    documents of row b in order (a piece of a split text is ``"<id>#<piece>"``).
    """

    input_ids: torch.Tensor  # (batch, seq) int64
    labels: torch.Tensor  # (batch, seq) int64, -100 = no loss
    position_ids: torch.Tensor  # (batch, seq) int64, 0 at each document start
    document_ids: torch.Tensor  # (batch, seq) int64, distinct per document within a row, -1 = padding
    sample_ids: list[list[str]]  # per row
    num_label_tokens: int  # positions with a language-model target (labels != -100), counted on the CPU
    images: list[torch.Tensor] = field(default_factory=list)  # each (height, width, 3) uint8 RGB
    image_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_images, 3): row, start, length
    image_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_images,) True = to generate
    videos: list[torch.Tensor] = field(default_factory=list)  # each (frames, height, width, 3) uint8
    video_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_videos, 3)
    video_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_videos,)
    audios: list[torch.Tensor] = field(default_factory=list)  # each (samples,) int16 PCM, mono
    audio_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_audios, 3)
    audio_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_audios,)

    def _map(self, fn) -> PackedBatch:
        changes = {name: fn(getattr(self, name)) for name in _TENSORS}
        changes.update({name: [fn(t) for t in getattr(self, name)] for name in _TENSOR_LISTS})
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The batch on ``device``. What the model decides on the host it need not read back from the device:
        each medium carries its host copy's content key (the generators' noise seeds), and the document ids,
        spans and target flags a host copy (``utils.host_syncs.host_copy``)."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        for name in _TENSOR_LISTS:
            keep_content_keys(getattr(self, name), getattr(moved, name))
        for name in _HOST_COPIED:
            keep_host_copy(getattr(self, name), getattr(moved, name))
        return moved

    def pin_memory(self) -> PackedBatch:
        """Page-locked copies (``torch.utils.data.DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())


ALIGN = 64  # bytes: each tensor of a block starts on a cache line, aligned for every dtype

# A block's entries: (PackedBatch field, numpy dtype, shape, where); a list field (images, videos,
# audios) has one entry per tensor, in order. where: the byte offset in the block, or for a medium
# left in its shard (the file's key, byte offset in the file).
FileKey = tuple[str, int, int, int]  # a shard file as a loader opened it: (absolute path, inode, mtime_ns, size)
Entry = tuple[str, np.dtype, tuple[int, ...], "int | tuple[FileKey, int]"]


class ShardChangedError(RuntimeError):
    """A shard file was replaced or rewritten after the loader had opened it."""


_OPEN: OrderedDict[FileKey, int] = OrderedDict()  # this process's checked shard files' descriptors, newest last
MAX_OPEN = 64  # descriptors kept (thousands of shards would pass the open-file limit); mappings hold their own


def mapped_file(key: FileKey) -> np.ndarray:
    """The whole shard file ``key`` as a writable uint8 array over a new private (copy-on-write) mapping:
    a write changes this mapping's pages only, never the file or another mapping (so a batch that edits
    its media in place leaves every other batch's alone). The page cache is shared, so mapping costs no
    copy. The file must be the one the loader opened (same inode, mtime and size; checked when this
    process first opens it), else ``ShardChangedError``. The mapping lives as long as arrays view it."""
    fd = _OPEN.get(key)
    if fd is None:
        path, inode, mtime_ns, size = key
        fd = os.open(path, os.O_RDONLY)
        found = os.fstat(fd)
        if (found.st_ino, found.st_mtime_ns, found.st_size) != (inode, mtime_ns, size):
            os.close(fd)
            raise ShardChangedError(f"shard {path} changed after the loader opened it (prepared again?); "
                                    "restart the loader")
        _OPEN[key] = fd
        while len(_OPEN) > MAX_OPEN:
            os.close(_OPEN.popitem(last=False)[1])
    else:
        _OPEN.move_to_end(key)
    return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), np.uint8)


class _Mappings(dict):
    """One batch's own mapping of each shard file it reads (``mapped_file``, made on first use)."""

    def __missing__(self, key: FileKey) -> np.ndarray:
        mapping = self[key] = mapped_file(key)
        return mapping


class BlockLayout:
    """Assigns each tensor of a batch its aligned place in one buffer; the first ``ALIGN`` bytes
    are the header (byte 0: the busy flag of a pooled block)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.nbytes = ALIGN

    def add(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> int:
        """Reserve room for one tensor; its byte offset."""
        return self.add_run(name, dtype, [shape])

    def add_run(self, name: str, dtype: np.dtype, shapes: list[tuple[int, ...]],
                sources: list[tuple[FileKey, int] | None] | None = None) -> int:
        """Reserve one region for tensors of one dtype back to back (each stays aligned for its
        dtype), so that a single copy can fill them all; the region's byte offset. ``sources``: per
        tensor, its (file, offset) to leave it there (no room in the region), or None."""
        start = offset = self.nbytes
        for k, shape in enumerate(shapes):
            if sources is not None and sources[k] is not None:
                self.entries.append((name, dtype, shape, sources[k]))
                continue
            self.entries.append((name, dtype, shape, offset))
            offset += math.prod(shape) * dtype.itemsize
        self.nbytes = start + -(-(offset - start) // ALIGN) * ALIGN
        return start


def view(buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """The tensor at ``offset`` of a uint8 ``buffer``, as a numpy view (whose base is ``buffer``)."""
    return np.ndarray(shape, dtype, buffer, offset)


@dataclass
class BatchBlock:
    """A ``PackedBatch`` in one uint8 buffer (see the module docstring); what crosses processes.

    ``pool_id``: the buffer is block ``pool_id`` of a worker's ``SharedBlockPool``, whose byte 0
    is its busy flag: the trainer's process clears it once every tensor of the batch is gone
    (``to_batch``), and the worker then writes a later batch there. Such a block crosses the
    process boundary once; later batches in it travel without ``buffer`` (``BlockRegistry``).
    """

    buffer: torch.Tensor | None  # (>= nbytes,) uint8; None: pool block ``pool_id``, which the receiver holds
    entries: list[Entry]
    sample_ids: list[list[str]]
    num_label_tokens: int
    nbytes: int  # bytes of the buffer in use
    pool_id: int | None = None
    retired: tuple[int, ...] = ()  # pool blocks the worker has dropped: the receiver forgets them

    def to_batch(self) -> PackedBatch:
        """The batch as views of the buffer (no copy)."""
        with host_values():  # the loader's own buffer: host memory in every run
            data = self.buffer.numpy()
        fields: dict[str, object] = {name: [] for name in _TENSOR_LISTS}
        from_numpy, ndarray = torch.from_numpy, np.ndarray  # ~50 tensors a batch: ``view`` inlined
        files = _Mappings()
        for name, dtype, shape, offset in self.entries:
            if type(offset) is int:
                tensor = from_numpy(ndarray(shape, dtype, data, offset))
            else:  # a medium left in its shard file
                key, offset = offset
                tensor = from_numpy(ndarray(shape, dtype, files[key], offset))
            if name in _TENSOR_LISTS:
                fields[name].append(tensor)
            else:
                fields[name] = tensor
        if self.pool_id is not None:
            # every view holds ``data`` (through numpy's base): it dies with the batch's last tensor
            weakref.finalize(data, _release, self.buffer[:1].numpy())
        return PackedBatch(sample_ids=self.sample_ids, num_label_tokens=self.num_label_tokens, **fields)

    def pin_memory(self) -> BatchBlock:
        """A page-locked copy (``DataLoader(pin_memory=True)`` calls this); frees a pool block at once."""
        whole = self.materialize()
        pinned = replace(whole, buffer=whole.buffer[: whole.nbytes].pin_memory(), pool_id=None)
        if self.pool_id is not None:
            _release(self.buffer[:1].numpy())
        return pinned

    def materialize(self) -> BatchBlock:
        """The block with every tensor in its buffer: media left in shard files are copied in after
        the rest (a new private buffer; the block itself when none is left outside)."""
        outside = [k for k, entry in enumerate(self.entries) if type(entry[3]) is not int]
        if not outside:
            return self
        entries, nbytes = list(self.entries), self.nbytes
        for k in outside:
            name, dtype, shape, _ = entries[k]
            entries[k] = (name, dtype, shape, nbytes)
            nbytes += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        data = buffer.numpy()
        data[: self.nbytes] = self.buffer[: self.nbytes].numpy()
        files = _Mappings()
        for k in outside:
            name, dtype, shape, (key, offset) = self.entries[k]
            view(data, dtype, shape, entries[k][3])[...] = view(files[key], dtype, shape, offset)
        data[0] = 0  # a private buffer: no busy flag
        return replace(self, buffer=buffer, entries=entries, nbytes=nbytes, pool_id=None)


def _release(flag: np.ndarray) -> None:
    flag[0] = 0


Allocate = Callable[[int], tuple[torch.Tensor, "int | None"]]  # nbytes -> ((>= nbytes,) uint8 buffer, pool id)


def allocate_local(nbytes: int) -> tuple[torch.Tensor, None]:
    """A private buffer of the trainer's process (no workers)."""
    return torch.empty(nbytes, dtype=torch.uint8), None


__all__ = ["IGNORE_INDEX", "PAD_DOCUMENT", "Allocate", "BatchBlock", "BlockLayout", "FileKey", "PackedBatch",
           "ShardChangedError", "allocate_local", "mapped_file"]
