"""Issue 17, end to end through the real entry point, each fault injected for real: NaN batches (skip,
rollback, stop), SIGTERM to the whole process group (1 and 2 ranks, loader workers), damaged and
crafted checkpoints on --resume, two runs on one directory, a rank that sleeps inside a collective.
Faults that need code in the ranks come from ``tests/train/faults.py``; the ranks are
``tests/train/runs.py``'s (the trainer's entry point in fresh processes)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train.runs import REPO, SMOKE, TEXT, TrainerRank, finish, losses, run_rank, run_train, start_ranks

FAST = (TEXT, "train.seq_len=64", "train.micro_batch_size=2", "train.log_every=1")


def run_faulty(tmp_path: Path, name: str, faults: list[str], *overrides: str, flags: tuple[str, ...] = (),
               timeout: int = 240) -> subprocess.CompletedProcess:
    return run_rank(["--config", str(SMOKE), *flags, f"train.output_dir={tmp_path}", f"train.name={name}",
                     *overrides], faults=tuple(faults), timeout=timeout)


def records(run: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"metrics.jsonl is not strict JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def saved_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step{step:08d}" / "trainer_state.json").read_text())["state"]


# --------------------------------------------------------------------------- numerics guard


def test_a_rank_reports_its_own_status_where_the_forkserver_lost_it(tmp_path):
    """multiprocessing reports 255 when it cannot read a forkserver child's exit status (CI saw it once, for a
    rank that had logged "done"); a trainer rank's own record of its status decides then, and only then."""
    [rank] = start_ranks(1, ["--config", str(SMOKE), f"train.output_dir={tmp_path}", "parallel.tp=3"])
    assert rank.wait(120) == 2  # a refused layout
    assert (rank.logs / "status").read_text() == "2"
    rank._status, rank._proc._popen.returncode = None, 255  # the forkserver's pipe gave nothing
    assert rank.poll() == 2
    (rank.logs / "status").unlink()  # no record of its own (killed): what multiprocessing says
    rank._status = None
    assert rank.poll() == 255
    rank.communicate()


