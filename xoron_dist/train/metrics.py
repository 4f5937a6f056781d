"""Throughput, ETA and the periodic progress line of the training loop.

    timer = StepTimer(window=20)
    progress = ProgressLog(total_steps=cfg.train.steps, log_every=cfg.train.log_every, start_step=step)
    for step in range(start, total):
        ...                                    # forward / backward / engine.step()
        timer.step(tokens=tokens_in_this_step)
        progress.update(step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                        tokens_per_s=timer.tokens_per_s, eta_s=timer.eta(total - step - 1))
        with timer.excluded():                 # a checkpoint save does not count as step time
            save_checkpoint(...)
    progress.close()

Only rank 0 logs and draws a bar; a tqdm bar is drawn only when stdout is a terminal,
so CI logs and redirected output get the plain log lines alone.

Model FLOP utilisation (``FlopsRate``): achieved TFLOP/s per device = the step's model FLOPs
(``xoron_dist.model.flops``: 3 x the forward's matmul FLOPs, recomputation not counted) x steps/s /
devices; MFU = that / the device's dense peak in the training dtype. The peak comes from
``DEVICE_PEAKS`` matched on ``torch.cuda.get_device_name()``, or from ``train.peak_tflops`` (which wins:
unknown devices, clocks below the datasheet's). A CPU has no entry: it reports TFLOP/s, and MFU only
with ``train.peak_tflops``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from xoron_dist.model.flops import llm_step_flops

logger = logging.getLogger(__name__)


def global_rank() -> int:
    """This process's rank: torch.distributed's when initialized, else the launcher's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class StepTimer:
    """Step time and tokens/s over the last ``window`` steps, measured with ``time.perf_counter``.

    ``step(tokens)`` closes a step: its duration is the time since the previous ``step``
    (or since construction / ``reset``), so data loading and logging count too, minus
    time spent inside ``excluded()``. The first step after construction or ``reset``
    (compilation, allocator and communicator warm-up) is kept out of the averages.
    """

    def __init__(self, window: int = 20) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Start afresh (after a resume or a stage change): the next step is a warm-up step again."""
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=self.window)
        self._last = time.perf_counter()
        self._excluded_s = 0.0
        self.steps = 0
        self.first_step_s: float | None = None
        self.last_step_s: float | None = None

    def step(self, tokens: int) -> float:
        """Close the current step, which processed ``tokens`` tokens (global, all ranks); returns its seconds."""
        now = time.perf_counter()
        seconds = max(now - self._last - self._excluded_s, 0.0)
        self._last = now
        self._excluded_s = 0.0
        self.steps += 1
        self.last_step_s = seconds
        if self.steps == 1:
            self.first_step_s = seconds
        else:
            self._samples.append((seconds, tokens))
        return seconds

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent in this block (checkpointing, evaluation) is not counted as step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded_s += time.perf_counter() - start

    @property
    def mean_step_s(self) -> float | None:
        """Mean seconds per step over the window; None until a step after the first has finished."""
        if not self._samples:
            return None
        return sum(s for s, _ in self._samples) / len(self._samples)

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens per second over the window; None until a step after the first has finished."""
        seconds = sum(s for s, _ in self._samples)
        if not self._samples or seconds <= 0.0:
            return None
        return sum(t for _, t in self._samples) / seconds

    def eta(self, remaining_steps: int) -> float | None:
        """Seconds left for ``remaining_steps`` at the window's mean step time."""
        mean = self.mean_step_s
        return None if mean is None else mean * max(remaining_steps, 0)


