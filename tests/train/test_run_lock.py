"""One writer per run directory: a live holder is named, a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from xoron_dist.train.run_lock import LOCK_FILE, RunDirectoryBusy, RunLock

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from xoron_dist.train.run_lock import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_with_the_holders_pid_and_host(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run: PID {holder.pid} on host "
                                                   rf"{socket.gethostname()} .* holds .*{LOCK_FILE}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no release: the file still names it, the kernel dropped the lock
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert f"from a run that ended without releasing it: PID {holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirectoryBusy):  # held: even this process cannot take it twice
        RunLock(tmp_path).acquire()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a normal end leaves nothing to take over
    caplog.clear()
    again = RunLock(tmp_path)
    again.acquire()
    again.release()
    assert "taking over" not in caplog.text
