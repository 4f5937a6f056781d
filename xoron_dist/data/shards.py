"""Reading prepared Arrow shards: verify against the manifest, memory-map, random access to rows.

``PreparedData(root)`` opens a folder written by ``xoron prep`` (``manifest.json`` + per-kind Arrow
IPC file shards, see ``schema.py``). Each dataset (``ArrowDataset``) is the concatenation of its
shards in manifest order; row ``i`` is found by the cumulative row counts of the shards, then by
the record-batch offsets inside the shard. A shard is checked against its manifest entry the first
time a process opens it (size always, sha256 when asked, row count and kind always) and
memory-mapped (``pa.memory_map`` + ``pa.ipc.open_file``): reading a row touches only the pages of
that row, never the whole table. Token lists and media come back as read-only numpy views into the
mapping (zero-copy); a medium also carries where it lies in its shard file (``media_ref``), so that
the loader can hand it to the trainer's process as a view of the same file, never copied
(``packing.collate_block``, ``batch.mapped_file``).

A worker process inherits the set of shards its parent already hashed, so the sha256 pass runs
once per process tree (the loader hashes in the trainer's process before it starts workers).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xoron_dist.data.batch import FileKey
from xoron_dist.data.schema import (
    MANIFEST_FILE,
    CorruptShardError,
    DatasetInfo,
    Manifest,
    ShardInfo,
    media_of,
    verify_shard,
)


class MalformedSampleError(ValueError):
    """A row whose media bytes do not match its recorded dimensions (the loader skips and counts it)."""


class TokenizerMismatchError(ValueError):
    """The shards were tokenized by another tokenizer than the run's."""


@dataclass(slots=True)
class ArrowSample:
    """One row of a prepared dataset. Arrays are read-only views into the memory-mapped shard."""

    dataset: str
    kind: str
    id: str
    prompt_tokens: np.ndarray  # (prompt_len,) int32
    text_tokens: np.ndarray  # (text_len,) int32
    medium: str | None = None  # "image" | "video" | "audio" | None (text)
    media: np.ndarray | None = None  # image (H, W, 3) uint8 | video (T, H, W, 3) uint8 | audio (samples,) int16
    sample_rate: int | None = None  # audio only
    fps: float | None = None  # video only
    target_runs: np.ndarray | None = None  # chat kinds: flat (start, end) pairs into text_tokens, int32
    media_ref: tuple[FileKey, int] | None = None  # the medium's shard file and byte offset

    @property
    def audio_seconds(self) -> float:
        return len(self.media) / self.sample_rate


_DIMS = {"image": ("image_height", "image_width"),  # the columns that give a medium's shape
         "video": ("video_frames", "video_height", "video_width", "video_fps"),
         "audio": ("audio_samples", "sample_rate")}


