"""Small prepared folders for the loader tests, written directly with pyarrow + ``schema_for``
(no data_prep): rows of every kind with recognisable ids, tokens and media bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xoron_dist.config import DataConfig
from xoron_dist.data.schema import CHAT_KINDS, DatasetInfo, Manifest, ShardInfo, media_of, schema_for, sha256_file
from xoron_dist.data.shards import tokenizer_sha256

SAMPLE_RATE = 16_000


def make_rows(kind: str, count: int, *, seed: int = 0, text_len: tuple[int, int] = (3, 40),
              prompt_len: tuple[int, int] = (0, 4), audio_samples: int = 1600) -> list[dict[str, Any]]:
    """``count`` rows of ``kind``; ids ``<kind>-<i>``; token ids < 1000 (regular tokens)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        row = {
            "id": f"{kind}-{i}",
            "kind": kind,
            "source": "fixture",
            "prompt_tokens": rng.integers(0, 1000, rng.integers(*prompt_len, endpoint=True)).tolist(),
            "text_tokens": rng.integers(0, 1000, rng.integers(*text_len, endpoint=True)).tolist(),
        }
        medium = media_of(kind)
        if kind in CHAT_KINDS:  # the assistant turns: 1 or 2 runs of the text's tokens
            n = len(row["text_tokens"])
            cuts = sorted(rng.choice(np.arange(1, n + 1), size=min(n, 4), replace=False).tolist())
            row |= {"prompt_tokens": [], "target_runs": cuts[: len(cuts) // 2 * 2]}
        if medium == "image":
            h, w = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            row |= {"image": bytes([i % 256]) * (h * w * 3), "image_height": h, "image_width": w}
        elif medium == "video":
            t, h, w = int(rng.integers(1, 4)), 3, 4
            row |= {"video": bytes([i % 256]) * (t * h * w * 3), "video_frames": t, "video_height": h,
                    "video_width": w, "video_fps": 4.0}
        elif medium == "audio":
            pcm = np.full(audio_samples, i, dtype=np.int16)
            row |= {"audio": pcm.tobytes(), "audio_samples": audio_samples, "sample_rate": SAMPLE_RATE}
        rows.append(row)
    return rows


def write_prepared(root: Path, datasets: dict[str, list[dict[str, Any]]], tokenizer, *,
                   rows_per_shard: int = 16, rows_per_batch: int = 5) -> Manifest:
    """One folder per dataset, shards of ``rows_per_shard`` rows in record batches of ``rows_per_batch``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    infos = {}
    for name, rows in datasets.items():
        kind = rows[0]["kind"]
        schema = schema_for(kind)
        (root / name).mkdir(parents=True, exist_ok=True)
        shards = []
        for n, first in enumerate(range(0, len(rows), rows_per_shard)):
            chunk = rows[first : first + rows_per_shard]
            table = pa.Table.from_pylist(chunk, schema=schema)
            rel = f"{name}/part-{n:03d}.arrow"
            with pa.ipc.new_file(str(root / rel), schema) as writer:
                writer.write_table(table, max_chunksize=rows_per_batch)
            path = root / rel
            shards.append(ShardInfo(rel, len(chunk), path.stat().st_size, sha256_file(path)))
        infos[name] = DatasetInfo(kind, shards, {"rows": len(rows)})
    manifest = Manifest(
        datasets=infos,
        tokenizer={"kind": "bpe", "sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.vocab_size},
        preprocessing={"audio_sample_rate": SAMPLE_RATE},
        sources=["fixture.jsonl"],
    )
    manifest.write(root)
    return manifest


def data_config(root: Path, **overrides: Any) -> DataConfig:
    settings = {"source": "arrow", "path": str(root), "num_workers": 0, "image_tokens": 6, "video_tokens": 5,
                "audio_tokens_per_second": 12.5, "verify_checksums": True}
    return DataConfig(**(settings | overrides))
