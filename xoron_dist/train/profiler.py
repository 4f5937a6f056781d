"""Step profiles: ``torch.profiler`` over a window of optimizer steps, written into the run directory.

    train:
      profile: {start: 20, steps: 2, warmup: 1, ranks: [0]}     # config/run.py ProfileConfig

On each rank of ``ranks`` the profiler starts ``warmup`` steps before ``start`` (running but not recording,
so its own start-up cost stays out of the trace), records steps ``start`` .. ``start + steps - 1``, and writes

    <run>/profile/rank<R>_steps<A>-<B>.json.gz   the trace, Chrome trace format (ui.perfetto.dev, chrome://tracing)
    <run>/profile/rank<R>_steps<A>-<B>.txt       the ops by self time per step: on the GPU on CUDA, else on the CPU

and logs the ops that took the most. Steps are marked ``ProfilerStep#k`` in the trace, k = 0 for its first
(warm-up included); the summary's header names the run steps. On CUDA the recorded steps are also
bracketed for Nsight Systems (``cudaProfilerStart``/``Stop``, an NVTX range ``step N`` per step):
``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop xoron train ...`` records the same
steps. A run that stops, fails or ends its stage inside the window writes the steps it recorded; a resume
inside the window records from there; a run that comes back to the window (a rollback) does not record it
again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from xoron_dist.config import ConfigError
from xoron_dist.config.run import ProfileConfig

logger = logging.getLogger(__name__)

SUMMARY_ROWS = 40  # rows of the op table in the .txt summary
LOGGED_ROWS = 5  # of which the log line names the first


DEVICE_TIME, CPU_TIME = "self_device_time_total", "self_cpu_time_total"  # an op's own time, in µs


def self_time_key(prof: torch.profiler.profile) -> str:
    """The time a profile's ops are ranked by: on the device when it traced CUDA, else on the CPU."""
    return DEVICE_TIME if ProfilerActivity.CUDA in prof.activities else CPU_TIME


def costliest_ops(averages, key: str) -> list:
    """``prof.key_averages()``'s ops that took any ``key`` time, the costliest first (the step markers left out:
    their self time is the gaps between ops)."""
    ops = (e for e in averages if getattr(e, key) > 0 and not e.key.startswith("ProfilerStep"))
    return sorted(ops, key=lambda e: getattr(e, key), reverse=True)


