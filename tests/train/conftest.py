"""Fixtures shared by the trainer's test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


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
