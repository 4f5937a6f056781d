"""Hang reports: which rank did not arrive, and every stuck rank's Python stacks, before the
collective timeout (``train.dist_timeout_minutes``) ends the run.

Each rank runs a ``HangWatchdog`` thread. The training loop calls ``beat(step, phase)`` as it makes
progress (stage build, every step, every save). When a rank's main thread has not beaten for
``train.watchdog_minutes`` (default: half the collective timeout), its watchdog

1. dumps the Python stacks of all its threads (``faulthandler``) to stderr and to
   ``<run>/watchdog/rank{r}.stacks.txt``;
2. writes ``<run>/watchdog/rank{r}.json``: host, PID, step, phase, beats so far, and where the main
   thread is: inside a ``torch.distributed`` / ``deepspeed.comm`` call (waiting in a collective) or
   elsewhere (computing, sleeping, reading: the rank the others wait for).

Rank 0's watchdog, a little later, reads every rank's report and names the ranks that did not
arrive: those with no report (dead, or still busy without being stuck), those behind the others
(fewer beats), and those stuck outside a collective. Nothing is written while training progresses,
so the files cost a shared filesystem nothing in normal operation. The reports need the run
directory on a filesystem every rank can read (the checkpoints need it too).

Limits: a rank blocked in C code that holds the GIL cannot report; on GPUs an NCCL collective is
asynchronous, so a waiting rank usually blocks later, at a host synchronisation (``.item()``) in
our code; the beats (who is behind) still tell the ranks apart there.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_COLLECTIVE_CODE = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}")


class HangWatchdog:
    """One rank's watchdog thread; ``after_s`` <= 0 turns it off."""

    def __init__(self, folder: Path, rank: int, world_size: int, after_s: float) -> None:
        self.folder, self.rank, self.world_size, self.after_s = Path(folder), rank, world_size, after_s
        self.poll_s = max(0.2, min(after_s / 4, 15.0))
        self._beats, self._step, self._phase = 0, 0, "start"
        self._last = time.monotonic()
        self._reported_at_beat = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.after_s <= 0 or self._thread is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def beat(self, step: int, phase: str) -> None:
        """The main thread made progress: it enters ``phase`` ("step", "save", ...) of step ``step``."""
        if self._reported_at_beat == self._beats:
            logger.warning("watchdog: rank %d progresses again (%s at step %d)", self.rank, phase, step)
        self._beats, self._step, self._phase = self._beats + 1, step, phase
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle >= self.after_s and self._reported_at_beat != self._beats:
                self._reported_at_beat = self._beats
                self._report(idle)

    def _report(self, idle: float) -> None:
        in_collective, where = main_thread_location()
        stacks = self.folder / f"rank{self.rank}.stacks.txt"
        with open(stacks, "w") as fh:
            faulthandler.dump_traceback(fh, all_threads=True)
        report = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self._step,
                  "phase": self._phase, "beats": self._beats, "idle_s": round(idle, 1),
                  "in_collective": in_collective, "where": where, "written": time.time()}
        tmp = self.folder / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(report) + "\n")
        os.replace(tmp, self.folder / f"rank{self.rank}.json")
        logger.error("watchdog: rank %d has made no progress for %.0f s (%s, step %d); main thread %s: %s; "
                     "stacks follow and are in %s", self.rank, idle, self._phase, self._step,
                     "waiting in a collective" if in_collective else "NOT in a collective", where, stacks)
        sys.stderr.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        if self.rank == 0:
            self._stop.wait(2 * self.poll_s)  # the other ranks' reports come in
            logger.error("%s", summarise(self.folder, self.world_size, since=time.time() - idle - self.poll_s))


def main_thread_location() -> tuple[bool, str]:
    """(whether the main thread is inside a collective, where it is: innermost frame + our nearest frame)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return False, "unknown (main thread gone)"
    inner = frame
    in_collective = any(part in inner.f_code.co_filename for part in _COLLECTIVE_CODE)
    where = _frame_text(inner)
    ours = frame
    while ours is not None and f"xoron_dist{os.sep}" not in ours.f_code.co_filename:
        ours = ours.f_back
    if ours is not None and ours is not inner:
        where += f", from {_frame_text(ours)}"
    return in_collective, where


def _frame_text(frame) -> str:
    code = frame.f_code
    parts = Path(code.co_filename).parts
    return f"{code.co_name} at {os.sep.join(parts[-2:])}:{frame.f_lineno}"


def summarise(folder: Path, world_size: int, since: float) -> str:
    """Rank 0's verdict from the reports written after ``since``: who did not arrive, who waits."""
    reports = {}
    for rank in range(world_size):
        path = folder / f"rank{rank}.json"
        try:
            report = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if report.get("written", 0) >= since:
            reports[rank] = report
    silent = [r for r in range(world_size) if r not in reports]
    most = max((rep["beats"] for rep in reports.values()), default=0)
    late = [r for r, rep in reports.items() if rep["beats"] < most or not rep["in_collective"]]
    waiting = [r for r, rep in reports.items() if r not in late]
    parts = []
    if late or silent:
        named = [f"{r} (at {reports[r]['phase']} {reports[r]['step']}: {reports[r]['where']})" for r in late]
        named += [f"{r} (no report: dead, or busy without being stuck)" for r in silent]
        parts.append(f"rank(s) that did not arrive: {'; '.join(named)}")
    else:
        parts.append("every rank waits in a collective (mismatched collectives?)")
    if waiting:
        parts.append(f"waiting in a collective: {', '.join(map(str, waiting))} "
                     f"({reports[waiting[0]]['where']})")
    return f"watchdog: {'; '.join(parts)}; stacks in {folder}"


__all__ = ["HangWatchdog", "main_thread_location", "summarise"]
