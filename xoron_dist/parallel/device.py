"""Which device this rank computes on, which collective backend joins the ranks, which dtype it trains in.

CUDA: ``cuda:<local_rank>``, NCCL, bf16 where the GPU has it (else fp16). CPU: gloo and fp32,
since DeepSpeed's CPU path here trains in fp32 only. ``train.precision`` (auto/fp32/bf16/fp16)
overrides the dtype where the hardware allows.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
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

    Raises ``LaunchError`` when the node has fewer GPUs than ranks, and ``ConfigError`` naming
    ``train.precision`` when the hardware cannot train in the requested dtype.
    """
    if precision not in ("auto", *_DTYPES):
        raise ConfigError(f"config field 'train.precision' = {precision!r} is invalid: auto, fp32, bf16 or fp16")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if not 0 <= local_rank < count:
            raise LaunchError(
                f"local rank {local_rank} needs GPU {local_rank}, but this node shows {count} CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={_visible_devices()}): start at most {count} ranks per node."
            )
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            dtype = torch.bfloat16 if bf16 else torch.float16
        elif precision == "bf16" and not bf16:
            name = torch.cuda.get_device_name(local_rank)
            raise ConfigError(
                f"config field 'train.precision' = 'bf16' is invalid: {name} has no bf16 support; "
                f"use fp16 (loss scaling) or fp32, or auto to pick the best the GPU has"
            )
        else:
            dtype = _DTYPES[precision]
        return DeviceInfo(torch.device("cuda", local_rank), "nccl", dtype, "cuda")
    if precision in ("bf16", "fp16"):
        raise ConfigError(
            f"config field 'train.precision' = {precision!r} is invalid: no CUDA device here, and DeepSpeed's "
            f"CPU path trains in fp32; use train.precision=fp32 (or auto) on CPU"
        )
    return DeviceInfo(torch.device("cpu"), "gloo", torch.float32, "cpu")


@functools.lru_cache(maxsize=1)
def apex_available() -> bool:
    """True when NVIDIA apex with its CUDA extensions is installed (fused Adam, fused norms).

    PyPI's ``apex`` is an unrelated web package, so the test is for the compiled ``amp_C``
    extension and ``apex.optimizers.FusedAdam``, never for ``import apex`` alone.
    """
    if importlib.util.find_spec("amp_C") is None:
        return False
    try:
        return hasattr(importlib.import_module("apex.optimizers"), "FusedAdam")
    except ImportError:
        return False


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


__all__ = ["DeviceInfo", "apex_available", "detect_device"]
