"""Throughput meter, ETA and the rank-0 progress line."""

import logging

import pytest

from xoron_dist.train.metrics import ProgressLog, StepTimer, format_count, format_eta, format_lr


def test_step_timer_skips_the_first_step(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 13.0])
    monkeypatch.setattr("xoron_dist.train.metrics.time.perf_counter", lambda: next(clock))
    timer = StepTimer(window=5)
    timer.step(tokens=100)  # 10 s warm-up step: not averaged
    assert timer.first_step_s == 10.0 and timer.tokens_per_s is None and timer.eta(5) is None
    timer.step(tokens=100)  # 1 s
    timer.step(tokens=100)  # 2 s
    assert timer.tokens_per_s == pytest.approx(200 / 3)
    assert timer.mean_step_s == pytest.approx(1.5)
    assert timer.eta(4) == pytest.approx(6.0)


def test_step_timer_window_and_exclusion(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 8.0, 9.0])
    monkeypatch.setattr("xoron_dist.train.metrics.time.perf_counter", lambda: next(clock))
    timer = StepTimer(window=2)
    timer.step(tokens=1)  # t=1, warm-up
    timer.step(tokens=1)  # t=2: 1 s
    with timer.excluded():  # 3 -> 5: 2 s not counted
        pass
    timer.step(tokens=10)  # t=7: 5 s - 2 s = 3 s
    assert timer.last_step_s == pytest.approx(3.0)
    timer.step(tokens=10)  # t=8: 1 s ; window keeps the last two steps
    assert timer.tokens_per_s == pytest.approx(20 / 4)


def test_formatting():
    assert format_lr(2.9e-3) == "2.9e-3"
    assert format_lr(1e-4) == "1.0e-4"
    assert format_count(5123) == "5.1k" and format_count(1.2e6) == "1.2M" and format_count(12) == "12"
    assert format_count(None) == "-"
    assert format_eta(42.4) == "0:00:42" and format_eta(3725) == "1:02:05" and format_eta(None) == "-"


def test_progress_log_line(caplog):
    progress = ProgressLog(40, log_every=20, rank=0, use_bar=False)
    with caplog.at_level(logging.INFO, logger="xoron_dist.train.metrics"):
        assert progress.update(19, loss=3.5, lr=3e-3) is None
        line = progress.update(20, loss=3.4121, lr=2.9e-3, grad_norm=1.234, tokens_per_s=5100.0, eta_s=42.0)
        last = progress.update(40, loss=3.0, lr=3e-4, tokens_per_s=None, eta_s=0.0)
    assert line == "step 20/40 | loss 3.412 | lr 2.9e-3 | grad 1.23 | 5.1k tok/s | eta 0:00:42"
    assert last == "step 40/40 | loss 3.000 | lr 3.0e-4 | - tok/s | eta 0:00:00"
    assert [r.getMessage() for r in caplog.records] == [line, last]
    progress.close()


def test_progress_log_silent_off_rank_zero_and_no_bar_without_tty(caplog):
    quiet = ProgressLog(10, log_every=1, rank=1)
    with caplog.at_level(logging.INFO):
        assert quiet.update(1, loss=1.0, lr=1e-3) is None
    assert not caplog.records
    assert ProgressLog(10, log_every=1, rank=0).bar is None  # pytest captures stdout: not a TTY


def test_metrics_jsonl_stays_strict_json(tmp_path):
    """NaN/inf are not JSON: they are written as null and named under "nonfinite"."""
    import json

    from xoron_dist.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, keep_up_to=0)
    log.write({"step": 1, "loss": 2.5, "grad_norm": 1.0})
    log.write({"step": 2, "loss": float("nan"), "grad_norm": float("inf"), "skipped": True})

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    lines = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": 2.5, "grad_norm": 1.0}
    assert lines[1] == {"step": 2, "loss": None, "grad_norm": None, "skipped": True, "nonfinite": ["grad_norm", "loss"]}
