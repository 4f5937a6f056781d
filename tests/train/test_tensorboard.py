"""TensorBoard: rank 0 writes, others don't; events read back through tensorboard's own reader."""

import pytest

from xoron_dist.train.tensorboard import TensorBoardWriter, moe_scalars, read_scalars, read_text


def test_scalars_round_trip(tmp_path):
    with TensorBoardWriter(tmp_path, enabled=True, rank=0) as tb:
        for step in range(1, 4):
            tb.scalars(step, {"train/loss": 4.0 - step, "train/lr": 1e-3 * step, "perf/tokens_per_s": 100.0 * step})
        tb.scalars(3, moe_scalars(0, [6, 2, 0, 0], bias=[0.1, -0.1, 0.0, 0.2]))
        tb.text("config", "train:\n  lr: 0.001\n\nmodel: {}")
    events = read_scalars(tmp_path)
    assert events["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [s for s, _ in events["train/lr"]] == [1, 2, 3]
    assert events["train/lr"][2][1] == pytest.approx(3e-3)
    assert events["perf/tokens_per_s"][-1] == (3, 300.0)
    assert events["moe/layer0/max_over_mean"] == [(3, 3.0)]
    assert events["moe/layer0/expert1/tokens"] == [(3, 2.0)]
    assert events["moe/layer0/expert3/bias"][0][1] == pytest.approx(0.2)
    assert read_text(tmp_path) == {"config": [(0, "train:\n  lr: 0.001\n\nmodel: {}")]}


def test_only_rank_zero_writes(tmp_path):
    other = TensorBoardWriter(tmp_path / "r1", enabled=True, rank=1)
    other.scalars(1, {"train/loss": 1.0})
    other.text("config", "x")
    other.flush()
    other.close()
    disabled = TensorBoardWriter(tmp_path / "off", enabled=False, rank=0)
    disabled.scalars(1, {"train/loss": 1.0})
    disabled.close()
    assert not (tmp_path / "r1").exists() and not (tmp_path / "off").exists()


def test_resume_purges_orphaned_steps(tmp_path):
    with TensorBoardWriter(tmp_path, enabled=True, rank=0) as tb:
        for step in range(1, 6):
            tb.scalars(step, {"train/loss": float(step)})
    with TensorBoardWriter(tmp_path, enabled=True, rank=0, purge_step=3) as tb:
        for step in range(3, 5):
            tb.scalars(step, {"train/loss": 10.0 * step})
    assert read_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_read_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scalars(tmp_path / "nope")


def test_moe_scalars_even_load():
    out = moe_scalars(2, [5, 5, 5, 5])
    assert out["moe/layer2/max_over_mean"] == 1.0
    assert "moe/layer2/expert0/bias" not in out
    assert moe_scalars(0, [0, 0])["moe/layer0/max_over_mean"] == 0.0
