"""``xoron setup``: the run wizard; every question is also a flag, and a flag given is not asked.

    xoron setup                                                     (asks every question)
    xoron setup --cluster h100x8 --nodes 4 --hosts slurm --model full --no-input --out plans/full
    xoron setup --cluster custom --nodes 2 --gpus-per-node 4 --gpu-memory-gib 48 --hosts node1,node2

Writes plan.yaml (for ``xoron train --config``), ds_config.json and a DeepSpeed hostfile or an sbatch
script into ``--out``, and prints the command that launches the run. The flags come from
``xoron_dist.setup.questions.QUESTIONS`` (one definition per question).
"""

from __future__ import annotations

import argparse

from xoron_dist.setup.questions import QUESTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for q in QUESTIONS:
        parser.add_argument(q.flag, dest=q.name, default=None, metavar="VALUE", help=q.help or q.prompt)
    parser.add_argument("--overwrite", action="store_true", help="write into an existing output folder")
    parser.add_argument("--no-input", action="store_true",
                        help="ask nothing: questions without a flag take their defaults")


def run(args: argparse.Namespace) -> int:
    from xoron_dist.setup.wizard import run_setup

    given = {q.name: getattr(args, q.name) for q in QUESTIONS}
    run_setup(given, overwrite=args.overwrite, ask=None if args.no_input else input)
    return 0
