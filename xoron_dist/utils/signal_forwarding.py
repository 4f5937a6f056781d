"""Run a launcher (the ``deepspeed`` runner) as a child, pass it the signals that stop a run, and
wait for every process it started.

``xoron train --nproc N`` used to ``exec`` the DeepSpeed runner, which installs no signal handler
for a local launch: a SIGTERM killed it at once (exit 143) and left its ``launch.py`` and the ranks
training as orphans. Here the launcher runs in a session of its own (so a terminal's Ctrl-C reaches
it only through us) and a SIGTERM, SIGINT or SIGHUP that reaches this process goes to it.

This process is the *child subreaper* of the launch (Linux ``prctl``): a process whose parent
exits is re-parented here, not to init, and is waited for, so the command returns only when every
process of the launch has exited. Once a signal has been forwarded, a process re-parented here
(its parent exited without handing the signal on) gets it from us. With DeepSpeed that is the
path: the runner dies of SIGTERM (or exits on KeyboardInterrupt for SIGINT), its ``launch.py``
gets the signal from us and sends SIGTERM to each rank (once: a second one would make a rank stop
at once instead of saving), and the data-loader workers ignore a SIGTERM that is not their rank's.
Signalling the whole process group instead would reach each rank twice (from us and from
``launch.py``). DeepSpeed's ``launch.py`` gives each rank 30 s to exit before it kills it.

The exit status is the launcher's, ``128 + signal`` when a signal ended it (what a shell reports).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def run_forwarding_signals(cmd: Sequence[str]) -> int:
    """Run ``cmd`` as described in the module docstring; return the launcher's exit status."""
    launch: _Launch | None = None
    pending: list[int] = []  # signals that arrived before the launcher existed

    def forward(signum: int, frame) -> None:
        # os.write, not print: a handler may interrupt a print of the main thread
        os.write(2, f"xoron: {signal.Signals(signum).name} passed on to the launch; waiting for its "
                    "processes to exit\n".encode())
        if launch is None:
            pending.append(signum)
        else:
            launch.forward(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        launch = _Launch(cmd)
        for signum in pending:
            launch.forward(signum)
        status = launch.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


class _Launch:
    """The launcher and, once it has exited, the processes it left behind (now our children)."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.adopts_orphans = _become_subreaper()
        self.launcher = subprocess.Popen(list(cmd), start_new_session=True)
        self.launcher_exited = False
        self.last_signal: int | None = None
        self.told: set[int] = set()  # processes a forwarded signal was sent to

    def forward(self, signum: int) -> None:
        """A signal reached us: send it to the top of what is still running."""
        self.last_signal = signum
        self._send([self.launcher.pid] if not self.launcher_exited else _children(), signum)

    def wait(self) -> int:
        status = self.launcher.wait()
        self.launcher_exited = True
        self._hand_on()
        while self.adopts_orphans:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:  # nothing of the launch is left
                break
            self._hand_on()
        return status

    def _hand_on(self) -> None:
        """A process exited: the processes it left (now ours) get the last forwarded signal, if any."""
        if self.last_signal is not None:
            self._send([pid for pid in _children() if pid not in self.told], self.last_signal)

    def _send(self, pids: list[int], signum: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            self.told.add(pid)


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children() -> list[int]:
    """This process's children (Linux); the launch's orphans are among them once adopted."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            pids.extend(int(pid) for pid in (task / "children").read_text().split())
    return pids
