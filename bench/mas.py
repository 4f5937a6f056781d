"""Monotonic Alignment Search time: ours (torch, cummax per text token) vs the monotonic-alignment-search package.

Same random log-likelihoods and ragged masks for both, in the same process, alternating round by round
(bench/common.py); both paths are checked equal before timing. One call = one batch through
``maximum_path`` (the package's call includes its numpy conversion and copy, which is how callers use it).

- ours: ``xoron_dist.model.speech.alignment.maximum_path`` (float64 search, no Python loop over frames).
- peer: ``monotonic_alignment_search.maximum_path(..., implementation="cython")`` (glow-tts/VITS kernel, float32);
  its pure-numpy implementation (a Python loop over frames) is timed too, for reference.

Also fits seconds ~ (t_text * t_frames)^p over the sizes: the search is O(batch * t_text * t_frames),
so p should be close to 1 (below 1 where the per-token op overhead of small sizes dominates), and reports
nanoseconds per (batch, token, frame) cell. One thread by default: the package's wheel is built without
OpenMP, so its ``prange`` over the batch runs serially, and both sides then get one core.

Headline and fits use the calling thread's CPU time (``time.thread_time``, median over alternating rounds):
with one thread each, all the work runs in that thread, and CPU time is far less disturbed than wall time
by other jobs on a shared machine (wall-time medians of the same run moved 2-3x between runs on a loaded
2-core box). Wall-time medians (``bench.common.time_alternating``) are kept in the table too.

    python -m bench.mas [--sizes 50x250,100x500,100x1000,200x1000,200x2000] [--batch 8] [--rounds 7] [--threads 1]

Writes bench/out/mas.json (headline: the largest size).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import monotonic_alignment_search as mas_package
import torch

from bench.common import machine, time_alternating, write_result
from xoron_dist.model.speech.alignment import alignment_mask, maximum_path

DEFAULT_SIZES = "50x250,100x500,100x1000,200x1000,200x2000"


def make_batch(t_text: int, t_frames: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows: the first row is full size, the others 60-100% of it in text and frames (text <= frames)."""
    gen = torch.Generator().manual_seed(t_text * t_frames)
    scale = 0.6 + 0.4 * torch.rand(2, batch, generator=gen)
    scale[:, 0] = 1.0
    text = (scale[0] * t_text).long().clamp(min=1)
    frames = torch.maximum((scale[1] * t_frames).long(), text)
    mask = alignment_mask(text, frames, t_text, t_frames)
    return torch.randn(batch, t_text, t_frames, generator=gen), mask


def fitted_exponent(work: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(work)."""
    xs, ys = [math.log(w) for w in work], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def thread_time_alternating(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median CPU seconds of the calling thread per call of each fn, alternating round by round."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_size(size: str, batch: int, rounds: int) -> dict:
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise SystemExit(f"size '{size}' must look like TEXTxFRAMES, e.g. 100x500")
    t_text, t_frames = int(match.group(1)), int(match.group(2))
    value, mask = make_batch(t_text, t_frames, batch)
    mask_float = mask.float()
    ours = maximum_path(value, mask)
    for implementation in ("cython", "numpy"):
        theirs = mas_package.maximum_path(value, mask_float, implementation=implementation)
        assert torch.equal(ours, theirs), f"ours and the package's {implementation} path differ at {size}"
    fns = {
        "ours": lambda: maximum_path(value, mask),
        "cython": lambda: mas_package.maximum_path(value, mask_float, implementation="cython"),
        "numpy": lambda: mas_package.maximum_path(value, mask_float, implementation="numpy"),
    }
    seconds = thread_time_alternating(fns, rounds=rounds)
    wall = time_alternating(fns, rounds=rounds, reps=1)
    cells = batch * t_text * t_frames
    timings = " ".join(f"{n} {s * 1e3:8.2f} ms ({s * 1e9 / cells:5.2f} ns/cell)" for n, s in seconds.items())
    print(f"{size:>10} CPU {timings}   cython/ours {seconds['cython'] / seconds['ours']:.3f}")
    return {"t_text": t_text, "t_frames": t_frames, "batch": batch,
            "ms": {n: round(s * 1e3, 3) for n, s in seconds.items()},
            "ns_per_cell": {n: round(s * 1e9 / cells, 3) for n, s in seconds.items()},
            "ratio_cython_over_ours": round(seconds["cython"] / seconds["ours"], 3),
            "wall_ms": {n: round(s * 1e3, 3) for n, s in wall.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {size: run_size(size, args.batch, args.rounds) for size in args.sizes.split(",")}
    rows = sorted(sizes.values(), key=lambda row: row["t_text"] * row["t_frames"])
    exponents = {}
    for label, fitted in (("all_sizes", rows), ("largest_3", rows[-3:])):
        work = [row["t_text"] * row["t_frames"] for row in fitted]
        exponents[label] = {name: round(fitted_exponent(work, [row["ms"][name] for row in fitted]), 3)
                            for name in ("ours", "cython", "numpy")}
        print(f"fitted exponent of time in t_text * t_frames ({label}): {exponents[label]}")
    head_name, head = max(sizes.items(), key=lambda item: item[1]["t_text"] * item[1]["t_frames"])
    result = {
        "metric": f"MAS CPU ms (one thread) per batch of {args.batch} at {head_name} (t_text x t_frames, ragged "
                  "rows), lower is better; ratio = peer/ours",
        "unit": "ms",
        "ours": head["ms"]["ours"],
        "peer": head["ms"]["cython"],
        "peer_name": f"monotonic-alignment-search {version('monotonic-alignment-search')} "
                     "maximum_path(implementation='cython') on CPU, numpy conversion included",
        "ratio": head["ratio_cython_over_ours"],
        "goal": "time linear (or better) in t_text x t_frames; no ratio goal (issue 12)",
        "machine": machine(),
        "fitted_exponent_time_vs_text_x_frames": exponents,
        "sizes": sizes,
    }
    print(f"\n-> {write_result('mas', result)}")


if __name__ == "__main__":
    main()