class _Columns:
    """Views of one record batch's columns, built once per batch and reused for its rows.

    Offsets and dimensions are memoryviews (indexing one gives a Python int in ~25 ns, a numpy
    scalar takes ~3x that), token lists and media numpy arrays over the mapping: ``row`` is
    called for every sample the loader reads, so its few dozen operations are the cost per row.
    """

    def __init__(self, batch: pa.RecordBatch, dataset: str, kind: str, medium: str | None, path: Path,
                 base: int = 0, file_key: FileKey | None = None) -> None:
        self.dataset, self.kind, self.medium, self.path = dataset, kind, medium, path
        self.id_offsets, self.id_data = _binary_views(batch.column("id"))
        self.prompt_offsets, self.prompt_values = _list_views(batch.column("prompt_tokens"))
        self.text_offsets, self.text_values = _list_views(batch.column("text_tokens"))
        self.runs = _list_views(batch.column("target_runs")) if "target_runs" in batch.schema.names else None
        if medium is not None:
            column = batch.column(medium)
            self.media_offsets, media_data = _binary_views(column)
            self.media_data = np.frombuffer(media_data, dtype=np.uint8)
            # file offset of the column's data buffer (``base``: the mapping's address); offsets index into it
            data_buffer = column.buffers()[2]
            offset = data_buffer.address - base if data_buffer is not None else -1
            # only a buffer inside the file's mapping has a file offset (a compressed shard's would not)
            inside = file_key is not None and 0 <= offset and offset + data_buffer.size <= file_key[3]
            self.media_file = file_key if inside else None
            self.media_base = offset if inside else 0
            self.dims = [memoryview(batch.column(name).to_numpy()) for name in _DIMS[medium]]

    def row(self, i: int) -> ArrowSample:
        ids, prompts, texts = self.id_offsets, self.prompt_offsets, self.text_offsets
        sample = ArrowSample(self.dataset, self.kind, str(self.id_data[ids[i] : ids[i + 1]], "utf-8"),
                             self.prompt_values[prompts[i] : prompts[i + 1]],
                             self.text_values[texts[i] : texts[i + 1]])
        if self.medium is not None:
            self._attach_media(sample, i)
        if self.runs is not None:
            offsets, values = self.runs
            sample.target_runs = values[offsets[i] : offsets[i + 1]]
        return sample

    def _attach_media(self, sample: ArrowSample, i: int) -> None:
        medium, dims = self.medium, self.dims
        start, end = self.media_offsets[i], self.media_offsets[i + 1]
        if medium == "image":
            shape = (dims[0][i], dims[1][i], 3)
            size = shape[0] * shape[1] * 3
        elif medium == "video":
            shape = (dims[0][i], dims[1][i], dims[2][i], 3)
            size = shape[0] * shape[1] * shape[2] * 3
            sample.fps = dims[3][i]
        else:
            shape = (dims[0][i] * 2,)
            size = shape[0]
            sample.sample_rate = dims[1][i]
        if size != end - start or min(shape) <= 0:
            named = {name: values[i] for name, values in zip(_DIMS[medium], dims, strict=True)}
            raise MalformedSampleError(
                f"sample '{sample.id}' in {self.path}: {medium} has {end - start} bytes, its dimensions "
                f"{named} need {size}"
            )
        sample.medium = medium
        if self.media_file is not None:
            sample.media_ref = (self.media_file, self.media_base + start)
        raw = self.media_data[start:end]
        sample.media = raw.view(np.int16) if medium == "audio" else raw.reshape(shape)


def _list_views(column: pa.ListArray) -> tuple[memoryview, np.ndarray]:
    # offsets index into .values and already include the array's slice offset
    return memoryview(column.offsets.to_numpy()), column.values.to_numpy(zero_copy_only=True)


def _binary_views(column: pa.BinaryArray | pa.StringArray) -> tuple[memoryview, memoryview]:
    _, offsets, data = column.buffers()
    offsets = memoryview(offsets).cast("i")[column.offset : column.offset + len(column) + 1]
    return offsets, memoryview(data) if data is not None else memoryview(b"")


class _OpenShard:
    """A memory-mapped shard: its record batches and their first-row offsets."""

    def __init__(self, path: Path, info: ShardInfo, kind: str) -> None:
        self.path = path = Path(os.path.abspath(path))
        self.mapping = pa.memory_map(str(path), "r")
        self.base = self.mapping.read_buffer(1).address  # the mapping's first byte: file offsets of buffers
        self.mapping.seek(0)
        stat = os.stat(path)
        self.file_key: FileKey = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        try:
            reader = pa.ipc.open_file(self.mapping)
        except pa.ArrowInvalid as err:
            raise CorruptShardError(
                f"shard {path} is not a readable Arrow IPC file ({err}); re-run xoron prep"
            ) from err
        found_kind = (reader.schema.metadata or {}).get(b"xoron_kind", b"").decode()
        if found_kind != kind:
            raise CorruptShardError(f"shard {path} holds kind '{found_kind}' but is listed under a '{kind}' dataset")
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = [0, *itertools.accumulate(b.num_rows for b in self.batches)]  # num_batches + 1
        if self.starts[-1] != info.rows:
            raise CorruptShardError(f"shard {path} has {self.starts[-1]} rows, the manifest says {info.rows}")
        self.columns: list[_Columns | None] = [None] * len(self.batches)


