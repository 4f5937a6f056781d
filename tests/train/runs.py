"""Running the real trainer from tests: subprocess entry points, launchers, and reading what a run logged.

Every end-to-end test (tests/train, tests/export) starts training the way a user does, as a fresh job
in a subprocess, and compares what ``metrics.jsonl`` recorded. The single-rank references those
comparisons use are run once per session (``reference`` in ``tests/train/conftest.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from xoron_dist.parallel.launcher_env import free_port

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "pipelines" / "smoke.yaml"

# Trainer mechanics (resume, launchers, stages, signals) run on the built-in synthetic text: it is
# the one source where N ranks see exactly the global batch one rank sees.
TEXT = "data.source=synthetic_text"

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This process's environment without launcher variables, so a child is a fresh job."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def deepspeed_launcher(world: int) -> list[str]:
    """``deepspeed --num_gpus world`` on a free port, running the trainer module."""
    return [shutil.which("deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()), "--module",
            "xoron_dist.train"]


def rank_env(launcher: str, rank: int, world: int, port: str) -> dict[str, str]:
    """The variables ``launcher`` ("deepspeed" or "srun") gives rank ``rank`` of a ``world``-rank job on this
    host; one rank gets none (a plain single-process job)."""
    env = clean_env()
    if world == 1:
        return env
    if launcher == "srun":  # srun starts each task itself; the job id names the rendezvous
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(world),
                   SLURM_NTASKS_PER_NODE=str(world), SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=port,
                   MASTER_PORT=port)
    elif launcher == "deepspeed":  # what deepspeed's per-node launch.py exports to each rank it forks
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                   CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    else:
        raise ValueError(f"launcher {launcher!r}: deepspeed or srun")
    return env


def start_ranks(world: int, args: list[str], *, launcher: str = "srun", group: bool = False
                ) -> list[subprocess.Popen]:
    """``world`` trainer ranks started directly, with the variables ``launcher`` would give them (no
    launcher process: the launchers themselves are tested in test_trainer.py); ``group``: all in one new
    process group (with their loader workers), the unit SLURM signals."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        extra = {"process_group": 0 if rank == 0 else procs[0].pid} if group else {}
        procs.append(subprocess.Popen([sys.executable, "-m", "xoron_dist.train", *args], cwd=REPO,
                                      env=rank_env(launcher, rank, world, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, **extra))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300, *, stop_others: bool = True) -> list[tuple[int, str]]:
    """Wait for every rank; (exit status, stderr) of each (see ``wait_all``)."""
    return [(status, err) for status, _, err in wait_all(procs, timeout, stop_others=stop_others)]


def wait_all(procs: list[subprocess.Popen], timeout: float = 300, *, stop_others: bool = True
             ) -> list[tuple[int, str, str]]:
    """Wait for every rank; (exit status, stdout, stderr) of each. With ``stop_others``, once one rank has
    failed (a status other than 0, or 3: stopped and resumable) the others are killed, as a launcher does,
    so a rank left waiting in a collective does not hold the test until the collective's timeout. Past
    ``timeout`` all are killed and ``TimeoutExpired`` carries their stderr."""
    with ThreadPoolExecutor(len(procs)) as pool:
        outputs = [pool.submit(p.communicate) for p in procs]
        deadline, late = time.monotonic() + timeout, False
        while not all(out.done() for out in outputs):
            late = late or time.monotonic() > deadline
            if late or (stop_others and any(p.poll() not in (None, 0, 3) for p in procs)):
                for p in procs:
                    p.kill()
            time.sleep(0.1)
        results = [(p.returncode, *out.result()) for p, out in zip(procs, outputs, strict=True)]
    if late:
        raise subprocess.TimeoutExpired(procs[0].args, timeout, stderr="".join(err for _, _, err in results))
    return results


def run_train(tmp_path: Path, name: str, *overrides: str, flags: tuple[str, ...] = (), world: int = 1,
              timeout: int = 240) -> subprocess.CompletedProcess:
    """One training job on the smoke config, on ``world`` ranks (started as deepspeed's launcher starts
    them); fails the test with the ranks' stderr unless every rank exits 0 or 3 (stopped, resumable).
    The result's stderr is every rank's, rank 0 first (ranks other than 0 log warnings only)."""
    args = ["--config", str(SMOKE), *flags, f"train.output_dir={tmp_path}", f"train.name={name}", *overrides]
    results = wait_all(start_ranks(world, args, launcher="deepspeed"), timeout=timeout)
    if any(status not in (0, 3) for status, _, _ in results):
        tails = "\n".join(f"--- rank {rank} exited {status}:\n{err[-6000:]}"
                           for rank, (status, _, err) in enumerate(results))
        raise AssertionError(f"{name}: {' '.join(args)} failed on {world} rank(s)\n{tails}")
    return subprocess.CompletedProcess(args, max(status for status, _, _ in results),
                                       "".join(out for _, out, _ in results), "".join(err for _, _, err in results))


def records(tmp_path: Path, name: str) -> list[dict]:
    """Every logged step of run ``name``, in order."""
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def losses(tmp_path: Path, name: str) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in records(tmp_path, name)}


def smoke_warmup_steps() -> int:
    return yaml.safe_load(SMOKE.read_text())["train"]["warmup_steps"]


def assert_same_steps(reference: list[dict], ours: list[dict], grad_rel: float = 1e-4) -> None:
    """``ours`` logged the reference's first steps with the same loss and gradient norm. A shorter run
    shares the reference's steps only inside the warm-up, where the learning rate does not depend on
    the total step count (``train/schedule.py``), so that is checked too."""
    assert len(ours) == len(reference) or len(ours) <= smoke_warmup_steps(), (len(ours), len(reference))
    assert [r["step"] for r in ours] == [r["step"] for r in reference[: len(ours)]], (reference, ours)
    for a, b in zip(reference, ours, strict=False):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=grad_rel), (a, b)


# The single-rank references of the layout tests (run once each through the ``reference`` fixture): 5
# steps of the synthetic text under the smoke config's ZeRO-1, the vocabulary padded to a multiple of 32
# (TP splits it), at micro-batch 4 (for layouts whose ranks all see the same rows: TP, SP) and 8 (two
# data ranks of micro-batch 4: DP, EP).
LAYOUT_COMMON = (TEXT, "model.llm.pad_vocab_multiple=32", "train.log_every=1")
REFERENCE_MB4 = (*LAYOUT_COMMON, "train.steps=5", "train.micro_batch_size=4")
REFERENCE_MB8 = (*LAYOUT_COMMON, "train.steps=5", "train.micro_batch_size=8")
