"""``xoron prep``: parse the command line, call ``data_prep.convert.prepare``, print a summary.

    xoron prep --config RUN.yaml --out DIR [--workers N] [--strict] [--resume] [--no-progress]
               [--max-consecutive-rejects N] [--data-root DIR] [--allow-outside-root] [--format NAME]
               INPUT... [key.sub=value ...]
    mpiexec -n 4 xoron prep --config RUN.yaml --out DIR INPUT...     (DIR on a shared filesystem)

INPUT: a JSONL manifest, a JSON array (.json), a Parquet file, a webdataset .tar, or a folder (its
*.jsonl, *.json, *.parquet and *.tar, sorted by name). Records in a dataset's published layout are
converted by the registry of ``data_prep.datasets`` (``--format NAME`` forces one).
JSONL media paths are relative to the JSONL's folder and must stay inside the data root (that
folder, or --data-root); --allow-outside-root reads them wherever they lead.
An argument that is not an existing path and has the form key.sub=value is a config override.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from xoron_dist.config import load_config

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="run YAML: data.prep settings and the tokenizer")
    parser.add_argument("--out", required=True, type=Path, help="output folder (shards, manifest, rejects)")
    parser.add_argument("--workers", type=int, default=1, help="converting processes on this machine")
    parser.add_argument("--strict", action="store_true", help="stop at the first rejected sample")
    parser.add_argument("--resume", action="store_true",
                        help="reopen a finished output folder: check its shards, redo damaged units "
                             "(a partial one is resumed without this flag)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    parser.add_argument("--max-consecutive-rejects", type=int, default=0, metavar="N",
                        help="stop when N samples in a row of one unit are rejected (0: never)")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="JSONL media paths must lead inside DIR (default: each JSONL's own folder)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="also read absolute media paths and paths leading out of the data root "
                             "(only for manifests you trust)")
    parser.add_argument("--format", dest="dataset_format", default=None, metavar="NAME",
                        help="convert every JSONL/JSON/Parquet record with this registered dataset format "
                             "(data_prep/README.md lists them; default: detect each record's)")
    parser.add_argument("items", nargs="+", metavar="INPUT_OR_OVERRIDE",
                        help="JSONL, JSON, Parquet or .tar files or folders; then key.sub=value config overrides")


def split_items(items: list[str]) -> tuple[list[Path], list[str]]:
    """Inputs (existing paths, or anything not shaped like key=value) and config overrides."""
    inputs, overrides = [], []
    for item in items:
        if not Path(item).exists() and _OVERRIDE.match(item):
            overrides.append(item)
        else:
            inputs.append(Path(item))
    return inputs, overrides


def run(args: argparse.Namespace) -> int:
    import logging
    import sys
    import time

    from data_prep.convert import prepare
    from data_prep.errors import PrepError
    from data_prep.ranks import detect_ranks

    inputs, overrides = split_items(args.items)
    cfg = load_config(args.config, overrides)
    ranks = detect_ranks()
    logging.basicConfig(level=logging.INFO, format=f"[prep rank {ranks.rank}] %(levelname)s %(message)s")
    start = time.monotonic()
    try:
        manifest = prepare(inputs, args.out, cfg, workers=args.workers, strict=args.strict,
                           progress=not args.no_progress, resume=args.resume,
                           max_consecutive_rejects=args.max_consecutive_rejects, ranks=ranks,
                           data_root=args.data_root, allow_outside_root=args.allow_outside_root,
                           dataset_format=args.dataset_format)
    except PrepError as err:
        if ranks.rank == 0:  # every rank's failure reaches rank 0, which says it once
            print(f"error: {err}", file=sys.stderr)
        return 1
    if ranks.rank == 0:
        print(format_summary(manifest, args.out, time.monotonic() - start, args.workers, ranks.size))
    return 0


def format_summary(manifest, out: Path, seconds: float, workers: int, ranks: int) -> str:
    lines = [f"prepared {len(manifest.sources)} source(s) into {out} in {seconds:.1f} s "
             f"({workers} worker(s) x {ranks} rank(s))",
             f"{'kind':<18}{'rows':>10}{'shards':>8}{'bytes':>14}"]
    for kind, dataset in sorted(manifest.datasets.items()):
        lines.append(f"{kind:<18}{dataset.rows:>10}{len(dataset.shards):>8}{dataset.bytes:>14}")
    rows = sum(d.rows for d in manifest.datasets.values())
    lines.append(f"{'total':<18}{rows:>10}{sum(len(d.shards) for d in manifest.datasets.values()):>8}"
                 f"{sum(d.bytes for d in manifest.datasets.values()):>14}")
    lines.append(f"rejects: {manifest.rejects}" + (f" (see {out}/rejects.jsonl)" if manifest.rejects else ""))
    return "\n".join(lines)
