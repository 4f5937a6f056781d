"""Running the real trainer from tests: its ranks, launchers' variables, and reading what a run logged.

Every end-to-end test (tests/train, tests/export) runs the trainer's entry point
(``python -m xoron_dist.train``'s ``main``) as fresh processes, one per rank, with the variables a
launcher gives each rank, and compares what ``metrics.jsonl`` recorded. The ranks are forked from the
session's forkserver, which has imported the trainer's modules once (``TrainerRank``): nothing has run
in them before ``main``, but they skip the interpreter start and ~5 s of imports. The launchers and the
``xoron`` command themselves run as real subprocesses in their own tests (``test_trainer.py``). The
single-rank references the layout tests compare with are run once per session (``reference`` in
``tests/train/conftest.py``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.parallel.harness import forkserver_context, is_launcher_var
from xoron_dist.parallel.launcher_env import free_port

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "pipelines" / "smoke.yaml"

# Trainer mechanics (resume, launchers, stages, signals) run on the built-in synthetic text: it is
# the one source where N ranks see exactly the global batch one rank sees.
TEXT = "data.source=synthetic_text"

def clean_env() -> dict[str, str]:
    """This process's environment without launcher variables (``harness.is_launcher_var``), so a child is a
    fresh job even when the suite runs inside an srun allocation or an mpiexec."""
    return {k: v for k, v in os.environ.items() if not is_launcher_var(k)}


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


class TrainerRank:
    """One trainer rank, ``python -m xoron_dist.train ARGS`` as a fresh process forked from the session's
    forkserver (``tests/parallel/harness.py``), which has imported the trainer's modules once: a rank
    starts without the ~5 s of imports a new interpreter spends (torch, DeepSpeed, Megatron-core and
    the torch.compile machinery Megatron pulls in). Its stdout and stderr go to files; this object has
    the part of ``subprocess.Popen``'s interface the tests use (pid, poll, kill, wait, communicate)."""

    def __init__(self, args: list[str], env: dict[str, str], group_of: int | None, faults: tuple[str, ...] = ()):
        self.args = [sys.executable, "-m", "xoron_dist.train", *args]
        self.logs = Path(tempfile.mkdtemp(prefix="trainer-rank-"))  # its stdout and stderr files
        self._output: tuple[str, str] | None = None
        self._status: int | None = None
        self._proc = forkserver_context().Process(target=_trainer_rank, args=(args, env, self.logs, group_of, faults),
                                                  name="trainer")
        self._proc.start()
        self.pid = self._proc.pid
        _STARTED.append(self)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        """The exit status (negative: the signal that killed it), None while it runs. The forkserver passes a
        child's status over a pipe, and multiprocessing reports 255 when that read fails (CI saw it once, for
        a rank that had logged "done"); a rank writes its own status on its way out, which then decides."""
        code = self._proc.exitcode
        if code is not None and self._status is None:
            written = self.logs / _STATUS
            self._status = int(written.read_text()) if code == _UNREAD and written.is_file() else code
        return None if code is None else self._status

    def kill(self) -> None:
        if self._proc.exitcode is None:
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            self._output = tuple((self.logs / name).read_text(errors="replace") for name in ("stdout", "stderr"))
            shutil.rmtree(self.logs, ignore_errors=True)
        return self._output


_STARTED: list[TrainerRank] = []
_STATUS = "status"  # the file in a rank's log folder where it writes its exit status
_UNREAD = 255  # multiprocessing's exit code for a forkserver child whose status it could not read


def kill_leftover_ranks() -> int:
    """Kill the trainer ranks still running (a test that failed before it stopped them); return how many.
    They are not daemons (their loader workers are their children), so without this a leftover rank would
    keep the session from exiting: multiprocessing joins them at exit. Every started rank's log folder goes
    too (``communicate`` removes it on the normal paths; a killed or only waited-for rank kept it)."""
    leftover = [rank for rank in _STARTED if rank.poll() is None]
    for rank in leftover:
        rank.kill()
        rank.wait(30)
    for rank in _STARTED:
        shutil.rmtree(rank.logs, ignore_errors=True)
    _STARTED.clear()
    return len(leftover)


atexit.register(kill_leftover_ranks)  # runs before multiprocessing's own exit handler, which would join them


