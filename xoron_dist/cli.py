"""``xoron <verb>``: the one command line of the project. Each verb parses, then calls a function.

    xoron train --config pipelines/smoke.yaml [--nproc N] [--resume [--reshard [--reshard-optimizer M]]] [k=v ...]
    xoron build --config pipelines/xoron_full.yaml [key.sub=value ...]
    xoron synth --out DIR [--config RUN.yaml]          (xoron_dist/synth/cli.py)
    xoron prep --config RUN.yaml --out DIR INPUT...    (data_prep/cli.py)
    xoron plan --config RUN.yaml --cluster h100x8 --nodes 4 --out plans/   (xoron_dist/plan/cli.py)
    xoron setup [--cluster h100x8 --nodes 4 --hosts slurm ... --no-input]   (xoron_dist/setup/cli.py)
    xoron export --checkpoint runs/NAME --format hf --out DIR [--force]  (xoron_dist/export/cli.py)
    xoron generate text|image|video|speech --model DIR --prompt TEXT [--out FILE]  (xoron_dist/generate/cli.py)
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys

from xoron_dist.config import ConfigError, load_config
from xoron_dist.utils.signal_forwarding import run_forwarding_signals


def cmd_train(args: argparse.Namespace) -> int:
    """One process: train in this process. N processes: run the DeepSpeed launcher as a child, pass
    it (and through it the ranks) our SIGTERM/SIGINT/SIGHUP, wait for every process it started and
    return its exit status (``xoron_dist.utils.signal_forwarding``)."""
    flags = [f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on]
    if args.reshard:
        if not args.resume:
            print("error: --reshard goes with --resume (it reslices the checkpoint a resume loads)", file=sys.stderr)
            return 2
        args.overrides = [*args.overrides, "train.reshard=true"]
    if args.reshard_optimizer != "auto":
        if not args.reshard:
            print("error: --reshard-optimizer goes with --resume --reshard (it says what the reshard does with Adam's "
                  "moments)", file=sys.stderr)
            return 2
        args.overrides = [*args.overrides, f"train.reshard_optimizer={str(args.reshard_optimizer == 'carry').lower()}"]
    if args.nproc == 1:
        from xoron_dist.train.__main__ import main as train_main

        return train_main(["--config", args.config, *flags, *args.overrides])
    load_config(args.config, args.overrides)  # a bad config: one line here, not one from every rank
    launcher = shutil.which("deepspeed")
    if launcher is None:
        print("error: --nproc > 1 needs the 'deepspeed' launcher on PATH (pip install deepspeed)", file=sys.stderr)
        return 2
    cmd = [launcher, "--num_gpus", str(args.nproc), "--master_port", str(args.master_port),
           "--module", "xoron_dist.train", "--config", args.config, *flags, *args.overrides]
    print("+ " + " ".join(cmd), file=sys.stderr)
    return run_forwarding_signals(cmd)


def cmd_build(args: argparse.Namespace) -> int:
    """Print the model's parameters per component; the model is built on the meta device."""
    from xoron_dist.model.summary import build_on_meta, multimodal_parts, summarize

    cfg = load_config(args.config, args.overrides)
    llm = cfg.model.llm
    model = build_on_meta(llm)
    summary = summarize(model, llm)
    moe = f"MoE on layers {', '.join(map(str, llm.moe_layers))}" if llm.moe_layers else "no MoE layer"
    print(f"Xoron LLM: {llm.num_layers} layers, hidden {llm.hidden_size}, {llm.num_heads} heads, "
          f"{llm.moe.num_experts}+{llm.moe.num_shared_experts} experts (top-{llm.moe.top_k}; {moe}), "
          f"vocabulary {llm.vocab_size} (+{llm.special_token_slots} special, {llm.padded_vocab_size} rows)"
          f"{', LM head tied to the embedding' if llm.tie_word_embeddings else ''}")
    print(summary.format())
    parts = multimodal_parts(cfg)
    if parts:
        width = max(len(name) for name, _ in parts)
        print("\nmultimodal parts")
        for name, count in parts:
            print(f"{name:<{width}}  {count:>15,}")
        print(f"{'total with the LLM':<{width}}  {summary.total + sum(c for _, c in parts):>15,}")
    return 0


# Verbs whose arguments and work live with their code: each module has ``add_arguments(parser)``
# and ``run(args) -> int``, and imports its heavy dependencies inside ``run``.
DELEGATED_VERBS = {
    "synth": ("xoron_dist.synth.cli", "generate the synthetic multimodal corpus (media files + JSONL)"),
    "prep": ("data_prep.cli", "raw media / webdataset tars -> Arrow shards + manifest (MPI aware)"),
    "plan": ("xoron_dist.plan.cli", "rank parallel layouts for a cluster by memory and step time; write the best"),
    "setup": ("xoron_dist.setup.cli", "wizard: cluster + goal -> planned run YAML, DeepSpeed JSON, hostfile or sbatch"),
    "export": ("xoron_dist.export.cli", "a checkpoint of any layout -> an HF directory (transformers + xoron)"),
    "generate": ("xoron_dist.generate.cli", "text, image, video or speech from an export or a checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xoron", description="Train, inspect and run Xoron.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a run config (the smoke run: pipelines/smoke.yaml)")
    train.add_argument("--config", required=True)
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (GPUs, or CPU ranks)")
    train.add_argument("--master-port", type=int, default=29500)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start again, deleting old checkpoints")
    train.add_argument("--reshard", action="store_true",
                       help="with --resume: accept a checkpoint of another world size, layout or ZeRO stage "
                            "(consolidated and resliced, Adam's moments too where the checkpoint's layout holds "
                            "them readably)")
    train.add_argument("--reshard-optimizer", choices=("auto", "carry", "fresh"), default="auto",
                       help="with --reshard: Adam's moments carried or refused (carry), started at zero (fresh), or "
                            "carried where readable, else zero with a warning (auto; train.reshard_optimizer)")
    train.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    train.set_defaults(func=cmd_train)

    build = verbs.add_parser("build", help="parameter count per component (no memory: meta device)")
    build.add_argument("--config", default=None, help="run YAML; default: the full-size model")
    build.add_argument("overrides", nargs="*")
    build.set_defaults(func=cmd_build)

    for verb, (module, description) in DELEGATED_VERBS.items():
        impl = importlib.import_module(module)
        sub = verbs.add_parser(verb, help=description, description=description)
        impl.add_arguments(sub)
        sub.set_defaults(func=impl.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print("error: --nproc must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
