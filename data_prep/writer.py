"""``ArrowShardWriter``: rows of one kind -> Arrow IPC *file* shards, rolled at a size, written atomically.

The IPC file format (not the stream format) has a footer indexing its record batches, so the
loader can memory-map a shard and reach any batch without reading the ones before. Buffers are
uncompressed for the same reason: a mapped column is used in place. Each shard is written as
``<name>.arrow.tmp``, fsynced and renamed, so a shard that exists is complete; rows, bytes and
sha256 of every finished shard go to the manifest.

Rows are buffered into record batches of about ``batch_bytes`` (at most ``batch_rows`` rows);
a shard is closed before a batch that would take it past ``shard_bytes``, so shards stay under
that size unless one batch alone is larger. The bytes depend only on the rows, never on the
process that wrote them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from xoron_dist.data.schema import ShardInfo, schema_for, sha256_file

BATCH_BYTES = 4 << 20
BATCH_ROWS = 1024
_FOOTER_BYTES = 1024  # room for the schema copy and batch index in the file footer


class ArrowShardWriter:
    """Writes ``<root>/<kind>/<prefix>-<n:03d>.arrow``, n = 0, 1, ...; ``close()`` returns their ShardInfos."""

    def __init__(self, root: Path, kind: str, prefix: str, shard_bytes: int,
                 batch_bytes: int = BATCH_BYTES, batch_rows: int = BATCH_ROWS) -> None:
        self.root, self.kind, self.prefix = Path(root), kind, prefix
        self.schema = schema_for(kind)
        self.shard_bytes = shard_bytes
        self.batch_bytes = max(1, min(batch_bytes, shard_bytes // 4))
        self.batch_rows = batch_rows
        self.shards: list[ShardInfo] = []
        self._rows: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._shard_rows = 0
        (self.root / kind).mkdir(parents=True, exist_ok=True)

    def write(self, values: dict[str, Any], nbytes: int) -> None:
        """Add one row (``values``: column -> value); ``nbytes``: its approximate size."""
        self._rows.append(values)
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.batch_bytes or len(self._rows) >= self.batch_rows:
            self._flush()

    def close(self) -> list[ShardInfo]:
        self._flush()
        self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp``); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._tmp_path().unlink(missing_ok=True)
        self._writer = self._sink = None
        self._rows = []

    def __enter__(self) -> ArrowShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # ------------------------------------------------------------------ internals

    def _relpath(self) -> str:
        return f"{self.kind}/{self.prefix}-{len(self.shards):03d}.arrow"

    def _tmp_path(self) -> Path:
        return self.root / (self._relpath() + ".tmp")

    def _flush(self) -> None:
        if not self._rows:
            return
        batch = pa.RecordBatch.from_pylist(self._rows, schema=self.schema)
        self._rows, self._pending_bytes = [], 0
        size = pa.ipc.get_record_batch_size(batch)
        if self._writer is not None and self._sink.tell() + size + _FOOTER_BYTES > self.shard_bytes:
            self._finish_shard()
        if self._writer is None:
            self._sink = pa.OSFile(str(self._tmp_path()), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
            self._shard_rows = 0
        self._writer.write_batch(batch)
        self._shard_rows += batch.num_rows

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self._writer = self._sink = None
        tmp, final = self._tmp_path(), self.root / self._relpath()
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
        self.shards.append(ShardInfo(self._relpath(), self._shard_rows, final.stat().st_size, sha256_file(final)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
