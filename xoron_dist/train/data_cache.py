"""The prepared-data cache of runs on the built-in synthetic corpus (the smoke run).

With ``data.synth`` set, ``ensure_prepared`` fills ``data.path`` by ``xoron synth`` + ``xoron prep``
(rank 0; the others wait at a barrier) and reuses the folder while the synth settings, the
preprocessing and the tokenizer are unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xoron_dist.config import XoronConfig

logger = logging.getLogger(__name__)

SYNTH_RECORD = "synth_settings.json"


def _cache_key(cfg: XoronConfig, tokenizer_sha: str) -> dict[str, Any]:
    return {"synth": asdict(cfg.data.synth), "prep": asdict(cfg.data.prep), "tokenizer_sha256": tokenizer_sha}


def ensure_prepared(cfg: XoronConfig, tokenizer_dir: Path) -> Path:
    """Make sure ``data.path`` holds prepared shards; build them from ``data.synth`` when it does not.

    Rank 0 only (callers barrier after). Reuses an existing folder whose recorded synth settings,
    preprocessing and tokenizer match; otherwise regenerates it (the raw corpus beside it, in
    ``<path>-raw/``).
    """
    from xoron_dist.data.schema import MANIFEST_FILE, sha256_file

    out = Path(cfg.data.path)
    if cfg.data.synth is None:
        if not (out / MANIFEST_FILE).is_file():
            raise FileNotFoundError(
                f"data.path={out} has no {MANIFEST_FILE}: prepare it with `xoron prep --config RUN.yaml --out {out} "
                "INPUT...`, or set data.synth to generate the synthetic corpus there"
            )
        return out
    key = _cache_key(cfg, sha256_file(tokenizer_dir / "tokenizer.json"))
    record = out / SYNTH_RECORD
    if (out / MANIFEST_FILE).is_file() and record.is_file() and json.loads(record.read_text()) == key:
        logger.info("using cached prepared data in %s", out)
        return out
    from data_prep import prepare
    from xoron_dist.synth import synthesize

    if out.exists():
        logger.info("prepared data in %s is stale (settings or tokenizer changed); rebuilding", out)
        shutil.rmtree(out)
    raw = out.with_name(out.name + "-raw")
    logger.info("generating the synthetic corpus in %s and preparing shards in %s", raw, out)
    inputs = synthesize(cfg.data.synth, raw, progress=False)
    manifest = prepare(inputs, out, cfg, workers=1, progress=False)
    record.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    logger.info("prepared %s", ", ".join(f"{name}: {d.rows} rows" for name, d in manifest.datasets.items()))
    return out
