"""Make the shared test helpers importable as ``tests.<dir>.<module>`` (e.g. ``tests.parallel.harness``)
from every test directory, however pytest is started: the test directories are not packages, so
pytest puts each one on sys.path but not the repository root. And the fixtures every test directory
may use."""

import os
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads; on a shared 2-core CPU the threads' barriers
    made the TiTok training test 30x slower (218 s against 8 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process distributed set-up exports RANK/MASTER_PORT/... (DeepSpeed reads them); a test
    must not leak them into the next one or into the subprocesses it starts."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """A test that leaves torch.distributed initialised in the pytest process would change what the
    next one sees (a single-rank test would suddenly run inside a world): tear it down and fail.
    (A process group that a wider-scoped fixture made before the test is that fixture's business.)"""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    yield
    if not before and dist.is_available() and dist.is_initialized():
        from xoron_dist.parallel import state

        state.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
        pytest.fail("this test left torch.distributed initialised; destroy its process group before returning")
