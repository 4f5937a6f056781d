"""train.profile: the step profiler's window, its files, its CUDA brackets (stand-ins) and its config errors."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch

from xoron_dist.config import ConfigError, load_config
from xoron_dist.config.run import ProfileConfig
from xoron_dist.train.profiler import StepProfiler


def drive(profiler: StepProfiler, steps: range, cut_after: int | None = None) -> None:
    """Run ``steps`` of a small workload (a range named ``work<step>`` each) through ``profiler``, as the
    trainer's loop calls it; ``cut_after``: the stage ends after that step (``close``)."""
    a = torch.randn(32, 32)
    for step in steps:
        profiler.before_step(step)
        with torch.profiler.record_function(f"work{step}"):
            (a @ a).sum()
        profiler.after_step(step)
        if step == cut_after:
            break
    profiler.close()


def trace_names(path) -> set[str]:
    return {event.get("name") for event in json.load(gzip.open(path))["traceEvents"]}


def test_the_window_is_recorded_after_its_warmup_and_written_once(tmp_path, caplog):
    profiler = StepProfiler(ProfileConfig(start=3, steps=2, warmup=1), tmp_path, rank=0, world_size=1,
                            device_type="cpu")
    with caplog.at_level(logging.INFO, logger="xoron_dist.train.profiler"):
        drive(profiler, range(1, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_steps3-4.json.gz", "rank0_steps3-4.txt"]
    names = trace_names(tmp_path / "rank0_steps3-4.json.gz")
    assert {"work3", "work4", "aten::mm"} <= names
    assert not names & {"work1", "work2", "work5"}  # the warm-up step (2) and the steps after are not recorded
    summary = (tmp_path / "rank0_steps3-4.txt").read_text()
    assert summary.startswith("rank 0, run steps 3..4 (2 step(s); in the trace ProfilerStep#1")
    assert "aten::mm" in summary and "Self CPU" in summary
    assert "profile of steps 3..4 (rank 0)" in caplog.text and "aten::mm" in caplog.text
    drive(profiler, range(3, 5))  # a rollback back into the window: not recorded again
    assert len(list(tmp_path.iterdir())) == 2


def test_a_window_cut_short_writes_what_it_recorded_and_a_resume_inside_it_records_from_there(tmp_path):
    cut = StepProfiler(ProfileConfig(start=2, steps=5, warmup=3), tmp_path / "cut", 0, 1, "cpu")
    drive(cut, range(1, 10), cut_after=3)  # the stage ends after step 3
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["rank0_steps2-3.json.gz", "rank0_steps2-3.txt"]
    resumed = StepProfiler(ProfileConfig(start=2, steps=3, warmup=1), tmp_path / "resumed", 0, 1, "cpu")
    drive(resumed, range(3, 8))  # resumed at step 3: no warm-up step left
    assert {"work3", "work4"} <= trace_names(tmp_path / "resumed" / "rank0_steps3-4.json.gz")
    past = StepProfiler(ProfileConfig(start=2, steps=2), tmp_path / "past", 0, 1, "cpu")
    drive(past, range(5, 8))  # resumed past the window
    cut_in_warmup = StepProfiler(ProfileConfig(start=5, steps=1, warmup=2), tmp_path / "warmup", 0, 1, "cpu")
    drive(cut_in_warmup, range(1, 9), cut_after=4)  # the stage ends before the window's first step
    assert not (tmp_path / "past").exists() and not (tmp_path / "warmup").exists()


def test_only_the_named_ranks_trace_and_a_rank_outside_the_job_is_refused(tmp_path):
    for rank, ranks, traces in ((0, [0], True), (1, [0], False), (1, [], True), (1, [1, 3], True)):
        out = tmp_path / f"{rank}-{ranks}"
        drive(StepProfiler(ProfileConfig(start=1, steps=1, ranks=ranks), out, rank, 4, "cpu"), range(1, 3))
        assert out.exists() == traces, (rank, ranks)
    with pytest.raises(ConfigError, match=r"rank\(s\) \[4\] are not in this job of 4 rank\(s\); use global ranks 0..3"):
        StepProfiler(ProfileConfig(start=1, ranks=[0, 4]), tmp_path, 0, 4, "cpu")
    StepProfiler(ProfileConfig(start=0, ranks=[9]), tmp_path, 0, 4, "cpu")  # off: the ranks are not looked at


def test_on_cuda_the_recorded_steps_are_bracketed_for_nsight(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    drive(StepProfiler(ProfileConfig(start=3, steps=2, warmup=1), tmp_path / "a", 0, 1, "cuda"), range(1, 6))
    assert calls == ["start", "step 3", "pop", "step 4", "pop", "stop"]
    calls.clear()
    drive(StepProfiler(ProfileConfig(start=2, steps=3), tmp_path / "b", 0, 1, "cuda"), range(1, 6), cut_after=2)
    assert calls == ["start", "step 2", "pop", "stop"]  # cut short: still stopped
    assert (tmp_path / "b" / "rank0_steps2-2.txt").is_file()


@pytest.mark.parametrize("override, message", [
    ("train.profile.start=50", r"'train.profile.start' = 50 is invalid: "
     r"comes after the run's last step \(train.steps = 10\)"),
    ("train.profile.steps=0", r"'train.profile.steps' = 0 is invalid: must be > 0"),
    ("train.profile.ranks=[-1]", r"'train.profile.ranks\[0\]' = -1 is invalid: a global rank"),
])
def test_profile_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["preset=tiny", "train.steps=10", override])


def test_a_profile_that_cannot_be_written_costs_the_profile_not_the_run(tmp_path, caplog):
    blocked = tmp_path / "profile"
    blocked.write_text("a file where the profile directory would go")
    with caplog.at_level(logging.WARNING, logger="xoron_dist.train.profiler"):
        drive(StepProfiler(ProfileConfig(start=1, steps=1), blocked, 0, 1, "cpu"), range(1, 3))
    assert "could not write the profile of steps 1..1" in caplog.text
