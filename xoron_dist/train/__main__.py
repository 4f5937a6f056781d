"""``python -m xoron_dist.train --config FILE [--resume] [key.sub=value ...]``: the per-rank entry.

Every launcher starts this on every rank: ``deepspeed`` (``--module xoron_dist.train``),
``torchrun -m``, ``srun python -m``, ``mpiexec python -m``, or plain ``python -m`` for
one process. Ranks, device and process groups are found by ``xoron_dist.parallel.state``.

Exit status: 0 done; 2 a problem with the config, data, checkpoint or run directory (one line
says which); 3 stopped by SIGTERM/SIGINT after saving a checkpoint (``--resume`` continues);
4 training diverged and ``train.nonfinite_policy`` says stop (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import logging
import sys

from xoron_dist.config import ConfigError, load_config
from xoron_dist.parallel.launcher_env import LaunchError, discover_ranks
from xoron_dist.parallel.rank_logging import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xoron_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (for example pipelines/smoke.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's latest checkpoint (start fresh if it has none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run's old checkpoints/events and start again")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.overwrite:
        print("error: --resume and --overwrite contradict each other", file=sys.stderr)
        return 2
    try:
        info = discover_ranks()
        configure_logging(info.rank, info.world_size)
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, LaunchError) as err:
        logging.getLogger("xoron_dist").error("%s", err)
        return 2
    from xoron_dist.train.guard import DIVERGED_EXIT_STATUS, TrainingDiverged
    from xoron_dist.train.trainer import USER_ERRORS, train  # heavy imports (deepspeed) after the cheap checks

    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except USER_ERRORS as err:
        # Wrong config, data or checkpoint: the message says what and where; a traceback would bury it.
        logging.getLogger("xoron_dist").error("%s: %s", type(err).__name__, err)
        return 2
    except TrainingDiverged as err:
        logging.getLogger("xoron_dist").error("%s", err)
        return DIVERGED_EXIT_STATUS
    logging.getLogger("xoron_dist").info(
        "done: %d steps, final loss %s, run directory %s", result.steps_done,
        "n/a" if result.final_loss is None else f"{result.final_loss:.4f}", result.run_dir)
    return 3 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
