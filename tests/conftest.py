"""Make the shared test helpers importable as ``tests.<dir>.<module>`` (e.g. ``tests.parallel.harness``)
from every test directory, however pytest is started: the test directories are not packages, so
pytest puts each one on sys.path but not the repository root."""

import os
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process distributed set-up exports RANK/MASTER_PORT/... (DeepSpeed reads them); a test
    must not leak them into the next one or into the subprocesses it starts."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
