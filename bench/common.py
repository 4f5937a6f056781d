"""Shared helpers of the benchmarks: the machine string, result JSON, alternating timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

OUT_DIR = Path(__file__).parent / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def time_alternating(fns: dict[str, Callable[[], None]], rounds: int, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, interleaving them round by round so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_result(name: str, result: dict) -> Path:
    required = {"metric", "unit", "ours", "peer", "peer_name", "ratio", "goal", "machine"}
    missing = required - result.keys()
    if missing:
        raise ValueError(f"benchmark result lacks {sorted(missing)}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