def _trainer_rank(args: list[str], env: dict[str, str], logs: Path, group_of: int | None,
                  faults: tuple[str, ...]) -> None:
    """In the forked rank: become ``python -m xoron_dist.train ARGS`` run in REPO with ``env`` (with
    ``faults``: ``python tests/train/faults.py FAULTS -- ARGS``)."""
    os.environ.clear()  # a forked rank holds the server's environment: replace it with the job's
    os.environ.update(env)
    os.chdir(REPO)
    if group_of == 0:
        os.setpgid(0, 0)  # a new process group, as Popen(process_group=0) makes
    elif group_of is not None:
        while True:  # rank 0's group, once rank 0 has made it
            try:
                os.setpgid(0, group_of)
                break
            except PermissionError:
                time.sleep(0.01)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from xoron_dist.train.__main__ import main

    sys.argv = [str(REPO / "xoron_dist" / "train" / "__main__.py"), *args]
    try:
        if faults:
            from tests.train.faults import main as faulty_main

            status = faulty_main([*faults, "--", *args])
        else:
            status = main(args)
    except SystemExit as stop:
        status = stop.code
    except BaseException:  # what the interpreter does with an uncaught exception: print it, exit 1
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()  # an interpreter's exit runs these; a multiprocessing child would not
    if status is not None and not isinstance(status, int):  # SystemExit("message"): printed, exit 1
        print(status, file=sys.stderr, flush=True)
    code = 0 if status is None else status if isinstance(status, int) else 1  # as the interpreter maps it
    (logs / f"{_STATUS}.tmp").write_text(str(code))
    (logs / f"{_STATUS}.tmp").rename(logs / _STATUS)
    sys.exit(code)


def start_ranks(world: int, args: list[str], *, launcher: str = "srun", group: bool = False,
                faults: tuple[str, ...] = ()) -> list[TrainerRank]:
    """``world`` trainer ranks started directly, with the variables ``launcher`` would give them (no
    launcher process: the launchers themselves are tested in test_trainer.py, as real subprocesses);
    ``group``: all in one new process group (with their loader workers), the unit SLURM signals;
    ``faults``: injected for real by ``tests/train/faults.py``."""
    port = str(free_port())
    procs: list[TrainerRank] = []
    for rank in range(world):
        group_of = (0 if rank == 0 else procs[0].pid) if group else None
        procs.append(TrainerRank(args, rank_env(launcher, rank, world, port), group_of, faults))
    return procs


def finish(procs: list[TrainerRank], timeout: float = 300, *, stop_others: bool = True) -> list[tuple[int, str]]:
    """Wait for every rank; (exit status, stderr) of each (see ``wait_all``)."""
    return [(status, err) for status, _, err in wait_all(procs, timeout, stop_others=stop_others)]


def wait_all(procs: list[TrainerRank], timeout: float = 300, *, stop_others: bool = True
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


def run_rank(args: list[str], *, faults: tuple[str, ...] = (), timeout: float = 240) -> subprocess.CompletedProcess:
    """One single-process trainer job, whatever its exit status (the test checks it)."""
    procs = start_ranks(1, args, faults=faults)
    [(status, out, err)] = wait_all(procs, timeout)
    return subprocess.CompletedProcess(procs[0].args, status, out, err)


def run_train(tmp_path: Path, name: str, *overrides: str, flags: tuple[str, ...] = (), world: int = 1,
              timeout: int = 240) -> subprocess.CompletedProcess:
    """One training job on the smoke config, on ``world`` ranks (started as deepspeed's launcher starts
    them); fails the test with the ranks' stderr unless every rank exits 0 or 3 (stopped, resumable).
    The result's stderr is every rank's, rank 0 first (ranks other than 0 log warnings only)."""
    args = ["--config", str(SMOKE), *flags, f"train.output_dir={tmp_path}", f"train.name={name}", *overrides]
    procs = start_ranks(world, args, launcher="deepspeed")
    results = wait_all(procs, timeout=timeout)
    if any(status not in (0, 3) for status, _, _ in results):
        tails = "\n".join(f"--- rank {rank} exited {status}:\n{err[-6000:]}"
                           for rank, (status, _, err) in enumerate(results))
        raise AssertionError(f"{name}: {' '.join(procs[0].args)} failed on {world} rank(s)\n{tails}")
    return subprocess.CompletedProcess(procs[0].args, max(status for status, _, _ in results),
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