def format_eta(seconds: float | None) -> str:
    """``0:00:42``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    return str(datetime.timedelta(seconds=round(seconds)))


def format_count(value: float | None) -> str:
    """``5.1k``, ``1.2M``: a rate or a count in three significant characters; ``-`` when unknown."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def format_lr(lr: float) -> str:
    """``2.9e-3`` (``f"{lr:.1e}"`` without the exponent's padding zero)."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


class ProgressLog:
    """The periodic one-line log of training (rank 0 only), plus a tqdm bar on a terminal.

    ``update(step, ...)`` is called after each optimizer step with ``step`` = updates done
    so far (1-based); every ``log_every`` steps and at the last step it logs

        step 20/40 | loss 3.412 | lr 2.9e-3 | grad 1.23 | 5.1k tok/s | 312 TFLOP/s | MFU 31.5% | eta 0:00:42

    through ``logging`` (logger ``xoron_dist.train.metrics``); TFLOP/s (per device) and MFU show when
    given (``FlopsRate``). ``extra`` values are appended
    as ``name value``. ``use_bar=None`` draws the bar when stdout is a TTY.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        log_every: int,
        start_step: int = 0,
        rank: int | None = None,
        use_bar: bool | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        if log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {log_every}")
        self.total_steps = total_steps
        self.log_every = log_every
        self.enabled = (global_rank() if rank is None else rank) == 0
        self.log = log or logger
        if use_bar is None:
            use_bar = sys.stdout.isatty()
        self.bar: tqdm | None = None
        if self.enabled and use_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stdout, unit="step",
                            dynamic_ncols=True, leave=True)

    def update(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None = None,
        tokens_per_s: float | None = None,
        eta_s: float | None = None,
        tflops: float | None = None,
        mfu: float | None = None,
        **extra: float,
    ) -> str | None:
        """Advance the bar to ``step``; on a log step write the line and return it (else None)."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.3f} | lr {format_lr(lr)} | {format_count(tokens_per_s)} tok/s",
                                     refresh=False)
        if step % self.log_every and step != self.total_steps:
            return None
        parts = [f"step {step}/{self.total_steps}", f"loss {loss:.3f}", f"lr {format_lr(lr)}"]
        if grad_norm is not None:
            parts.append(f"grad {grad_norm:.2f}")
        parts.append(f"{format_count(tokens_per_s)} tok/s")
        if tflops is not None:
            parts.append(f"{tflops:.3g} TFLOP/s")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        parts.extend(f"{name} {value:.4g}" for name, value in extra.items())
        parts.append(f"eta {format_eta(eta_s)}")
        line = " | ".join(parts)
        if self.bar is not None:
            # Route console handlers through tqdm.write so the line does not tear the bar.
            with logging_redirect_tqdm():
                self.log.info(line)
        else:
            self.log.info(line)
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step on rank 0, for scripts and tests.

    On resume (and after a rollback) the lines after the checkpoint's step are dropped, so the
    file always describes one consistent history. Every line is strict JSON: a NaN or infinite
    value is written as ``null`` and its key listed under ``"nonfinite"``.
    """

    def __init__(self, path: Path, enabled: bool, keep_up_to: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_up_to]
            path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(strict_json_record(record), allow_nan=False) + "\n")


def strict_json_record(record: dict) -> dict:
    """``record`` with NaN/infinite floats as None and their keys under ``"nonfinite"`` (absent when none)."""
    bad = sorted(key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value))
    if not bad:
        return record
    return {**{key: None if key in bad else value for key, value in record.items()}, "nonfinite": bad}