class ArrowDataset:
    """All shards of one dataset (one kind) as one row-addressable table."""

    def __init__(self, root: Path, name: str, info: DatasetInfo, *, verify_checksums: bool) -> None:
        self.root, self.name, self.info = Path(root), name, info
        self.kind = info.kind
        self.medium = media_of(info.kind)
        self.verify_checksums = verify_checksums
        self._shard_starts = [0, *itertools.accumulate(s.rows for s in info.shards)]  # of each shard, then the total
        self._rows = self._shard_starts[-1]
        self._hashed: set[int] = set()  # shards whose sha256 this process (or its parent) checked
        self._open: dict[int, _OpenShard] = {}

    def __len__(self) -> int:
        return self._rows

    def __getstate__(self) -> dict[str, Any]:
        # Mappings do not cross process boundaries; a worker reopens what it reads.
        return {**self.__dict__, "_open": {}}

    def verify(self) -> None:
        """Check every shard now (size; sha256 if ``verify_checksums``): fail at start, not mid-run."""
        for index, shard in enumerate(self.info.shards):
            self._verify(index, shard)

    def _verify(self, index: int, shard: ShardInfo) -> Path:
        checksum = self.verify_checksums and index not in self._hashed
        path = verify_shard(self.root, shard, checksum=checksum)
        if checksum:
            self._hashed.add(index)
        return path

    def _shard(self, index: int) -> _OpenShard:
        if index not in self._open:
            shard = self.info.shards[index]
            self._open[index] = _OpenShard(self._verify(index, shard), shard, self.kind)
        return self._open[index]

    def sample(self, row: int) -> ArrowSample:
        """Row ``row`` (0 <= row < len) across the shards."""
        if not 0 <= row < self._rows:
            raise IndexError(f"row {row} is outside dataset '{self.name}' ({len(self)} rows)")
        # bisect on Python lists: a scalar np.searchsorted costs ~1 us of call overhead
        shard_index = bisect_right(self._shard_starts, row) - 1
        shard = self._open.get(shard_index) or self._shard(shard_index)
        local = row - self._shard_starts[shard_index]
        batch_index = bisect_right(shard.starts, local) - 1
        columns = shard.columns[batch_index]
        if columns is None:
            columns = shard.columns[batch_index] = _Columns(shard.batches[batch_index], self.name, self.kind,
                                                            self.medium, shard.path, shard.base, shard.file_key)
        return columns.row(local - shard.starts[batch_index])


def tokenizer_sha256(tokenizer: Any) -> str | None:
    """sha256 of the ``tokenizer.json`` that ``XoronTokenizer.save`` writes for ``tokenizer``
    (what the manifest records); None for a tokenizer object without a ``tokenizers`` backend."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str(pretty=True).encode("utf-8")).hexdigest()


class PreparedData:
    """A prepared folder: its manifest and one ``ArrowDataset`` per dataset it lists."""

    def __init__(self, root: str | Path, *, verify_checksums: bool = True) -> None:
        self.root = Path(root)
        self.manifest = Manifest.read(self.root)
        self.datasets = {
            name: ArrowDataset(self.root, name, info, verify_checksums=verify_checksums)
            for name, info in sorted(self.manifest.datasets.items())
        }

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``TokenizerMismatchError`` unless the shards were tokenized by ``tokenizer``."""
        recorded = self.manifest.tokenizer
        where = self.root / MANIFEST_FILE
        fix = ("re-run xoron prep with the run's tokenizer (or point tokenizer.path at the one prep used); "
               "token ids from another tokenizer mean nothing to this model")
        vocab = recorded.get("vocab_size")
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise TokenizerMismatchError(
                f"{where}: the shards were tokenized by a tokenizer with {vocab} ids, this run's has "
                f"{tokenizer.vocab_size}; {fix}"
            )
        sha, ours = recorded.get("sha256"), tokenizer_sha256(tokenizer)
        if sha is not None and ours is not None and sha != ours:
            raise TokenizerMismatchError(
                f"{where}: the shards were tokenized by tokenizer.json with sha256 {sha[:12]}..., this run's "
                f"tokenizer has {ours[:12]}...; {fix}"
            )
