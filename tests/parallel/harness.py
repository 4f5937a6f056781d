"""Run one function on N gloo CPU ranks and collect what each returns: the multi-rank test harness.

    def body(scale):                       # module level: the ranks import it by name
        ctx = state.initialize(cfg)
        ...
        return loss.item()                 # anything picklable (tensors too)

    losses = run_ranks(body, 2, 0.5)       # [rank 0's result, rank 1's result]

Each rank is a new process with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/
MASTER_PORT set as torchrun would (on a free port), the caller's other environment variables,
and none of an outer launcher's (SLURM, MPI, deepspeed), so that the ranks see only this job.

Ranks are forked from a ``forkserver`` that has imported torch, DeepSpeed and Megatron-core once
per test session: a rank starts in a fraction of a second instead of ~4 s of imports, which is
what keeps 4-rank tests fast on 2 cores. The server never touches torch.distributed, so every
rank still starts with no process group. Variables read at *import* time by those modules come
from the environment the server started with; pass ``start_method="spawn"`` for a rank that
imports everything afresh.

A rank that raises fails the call with its traceback (``RankFailure``); a rank that hangs is
killed at ``timeout`` after printing its stack. If the body leaves torch.distributed
initialized, the harness synchronises the ranks and tears it down, so rank 0 (which hosts the
rendezvous store) never leaves first.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

# What the session's forkserver imports once, before it forks anything: the harness's ranks need the
# first three; the trainer's entry point is there for tests/train/runs.py's trainer ranks.
_PRELOAD = ["torch", "deepspeed.comm", "xoron_dist.parallel.state", "xoron_dist.train.__main__",
            "xoron_dist.train.trainer"]


def forkserver_context():
    """The multiprocessing context of the session's forkserver (started on first use, ``_PRELOAD``
    imported once in it), shared by the harness and the trainer ranks of ``tests/train/runs.py``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the session's server first starts
    return ctx


# Variables of launchers (torchrun's and outer ones) that would make discover_ranks (or DeepSpeed's
# shared-memory allreduce, LOCAL_SIZE) describe a job other than the one a test starts.
_SCRUB_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_")
_SCRUB_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "HYDI_CONTROL_FD")


class RankFailure(AssertionError):
    """One or more ranks raised, died or hung. ``failures`` maps rank -> traceback or reason."""

    def __init__(self, world_size: int, failures: dict[int, str]):
        self.failures = failures
        parts = [f"{len(failures)} of {world_size} rank(s) failed"]
        parts += [f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items())]
        super().__init__("\n".join(parts))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              env: dict[str, str] | None = None, threads_per_rank: int | None = None,
              start_method: str = "forkserver") -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` fresh CPU ranks; return the results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). ``env`` adds variables to
    every rank. ``threads_per_rank`` defaults to cores / ranks so N ranks do not oversubscribe
    the CPU. ``timeout`` covers the whole run (the first DeepSpeed init on a machine JIT-builds
    a comm op for about a minute; later runs load it from the cache).
    """
    from xoron_dist.parallel.launcher_env import free_port

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    base_env = {
        **{k: v for k, v in os.environ.items() if not is_launcher_var(k)},
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port("127.0.0.1")),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        **(env or {}),
    }
    ctx = forkserver_context() if start_method == "forkserver" else mp.get_context(start_method)
    results: Any = ctx.Queue()
    procs = []
    for rank in range(world_size):
        rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        proc = ctx.Process(target=_rank_main, args=(fn, args, rank_env, threads, timeout, results),
                           name=f"rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)

    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    for rank in range(world_size):
                        if rank not in outputs and rank not in failures:
                            failures[rank] = f"no result after {timeout:.0f} s (hung; its stack is on stderr)"
                    break
                for rank, proc in enumerate(procs):
                    if rank not in outputs and rank not in failures and not proc.is_alive():
                        _drain_then_mark_dead(results, outputs, failures, rank, proc)
                if failures:
                    break
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                break  # peers are likely stuck in a collective with the failed rank: stop them all
    finally:
        _stop(procs, graceful=not failures)
    if failures:
        raise RankFailure(world_size, failures)
    return [outputs[rank] for rank in range(world_size)]


def is_launcher_var(name: str) -> bool:
    """Whether a launcher sets ``name`` (torchrun, srun, mpiexec, deepspeed): the one rule of what a test
    removes so that the job it starts sees only itself (the harness's ranks, ``runs.clean_env``)."""
    return name.startswith(_SCRUB_PREFIXES) or name in _SCRUB_NAMES


def _drain_then_mark_dead(results: Any, outputs: dict, failures: dict, rank: int, proc: Any) -> None:
    """A dead rank may still have a result in flight: read the queue once more before blaming it."""
    try:
        while True:
            got_rank, ok, payload = results.get(timeout=0.5)
            if ok:
                outputs[got_rank] = pickle.loads(payload)
            else:
                failures[got_rank] = payload
    except queue.Empty:
        pass
    if rank not in outputs and rank not in failures:
        failures[rank] = f"process exited with code {proc.exitcode} without a result"


def _stop(procs: list, graceful: bool) -> None:
    for proc in procs:
        proc.join(timeout=10 if graceful else 0.1)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _rank_main(fn: Callable[..., Any], args: tuple, env: dict[str, str], threads: int, timeout: float,
               results: Any) -> None:
    os.environ.clear()  # a forked rank holds the server's environment: replace it with the caller's
    os.environ.update(env)
    rank = int(env["RANK"])
    torch.set_num_threads(threads)
    # A hung rank prints where it hangs shortly before the parent gives up on it.
    faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=False)
    try:
        payload = pickle.dumps(fn(*args))
        _finish_distributed()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        sys.stderr.flush()
        return
    finally:
        faulthandler.cancel_dump_traceback_later()
    results.put((rank, True, payload))


def _finish_distributed() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    from xoron_dist.parallel import state

    state.destroy()


def zero3_engine(model: torch.nn.Module, cfg, ctx, **zero: Any):
    """Inside a rank: the parallelized ``model`` in a DeepSpeed ZeRO-3 engine (CPU, fp32, the run's optimizer
    groups), every weight partitioned (persistence threshold 0); ``zero`` sets more ``zero_optimization`` keys
    (small buckets, say). ``ctx``: ``xoron_dist.parallel.state.initialize``'s context."""
    import deepspeed

    from xoron_dist.parallel import state
    from xoron_dist.train.build import parameter_groups
    from xoron_dist.train.ds_config import build_ds_config

    ds = build_ds_config(cfg, ctx.dp_size, torch.float32, "cpu")
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, **zero)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.0, 3), config=ds,
                                      mpu=state.mpu())
    return engine
