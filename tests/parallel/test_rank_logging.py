"""Every log line carries its rank; rank 0 logs INFO, the others WARNING and up."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from xoron_dist.parallel.rank_logging import configure_logging


@pytest.fixture
def root_logger_restored():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("rank", "shown"), [(0, ["info line", "warning line"]), (1, ["warning line"])])
def test_prefix_and_default_level(monkeypatch, root_logger_restored, rank, shown):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(rank, 4)
    log = logging.getLogger("xoron_dist.test")
    log.info("info line")
    log.warning("warning line")
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == shown
    assert all(line.startswith(f"[rank {rank}/4] ") for line in lines)