class StepProfiler:
    """``before_step(n)`` / ``after_step(n)`` around optimizer step n (1-based) of the run; ``close()`` at the
    end of a stage (writes what a window cut short recorded). A no-op on ranks not in ``cfg.ranks`` and
    when ``cfg.start`` is 0."""

    def __init__(self, cfg: ProfileConfig, out_dir: Path, rank: int, world_size: int, device_type: str) -> None:
        outside = [r for r in cfg.ranks if r >= world_size]
        if cfg.start and outside:
            raise ConfigError(f"train.profile.ranks = {cfg.ranks}: rank(s) {outside} are not in this job of "
                              f"{world_size} rank(s); use global ranks 0..{world_size - 1}, or [] for every rank")
        self.cfg, self.out_dir, self.rank = cfg, out_dir, rank
        self.enabled = bool(cfg.start) and (not cfg.ranks or rank in cfg.ranks)
        self.cuda = device_type == "cuda"
        self._prof: torch.profiler.profile | None = None
        self._first = 0  # the run step the profiler started at
        self._recorded: list[int] = []  # run steps recorded so far
        self._done = False  # the window has been recorded (or passed): never again in this run
        self._nvtx_open = False

    def before_step(self, step: int) -> None:
        if not self.enabled or self._done:
            return
        if self._prof is None:
            if step > self.cfg.last:
                self._done = True  # resumed past the window
                return
            if step < max(1, self.cfg.start - self.cfg.warmup):
                return
            self._begin(step)
        if step >= self.cfg.start:
            self._recorded.append(step)
            if self.cuda:
                if len(self._recorded) == 1:
                    torch.cuda.profiler.start()
                torch.cuda.nvtx.range_push(f"step {step}")
                self._nvtx_open = True

    def after_step(self, step: int) -> None:
        if self._prof is None:
            return
        self._close_nvtx()
        self._prof.step()  # at the window's last step: records no more and writes the trace (``_write``)
        if step >= self.cfg.last:
            self._end()

    def close(self) -> None:
        """End a window the stage (or the run) leaves unfinished: the steps recorded so far are written."""
        if self._prof is not None:
            self._close_nvtx()
            self._end()

    def _begin(self, step: int) -> None:
        self._first = step
        activities = [ProfilerActivity.CPU]
        if self.cuda and ProfilerActivity.CUDA in torch.profiler.supported_activities():
            activities.append(ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities, schedule=self._action, on_trace_ready=self._write,
            record_shapes=self.cfg.memory, profile_memory=self.cfg.memory, with_stack=self.cfg.stack)
        self._prof.start()
        warmup = f" after {self.cfg.start - step} warm-up step(s)" if step < self.cfg.start else ""
        logger.info("profiling steps %d..%d on rank %d%s into %s", max(step, self.cfg.start), self.cfg.last,
                    self.rank, warmup, self.out_dir)

    def _action(self, k: int) -> ProfilerAction:
        """The profiler's schedule: k counts the profiler's steps, run step ``self._first + k``."""
        step = self._first + k
        if step < self.cfg.start:
            return ProfilerAction.WARMUP
        if step < self.cfg.last:
            return ProfilerAction.RECORD
        return ProfilerAction.RECORD_AND_SAVE if step == self.cfg.last else ProfilerAction.NONE

    def _end(self) -> None:
        prof, self._prof, self._done = self._prof, None, True
        try:
            prof.stop()  # cut short while recording: writes what it has (``_write``)
        except RuntimeError as err:  # the profile is lost, not the run (nor the error a failed step raises)
            logger.warning("the profiler failed to stop on rank %d: %s", self.rank, err)
        finally:
            if self.cuda and self._recorded:
                torch.cuda.profiler.stop()

    def _close_nvtx(self) -> None:
        if self._nvtx_open:
            torch.cuda.nvtx.range_pop()
            self._nvtx_open = False

    def _write(self, prof: torch.profiler.profile) -> None:
        """The trace and the op summary of the recorded steps (the profiler's ``on_trace_ready``)."""
        if not self._recorded:
            return
        first, last = self._recorded[0], self._recorded[-1]
        steps = last - first + 1
        stem = self.out_dir / f"rank{self.rank}_steps{first}-{last}"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(f"{stem}.json.gz")
            key = self_time_key(prof)
            averages = prof.key_averages()
            table = averages.table(sort_by=key, row_limit=SUMMARY_ROWS)
            where = "GPU" if key == DEVICE_TIME else "CPU"
            header = (f"rank {self.rank}, run steps {first}..{last} ({steps} step(s); in the trace ProfilerStep#"
                      f"{first - self._first}.. ; times are totals over the steps), sorted by self {where} time\n\n")
            Path(f"{stem}.txt").write_text(header + table + "\n")
            top = costliest_ops(averages, key)[:LOGGED_ROWS]
            logger.info("profile of steps %d..%d (rank %d) in %s.{json.gz,txt}; most self %s time per step: %s",
                        first, last, self.rank, stem, where,
                        "; ".join(f"{e.key} {getattr(e, key) / 1e3 / steps:.2f} ms ({e.count / steps:g} calls)"
                                  for e in top))
        except (OSError, RuntimeError) as err:  # a full disk, a gone directory: the profile is lost, not the run
            logger.warning("could not write the profile of steps %d..%d to %s: %s", first, last, self.out_dir, err)


__all__ = ["CPU_TIME", "DEVICE_TIME", "StepProfiler", "costliest_ops", "self_time_key"]
