"""``xoron export --checkpoint DIR --format hf --out DIR [--force] [--merge-lora]``: consolidate a checkpoint of any
layout, then write it in a deployable format (``xoron_dist/export/``)."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf", "gguf", "onnx")
NOT_BUILT: tuple[str, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint tag (runs/<name>/checkpoints/stepNNNNNNNN), its checkpoints folder "
                             "(latest) or the run directory")
    parser.add_argument("--format", default="hf", help="hf | gguf | onnx")
    parser.add_argument("--out", required=True, help="the export directory")
    parser.add_argument("--force", action="store_true", help="replace an export already in --out")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's tokenizer/)")
    parser.add_argument("--quant", default=None, help="gguf only: f32 (default) | f16 | q8_0 | q4_0")
    parser.add_argument("--parts", default=None,
                        help="onnx only: comma-separated graphs, of llm,vision,video,audio,vocoder,speaker "
                             "(default: all the model has)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the run's LoRA adapters into the weights (default for hf: base model, and the "
                             "adapters in PEFT's format under <out>/lora)")


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        why = "is not built yet" if args.format in NOT_BUILT else "is unknown"
        later = f" ({' and '.join(NOT_BUILT)} are not built yet)" if NOT_BUILT else ""
        print(f"error: --format {args.format} {why}; formats: {', '.join(FORMATS)}{later}", file=sys.stderr)
        return 2
    from xoron_dist.export.hf import ExportError, export_hf
    from xoron_dist.export.lora import LoRAExportError, base_and_adapters, write_or_clear_adapters
    from xoron_dist.train.consolidation import ConsolidationError, consolidate

    try:
        if args.quant is not None and args.format != "gguf":
            raise ExportError(f"--quant applies to --format gguf only, not {args.format}")
        if args.parts is not None and args.format != "onnx":
            raise ExportError(f"--parts applies to --format onnx only, not {args.format}")
        if args.format == "gguf":
            from xoron_dist.export.gguf import check_quant, export_gguf

            check_quant(args.quant or "f32")
        ckpt = consolidate(args.checkpoint)
        run_cfg = ckpt.cfg
        ckpt, adapters = base_and_adapters(ckpt, args.merge_lora)  # LoRA runs: base (or merged) + adapters
        if adapters is not None and args.format != "hf":
            raise ExportError(f"--format {args.format} of a LoRA run: pass --merge-lora (adapters are exported "
                              "separately for --format hf only)")
        if args.format == "gguf":
            out = export_gguf(ckpt, args.out, quant=args.quant or "f32", force=args.force,
                              tokenizer_dir=args.tokenizer)
        elif args.format == "onnx":
            from xoron_dist.export.onnx import export_onnx

            parts = args.parts.split(",") if args.parts else None
            export_onnx(ckpt, args.out, force=args.force, parts=parts)
            out = args.out
        else:
            out = export_hf(ckpt, args.out, force=args.force, tokenizer_dir=args.tokenizer)
            write_or_clear_adapters(adapters, run_cfg, out)  # <out>/lora: PEFT's adapter files
    except (ConsolidationError, ExportError, LoRAExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {ckpt.step} ({ckpt.source}) to {out}", file=sys.stderr)
    return 0
