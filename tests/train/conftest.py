"""Fixtures shared by the trainer's test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _no_leftover_ranks():
    """A test that failed before it stopped its trainer ranks leaves them running: stop them before the next."""
    yield
    from tests.train.runs import kill_leftover_ranks

    kill_leftover_ranks()


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke run's synthetic corpus, prepared once (synth -> prep) through the trainer's own cache code."""
    from xoron_dist.config import load_config
    from xoron_dist.tokenizer import build_tokenizer
    from xoron_dist.train.data_cache import ensure_prepared

    root = tmp_path_factory.mktemp("smoke-data")
    cfg = load_config(SMOKE, [f"data.path={root / 'prepared'}"])
    build_tokenizer(cfg, root / "tokenizer")
    return ensure_prepared(cfg, root / "tokenizer")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Callable[..., list[dict]]:
    """``reference(*overrides)``: the logged steps of the single-rank smoke run with these overrides, run
    the first time a test asks and shared by every later one (the layout tests of several modules
    compare with the same few single-rank runs; each costs a trainer start and its steps)."""
    from tests.train.runs import records, run_train

    root = tmp_path_factory.mktemp("references")
    made: dict[tuple[str, ...], list[dict]] = {}

    def run(*overrides: str) -> list[dict]:
        if overrides not in made:
            name = f"reference{len(made)}"
            run_train(root, name, *overrides)
            made[overrides] = records(root, name)
        return made[overrides]

    return run