# --- model FLOP utilisation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    """Dense (no sparsity) tensor-core peaks of one device, TFLOP/s; None where it has no such unit.

    ``fp32`` is the plain fp32 peak (AMD: its fp32 matrix cores); ``tf32`` the fp32-matmul peak with TF32
    on. Sources: the vendors' datasheets (NVIDIA lists tensor peaks "with sparsity": halved here).
    """

    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float
    source: str

    def tflops(self, dtype: torch.dtype, tf32: bool) -> float | None:
        """The peak for matmuls in ``dtype`` (fp32: TF32's when ``tf32`` and the device has it)."""
        if dtype == torch.bfloat16:
            return self.bf16
        if dtype == torch.float16:
            return self.fp16
        return self.tf32 if tf32 and self.tf32 is not None else self.fp32


# First match wins (the NVL/PCIe variants before the SXM part of the same name). Names as
# torch.cuda.get_device_name() gives them, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB",
# "Tesla V100-SXM2-32GB", "AMD Instinct MI300X". A10G (AWS) is another chip than A10 and has no entry.
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    (r"H200 NVL", DevicePeak("H200 NVL", 835.5, 835.5, 417.5, 60.0, "NVIDIA H200 NVL datasheet")),
    (r"H200", DevicePeak("H200 SXM", 989.5, 989.5, 494.5, 67.0, "NVIDIA H200 datasheet (SXM)")),
    (r"H100 NVL", DevicePeak("H100 NVL", 835.5, 835.5, 417.5, 60.0, "NVIDIA H100 datasheet (NVL)")),
    (r"H100 PCIe", DevicePeak("H100 PCIe", 756.5, 756.5, 378.0, 51.0, "NVIDIA H100 datasheet (PCIe)")),
    (r"H100", DevicePeak("H100 SXM", 989.5, 989.5, 494.5, 67.0, "NVIDIA H100 datasheet (SXM)")),
    (r"A100", DevicePeak("A100 (40/80 GB, SXM/PCIe)", 312.0, 312.0, 156.0, 19.5, "NVIDIA A100 datasheet")),
    (r"L40S", DevicePeak("L40S", 366.5, 366.5, 183.0, 91.6, "NVIDIA L40S datasheet")),
    (r"\bL4\b", DevicePeak("L4", 121.0, 121.0, 60.0, 30.3, "NVIDIA L4 datasheet")),
    (r"\bA10\b", DevicePeak("A10", 125.0, 125.0, 62.5, 31.2, "NVIDIA A10 datasheet")),
    (r"V100.*PCIE", DevicePeak("V100 PCIe", None, 112.0, None, 14.0, "NVIDIA V100 datasheet (PCIe)")),
    (r"V100", DevicePeak("V100 SXM2", None, 125.0, None, 15.7, "NVIDIA V100 datasheet (SXM2)")),
    (r"MI300X", DevicePeak("MI300X", 1307.4, 1307.4, 653.7, 163.4, "AMD Instinct MI300X datasheet")),
    (r"MI250X", DevicePeak("MI250X", 383.0, 383.0, None, 95.7, "AMD Instinct MI250X datasheet")),
)


def lookup_device_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string (case-insensitive); None if unknown."""
    for pattern, peak in DEVICE_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


@functools.lru_cache(maxsize=8)  # looked up at every logged step; an unknown device is reported once
def peak_tflops(device: torch.device, dtype: torch.dtype, tf32: bool, override: float | None) -> float | None:
    """Peak TFLOP/s of one device for this run: ``override`` (``train.peak_tflops``) when set, else the
    table's for a CUDA device's name; None for a CPU or a GPU the table does not know (logged once)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = lookup_device_peak(name)
    value = None if peak is None else peak.tflops(dtype, tf32)
    if value is None:
        logger.warning("no peak TFLOP/s known for %s in %s: MFU is not reported; set train.peak_tflops", name, dtype)
    return value


class FlopsRate:
    """Achieved TFLOP/s per device and MFU from a step's model FLOPs and the measured tokens/s.

    ``flops_per_token`` = model FLOPs of one step / tokens of one step (all ranks); ``devices``: the ranks
    sharing that work; ``peak``: one device's peak TFLOP/s (None: MFU not reported).
    """

    def __init__(self, devices: int, peak: float | None) -> None:
        if devices <= 0:
            raise ValueError(f"devices must be > 0, got {devices}")
        if peak is not None and peak <= 0:
            raise ValueError(f"peak TFLOP/s must be > 0, got {peak} (train.peak_tflops)")
        self.devices, self.peak = devices, peak

    def rates(self, flops_per_token: float, tokens_per_s: float | None) -> dict[str, float]:
        """``{"tflops": per-device TFLOP/s, "mfu": fraction of the peak}``; empty before a timed step, no
        ``mfu`` without a peak."""
        if tokens_per_s is None:
            return {}
        tflops = flops_per_token * tokens_per_s / self.devices / 1e12
        out = {"tflops": tflops}
        if self.peak is not None:
            out["mfu"] = tflops / self.peak
        return out


def step_flops_rates(cfg, ctx, seq_len: int, tokens_per_s: float | None) -> dict[str, float]:
    """TFLOP/s per device and MFU of a training run (``cfg``: XoronConfig, ``ctx``: ParallelContext) at
    ``seq_len`` tokens per sequence. Counts the LLM backbone (``llm_step_flops``); encoders and generators
    are not counted, so a multimodal run's figures are those of its backbone (a lower bound)."""
    flops_per_token = llm_step_flops(cfg.llm, 1, seq_len) / seq_len
    peak = peak_tflops(ctx.device, ctx.device_info.dtype, cfg.train.tf32, cfg.train.peak_tflops)
    return FlopsRate(ctx.world_size, peak).rates(flops_per_token, tokens_per_s)
