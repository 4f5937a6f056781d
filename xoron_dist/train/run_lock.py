"""One writer per run directory: rank 0 holds an exclusive ``flock`` on ``<run>/run.lock`` for the
life of the run, so a second run on the same directory is refused before it touches anything
(it would delete the first one's in-progress save and interleave ``metrics.jsonl``).

The file records who holds it (PID, host, start time, command line). The kernel drops an ``flock``
when its holder dies however it dies, so a run that crashed leaves the file but not the lock: the
next run takes it over and says whose it was. The file is never deleted (deleting it while a run
holds it would let a third run lock a new file of the same name); a run that ends normally empties
it. On NFS, Linux maps ``flock`` onto NFS byte-range locks (served by the NFS lock manager), so
ranks on different nodes see the same lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the run directory's lock; the message names its PID and host."""


class RunLock:
    """``acquire()`` on rank 0 before the run writes anything; ``release()`` when it is done."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run directory {self.path.parent} is in use by another run: {_describe(holder)} holds "
                    f"{self.path}. Wait for that run to end (or stop it), or choose another train.name"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was replaced between open and lock: lock the one that is there now
        previous = _read(fd)
        if previous:
            logger.warning("taking over %s from a run that ended without releasing it: %s", self.path,
                           _describe(previous))
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "argv": " ".join(sys.argv),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # empty: released by a run that ended normally
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"raw": raw[:200]}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return f"an unknown process ({holder.get('raw', 'no details recorded')})"
    return f"PID {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')}: " \
           f"{holder.get('argv', '')})"


__all__ = ["LOCK_FILE", "RunDirectoryBusy", "RunLock"]
