"""ArrowShardWriter: IPC file shards that memory-map, roll at shard_bytes, and are written atomically."""

import pyarrow as pa
import pytest

from data_prep.writer import ArrowShardWriter
from xoron_dist.data.schema import schema_for, sha256_file


def image_row(i: int) -> dict:
    return {"id": f"img-{i}", "kind": "image_caption", "source": "s", "prompt_tokens": [1, 2],
            "text_tokens": list(range(i % 7)), "image": bytes([i % 256]) * 3072, "image_height": 32,
            "image_width": 32}


def test_rolls_shards_and_reports_rows_bytes_sha(tmp_path):
    writer = ArrowShardWriter(tmp_path, "image_caption", "s-u00000", shard_bytes=20_000)
    for i in range(20):
        writer.write(image_row(i), 3200)
    shards = writer.close()
    assert len(shards) > 3 and sum(s.rows for s in shards) == 20
    assert [s.path for s in shards] == [f"image_caption/s-u00000-{n:03d}.arrow" for n in range(len(shards))]
    ids = []
    for shard in shards:
        path = tmp_path / shard.path
        assert shard.bytes == path.stat().st_size <= 20_000
        assert shard.sha256 == sha256_file(path)
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)  # the file format, with its footer
            assert reader.schema.equals(schema_for("image_caption"), check_metadata=True)
            table = reader.read_all()
        assert table.num_rows == shard.rows
        ids += table.column("id").to_pylist()
    assert ids == [f"img-{i}" for i in range(20)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_rows_same_bytes_and_abort_leaves_no_tmp(tmp_path):
    for name in ("a", "b"):
        writer = ArrowShardWriter(tmp_path / name, "image_caption", "x", shard_bytes=1 << 20)
        for i in range(5):
            writer.write(image_row(i), 3200)
        writer.close()
    shard = "image_caption/x-000.arrow"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    with pytest.raises(RuntimeError), ArrowShardWriter(tmp_path / "c", "image_caption", "x", shard_bytes=8000) as w:
        for i in range(5):
            w.write(image_row(i), 3200)
        raise RuntimeError("interrupted")
    assert not list((tmp_path / "c").rglob("*.tmp"))
