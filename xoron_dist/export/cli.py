"""``xoron export --checkpoint DIR --format hf --out DIR [--force]``: consolidate a checkpoint of any
layout, then write it in a deployable format (``xoron_dist/export/``)."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf",)
NOT_BUILT = ("gguf", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint tag (runs/<name>/checkpoints/stepNNNNNNNN), its checkpoints folder "
                             "(latest) or the run directory")
    parser.add_argument("--format", default="hf", help="hf (gguf and onnx are not built yet)")
    parser.add_argument("--out", required=True, help="the export directory")
    parser.add_argument("--force", action="store_true", help="replace an export already in --out")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's tokenizer/)")


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        why = "is not built yet" if args.format in NOT_BUILT else "is unknown"
        print(f"error: --format {args.format} {why}; formats: {', '.join(FORMATS)} "
              f"({' and '.join(NOT_BUILT)} are not built yet)", file=sys.stderr)
        return 2
    from xoron_dist.export.consolidation import ConsolidationError, consolidate
    from xoron_dist.export.hf import ExportError, export_hf

    try:
        ckpt = consolidate(args.checkpoint)
        out = export_hf(ckpt, args.out, force=args.force, tokenizer_dir=args.tokenizer)
    except (ConsolidationError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {ckpt.step} ({ckpt.source}) to {out}", file=sys.stderr)
    return 0