def test_a_nan_batch_is_skipped_and_counted_under_zero0(tmp_path):
    """ZeRO-0 is the stage where DeepSpeed would apply the NaN gradient; the guard's gate drops it."""
    proc = run_faulty(tmp_path, "skip", ["nan-batches=3"], *FAST, "train.steps=5", "train.save_every=1",
                      "train.keep_checkpoints=10", "parallel.zero_stage=0", "train.ds_config=ds_configs/zero0.json",
                      "train.nonfinite_policy=skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = records(tmp_path / "skip")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[2]["loss"] is None and recs[2]["skipped"] and recs[2]["nonfinite"] == ["loss"]
    assert all(r["loss"] is not None and not r["skipped"] for r in recs[:2] + recs[3:])
    assert "step 3: non-finite loss or gradients; the update is skipped (1 in a row)" in proc.stderr
    ckpts = tmp_path / "skip" / "checkpoints"
    assert not (ckpts / "step00000003").exists()  # a periodic save waits for an applied step
    assert saved_state(tmp_path / "skip", 5)["skipped_steps"] == 1
    states = torch.load(ckpts / "step00000005" / "mp_rank_00_model_states.pt", weights_only=True)
    assert states["skipped_steps"] == 1 and states["global_steps"] == 5  # DeepSpeed counted the skip too
    assert all(torch.isfinite(t).all() for t in states["module"].values())


def test_nan_batches_roll_back_and_their_data_is_skipped(tmp_path):
    """Two NaN steps in a row (max_skipped_steps=1): back to the step-4 checkpoint, the data of steps 5-6
    skipped (the poisoned batches are never trained on again), then on to the end."""
    proc = run_faulty(tmp_path, "rollback", ["nan-batches=5,6"], *FAST, "train.steps=8", "train.save_every=2",
                      "train.max_skipped_steps=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("training diverged: non-finite loss or gradients at 2 steps in a row (5..6); rolling back to "
            "step00000004 (rollback 1 of at most 3) and skipping the 2 step(s) of data after it") in proc.stderr
    recs = records(tmp_path / "rollback")
    assert [r["step"] for r in recs] == list(range(1, 9))  # the file was cut back to step 4 on rollback
    assert all(r["loss"] is not None and not r["skipped"] for r in recs)
    state = saved_state(tmp_path / "rollback", 8)
    assert state["rollbacks"] == 1 and state["skipped_steps"] == 2
    rng = torch.load(tmp_path / "rollback" / "checkpoints" / "step00000008" / "rng_rank0.pt", weights_only=True)
    assert rng["data_position"]["source"] == {"step": 10, "micro": 0}  # 8 trained + 2 skipped


def test_a_nan_batch_stops_the_run_with_status_4_under_zero3(tmp_path):
    proc = run_faulty(tmp_path, "stop", ["nan-batches=3"], *FAST, "train.steps=5", "train.save_every=1",
                      "parallel.zero_stage=3", "train.ds_config=ds_configs/zero3.json", "train.nonfinite_policy=stop")
    assert proc.returncode == 4, proc.stderr[-4000:]
    assert ("training diverged: non-finite loss or gradients at step 3; stopping (train.nonfinite_policy=stop); "
            "the newest checkpoint is step00000002 (--resume continues from it)") in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpts = tmp_path / "stop" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000002" and not (ckpts / "step00000003").exists()


# --------------------------------------------------------------------------- preemption


def wait_for_steps(procs: list[TrainerRank], metrics: Path, count: int, limit_s: float = 240) -> None:
    deadline = time.time() + limit_s
    while not (metrics.exists() and metrics.read_text().count("\n") >= count):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(procs[0].communicate()[1][-4000:])
        time.sleep(0.2)


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2], ids=["1rank", "2ranks"])
def test_sigterm_to_the_process_group_saves_and_resumes_exactly(tmp_path, smoke_data, world):
    """SLURM signals every process of the step, loader workers included, and srun may do it twice:
    every rank finishes its step, they save together, exit 3; the resumed run equals a straight one."""
    common = ["--config", str(SMOKE), f"train.output_dir={tmp_path}", f"data.path={smoke_data}",
              "data.num_workers=1", "train.seq_len=128", "train.micro_batch_size=2", "train.log_every=1",
              "train.save_every=100000", "train.warmup_steps=0", "train.min_lr_ratio=1.0"]  # LR independent of steps
    procs = start_ranks(world, [*common, "train.name=sig", "train.steps=100000"], group=True)
    wait_for_steps(procs, tmp_path / "sig" / "metrics.jsonl", 2)
    os.killpg(procs[0].pid, signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(procs[0].pid, signal.SIGTERM)  # again: harmless
    for status, err in finish(procs):
        assert status == 3, err[-4000:]
        assert "stopped at step" in err and "continue with --resume" in err and "Traceback" not in err
    stopped = max(losses(tmp_path, "sig"))
    assert (tmp_path / "sig" / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"

    end = stopped + 2
    for status, err in finish(start_ranks(world, [*common, "train.name=sig", f"train.steps={end}", "--resume"],
                                          group=False)):
        assert status == 0, err[-4000:]
    for status, err in finish(start_ranks(world, [*common, "train.name=straight", f"train.steps={end}"],
                                          group=False)):
        assert status == 0, err[-4000:]
    resumed, straight = losses(tmp_path, "sig"), losses(tmp_path, "straight")
    assert sorted(resumed) == list(range(1, end + 1))
    for step in (stopped + 1, end):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), (step, resumed, straight)


# --------------------------------------------------------------------------- checkpoints on --resume


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("base")
    run_train(out, "base", *FAST, "train.steps=4", "train.save_every=2")
    return out / "base"


def test_resume_falls_back_past_a_damaged_checkpoint(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path / "run")
    damaged = next((tmp_path / "run" / "checkpoints" / "step00000004").glob("*optim_states.pt"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    proc = run_train(tmp_path, "run", *FAST, "train.steps=4", "train.save_every=2", flags=("--resume",))
    assert f"step00000004 is damaged: {damaged.name}: sha256" in proc.stderr
    assert "resuming from step00000002, the newest checkpoint whose files verify (not step00000004)" in proc.stderr
    base, resumed = losses(two_checkpoints.parent, "base"), losses(tmp_path, "run")
    assert resumed == base  # steps 3-4 trained again from step 2 give the same losses


class _WritesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_does_not_run_on_resume(two_checkpoints, tmp_path):
    """Whoever can write the run directory can rewrite the manifest too: the hash matches, yet nothing runs."""
    shutil.copytree(two_checkpoints, tmp_path / "run")
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    marker = tmp_path / "pwned"
    (tag / "rng_rank0.pt").write_bytes(pickle.dumps(_WritesAFile(marker), protocol=2))
    meta = json.loads((tag / "trainer_state.json").read_text())
    meta["files"]["rng_rank0.pt"] = {"bytes": (tag / "rng_rank0.pt").stat().st_size,
                                     "sha256": hashlib.sha256((tag / "rng_rank0.pt").read_bytes()).hexdigest()}
    (tag / "trainer_state.json").write_text(json.dumps(meta))
    proc = run_rank(["--config", str(SMOKE), "--resume", f"train.output_dir={tmp_path}", "train.name=run", *FAST,
                     "train.steps=6"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "CheckpointError:" in proc.stderr and "rng_rank0.pt: refused to unpickle:" in proc.stderr
    assert "GLOBAL posix.system" in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- one writer per run


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    first = start_ranks(1, ["--config", str(SMOKE), f"train.output_dir={tmp_path}", "train.name=shared", *FAST,
                            "train.steps=100000", "train.save_every=100000"], group=True)
    wait_for_steps(first, tmp_path / "shared" / "metrics.jsonl", 1)
    second = run_rank(["--config", str(SMOKE), "--resume", f"train.output_dir={tmp_path}", "train.name=shared",
                       *FAST])
    assert first[0].poll() is None  # untouched
    os.killpg(first[0].pid, signal.SIGTERM)
    [(status, err)] = finish(first)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"RunDirectoryBusy: run directory {tmp_path / 'shared'} is in use by another run: PID {first[0].pid}" \
        in second.stderr
    assert "joined" in second.stderr and "stage 0" not in second.stderr  # refused before building anything
    assert status == 3, err[-3000:]
    steps = [r["step"] for r in records(tmp_path / "shared")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no duplicated or interleaved lines


# --------------------------------------------------------------------------- hangs


@pytest.mark.multirank
def test_a_rank_that_sleeps_inside_a_collective_is_named(tmp_path):
    """Rank 1 sleeps (as if stuck) in step 3's first collective. Within the watchdog's 3 s every rank dumps
    its stacks and rank 0 names rank 1; the 15 s collective timeout from the config ends rank 0."""
    args = ["--config", str(SMOKE), f"train.output_dir={tmp_path}", "train.name=hang", *FAST, "train.steps=6",
            "train.dist_timeout_minutes=0.25", "train.watchdog_minutes=0.05"]
    procs = start_ranks(2, args, faults=("sleep-in-collective=1:3:600",))
    wait_for_steps(procs, tmp_path / "hang" / "metrics.jsonl", 2)
    stuck_since = time.time()
    _, err0 = procs[0].communicate(timeout=120)
    bounded = time.time() - stuck_since
    procs[1].kill()  # what the launcher (srun --kill-on-bad-exit, deepspeed) does once rank 0 has failed
    _, err1 = procs[1].communicate(timeout=60)
    assert procs[0].returncode not in (0, 3), err0[-4000:]
    assert bounded < 90, bounded  # 3 s to the report, 15 s to the timeout, plus a loaded machine's slack
    assert "Timed out" in err0
    assert "watchdog: rank(s) that did not arrive: 1 (at step 3: all_reduce at train/faults.py" in err0
    assert "waiting in a collective: 0 (all_reduce at distributed/distributed_c10d.py" in err0
    assert "rank 1 has made no progress" in err1 and "NOT in a collective" in err1
    for rank in (0, 1):
        stacks = (tmp_path / "hang" / "watchdog" / f"rank{rank}.stacks.txt").read_text()
        assert "train/step.py" in stacks and "Thread" in stacks


def test_the_readme_reliability_table_names_tests_that_exist():
    """Each guarantee in the README's Reliability section points at a test that is there."""
    import ast
    import re

    section = (REPO / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    cited = 0
    for cell in re.findall(r"\| ([^|]*`test_[^|]*) \|\n", section):
        module = None
        for ref in re.findall(r"`([\w/.]*?)(?:::(\w+))?`", cell.replace("`; `", "` `")):
            name, test = ref
            if name.endswith(".py"):
                module = name
            elif name.startswith("::"):
                test = name[2:]
            if not test or module is None:
                continue
            path = next(p for p in (REPO / "tests").rglob(Path(module).name))
            names = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
            assert test in names, f"README cites {module}::{test}, which {path} does not define"
            cited += 1
    assert cited >= 15
