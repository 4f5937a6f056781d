"""``xoron train --nproc N`` runs the launcher as a child: SIGTERM/SIGINT reach the launcher and its
ranks, the command waits for all of them and returns the launcher's status.

A fake ``deepspeed`` on PATH stands in for DeepSpeed's launcher: it records its arguments, starts one
"rank" (a grandchild of ``xoron``) that records every signal it gets and takes a while to "save"
before it exits 3, and then either dies of the signal at once (what DeepSpeed's local runner does,
having no handler) or handles it like DeepSpeed's ``launch.py``: passes it to its rank, waits for it
and exits with its own status. Either way the rank must get the signal exactly once (a second one
would make the trainer stop without saving).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RANK = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
def record(signum, frame):
    with open(out / "rank_signals", "a") as f:
        f.write(f"{signum} ")
    stop.append(signum)
signal.signal(signal.SIGTERM, record)
signal.signal(signal.SIGINT, record)
(out / "rank_ready").write_text("")
while not stop:
    time.sleep(0.05)
time.sleep(1.0)  # the checkpoint being written
(out / "rank_saved").write_text("")
sys.exit(3)
"""

LAUNCHER = """#!{python}
import json, os, signal, subprocess, sys, time
from pathlib import Path
out = Path(os.environ["FAKE_LAUNCHER_OUT"])
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
(out / "launcher_pgid").write_text(str(os.getpgrp()))
rank = subprocess.Popen([sys.executable, "-c", {rank!r}, str(out)])
stopped = []
def stop(signum, frame):
    stopped.append(signum)
    rank.send_signal(signum)
if os.environ["FAKE_LAUNCHER_HANDLES"] == "1":
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
(out / "launcher_ready").write_text("")
try:
    while rank.poll() is None:
        time.sleep(0.05)
except KeyboardInterrupt:
    if os.environ["FAKE_LAUNCHER_HANDLES"] == "quits":  # exits, leaving its rank behind
        sys.exit(1)
    raise
if stopped:
    (out / "launcher_signal").write_text(str(stopped[0]))
    sys.exit(7)
"""


@pytest.fixture
def fake_launcher(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "deepspeed"
    script.write_text(LAUNCHER.format(python=sys.executable, rank=RANK))
    script.chmod(0o755)
    (tmp_path / "run.yaml").write_text("preset: tiny\n")
    return tmp_path


def wait_for(*paths: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {[str(p) for p in paths]}"
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "handles", "status"), [
    (signal.SIGTERM, "0", 128 + signal.SIGTERM),  # DeepSpeed's runner: dies of it; its rank saves on
    (signal.SIGINT, "0", 128 + signal.SIGINT),  # ... or of the KeyboardInterrupt that SIGINT raises
    (signal.SIGINT, "quits", 1),  # a launcher that exits without passing the signal on
    (signal.SIGTERM, "1", 7),
    (signal.SIGINT, "1", 7),
], ids=["term-launcher-dies", "int-launcher-raises", "int-launcher-quits", "term-launcher-handles",
        "int-launcher-handles"])
def test_signals_reach_the_ranks_and_the_status_comes_back(fake_launcher, sig, handles, status):
    out = fake_launcher
    env = {**os.environ, "PATH": f"{out / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_LAUNCHER_OUT": str(out),
           "FAKE_LAUNCHER_HANDLES": handles}
    xoron = subprocess.Popen([sys.executable, "-m", "xoron_dist.cli", "train", "--config", "run.yaml", "--nproc",
                              "2", "train.steps=5"], cwd=out, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "launcher_ready", out / "rank_ready")
        xoron.send_signal(sig)  # to xoron alone, as `kill PID` does
        assert xoron.wait(timeout=60) == status
    finally:  # a failed test leaves nothing running
        if xoron.poll() is None:
            xoron.kill()
        if (out / "launcher_pgid").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int((out / "launcher_pgid").read_text()), signal.SIGKILL)
    assert (out / "rank_signals").read_text() == f"{int(sig)} "  # once
    assert (out / "rank_saved").exists()  # xoron returned only after the rank had finished
    if handles == "1":
        assert (out / "launcher_signal").read_text() == str(int(sig))
    assert json.loads((out / "argv.json").read_text()) == [
        "--num_gpus", "2", "--master_port", "29500", "--module", "xoron_dist.train", "--config", "run.yaml",
        "train.steps=5"]
    assert f"xoron: {sig.name} passed on to the launch; waiting for its processes to exit" in xoron.stderr.read()


def test_the_launchers_own_status_is_returned(fake_launcher, tmp_path):
    bin_dir = fake_launcher / "bin"
    (bin_dir / "deepspeed").write_text(f"#!{sys.executable}\nimport sys\nsys.exit(5)\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "xoron_dist.cli", "train", "--config", "run.yaml", "--nproc", "2"],
                            cwd=fake_launcher, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 5
