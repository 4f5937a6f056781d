"""Which device this rank computes on, which collective backend joins the ranks, which dtype it trains in.

CUDA: NCCL, bf16 where the GPU has it (else fp16). The GPU is ``cuda:<local_rank>`` when the
process sees every GPU of its node, and ``cuda:0`` when it sees exactly one device through
``CUDA_VISIBLE_DEVICES`` (SLURM ``--gpus-per-task=1`` / ``--gpu-bind=single:1``, or any launcher
that binds one GPU per task): then every local rank's own GPU is the first visible one.
CPU: gloo and fp32 by default; ``train.precision=bf16`` trains in bf16 there too (DeepSpeed's CPU
accelerator supports it: the CPU bf16 lane of the tests), fp16 is GPU-only. ``train.precision``
(auto/fp32/bf16/fp16) overrides the dtype where the hardware allows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from xoron_dist.config import ConfigError
from xoron_dist.parallel.launcher_env import LaunchError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceInfo:
    """``kind``: "cuda" or "cpu"; ``backend``: the torch.distributed backend for that kind."""

    device: torch.device
    backend: str
    dtype: torch.dtype
    kind: str


def detect_device(local_rank: int, precision: str = "auto") -> DeviceInfo:
    """Pick this rank's device from its local rank; ``precision`` is ``train.precision``.

    Raises ``LaunchError`` when this rank has no GPU of its own to use, and ``ConfigError`` naming
    ``train.precision`` when the hardware cannot train in the requested dtype.
    """
    if precision not in ("auto", *_DTYPES):
        raise ConfigError(f"config field 'train.precision' = {precision!r} is invalid: auto, fp32, bf16 or fp16")
    if torch.cuda.is_available():
        index = cuda_index(local_rank)
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            dtype = torch.bfloat16 if bf16 else torch.float16
        elif precision == "bf16" and not bf16:
            name = torch.cuda.get_device_name(index)
            raise ConfigError(
                f"config field 'train.precision' = 'bf16' is invalid: {name} has no bf16 support; "
                f"use fp16 (loss scaling) or fp32, or auto to pick the best the GPU has"
            )
        else:
            dtype = _DTYPES[precision]
        return DeviceInfo(torch.device("cuda", index), "nccl", dtype, "cuda")
    if precision == "fp16":
        raise ConfigError(
            "config field 'train.precision' = 'fp16' is invalid: no CUDA device here, and fp16 with loss "
            "scaling is a GPU path; use train.precision=bf16 or fp32 on CPU (auto is fp32 there)"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return DeviceInfo(torch.device("cpu"), "gloo", dtype, "cpu")


def cuda_index(local_rank: int) -> int:
    """The CUDA device index of local rank ``local_rank``: the rank's own GPU among the visible ones.

    All of the node's GPUs visible: ``local_rank``. Exactly one visible, and ``CUDA_VISIBLE_DEVICES``
    names one device: the launcher bound one GPU to this task, so it is ``0`` whatever the local rank.
    Otherwise a rank past the visible devices has no GPU of its own: ``LaunchError`` saying what was
    seen and what to change (with one device visible but ``CUDA_VISIBLE_DEVICES`` unset, all ranks
    would share one GPU, which NCCL refuses).
    """
    count = torch.cuda.device_count()
    if 0 <= local_rank < count:
        return local_rank
    visible = _visible_devices()
    if count == 1 and local_rank >= 0 and len(visible.split(",")) == 1 and visible != "<unset>":
        return 0
    raise LaunchError(
        f"local rank {local_rank} has no GPU of its own: this process sees {count} CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={visible}). Either let every process see all of the node's GPUs and start "
        f"at most {count} rank(s) per node, or bind one GPU per task (srun --gpus-per-task=1 or "
        f"--gpu-bind=single:1, which set CUDA_VISIBLE_DEVICES to that task's one GPU)."
    )


def set_matmul_precision(kind: str, tf32: bool) -> None:
    """On CUDA, let fp32 matmuls and cuDNN convolutions use TF32 (``train.tf32``); CPU has no TF32."""
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def share_cpu_threads(kind: str, local_world_size: int, environ: dict[str, str] | None = None) -> int | None:
    """On CPU, give each of the node's ``local_world_size`` ranks its share of the cores for torch's
    intra-op threads; return the count set, or None where nothing was changed.

    torch starts one thread per core in every process, so N ranks on one node run N x cores threads:
    oversubscribed, OpenMP's spinning threads and gloo's waits slow a step several-fold. torchrun sets
    ``OMP_NUM_THREADS=1`` for that reason; ``deepspeed`` (without ``--bind_cores_to_rank``), ``srun`` and
    ``mpiexec`` set nothing. A user's ``OMP_NUM_THREADS`` wins. The cores are the ones this process may
    run on (``sched_getaffinity``: a SLURM task's allocation), not the whole machine. GPU ranks are left
    as they are (their host threads feed the device)."""
    environ = os.environ if environ is None else environ
    if kind != "cpu" or "OMP_NUM_THREADS" in environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


__all__ = ["DeviceInfo", "cuda_index", "detect_device", "set_matmul_precision", "share_cpu_threads"]
