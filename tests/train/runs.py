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


def run_train(tmp_path: Path, name: str, *overrides: str, flags: tuple[str, ...] = (),
              launcher: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """One training job on the smoke config (``launcher``: a multi-rank launcher command, else one
    process); fails the test with the job's stderr unless it exits 0 or 3 (stopped, resumable)."""
    cmd = (launcher or [sys.executable, "-m", "xoron_dist.train"]) + [
        "--config", str(SMOKE), *flags, f"train.output_dir={tmp_path}", f"train.name={name}", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 3):
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


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
