"""Device, backend and dtype on this CPU machine; precision requests the hardware cannot honour."""

from __future__ import annotations

import os

import pytest
import torch

from xoron_dist.config import ConfigError
from xoron_dist.parallel.device import DeviceInfo, detect_device, set_matmul_precision, share_cpu_threads
from xoron_dist.parallel.launcher_env import LaunchError

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


@cpu_only
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_cpu_is_gloo_fp32(precision):
    assert detect_device(0, precision) == DeviceInfo(torch.device("cpu"), "gloo", torch.float32, "cpu")


@cpu_only
def test_bf16_on_cpu_is_the_cpu_bf16_lane():
    assert detect_device(0, "bf16") == DeviceInfo(torch.device("cpu"), "gloo", torch.bfloat16, "cpu")


@cpu_only
def test_fp16_on_cpu_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="train.precision' = 'fp16'.*use train.precision=bf16 or fp32"):
        detect_device(0, "fp16")


def _gpus(monkeypatch, count: int, visible: str | None) -> None:
    """torch.cuda as a process that sees ``count`` GPUs, with CUDA_VISIBLE_DEVICES=``visible``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_one_gpu_bound_per_task_is_cuda0_on_every_local_rank(monkeypatch, local_rank):
    """srun --gpus-per-task=1: task i sees only its own GPU (CUDA_VISIBLE_DEVICES=i) as cuda:0."""
    _gpus(monkeypatch, 1, str(local_rank))
    assert detect_device(local_rank) == DeviceInfo(torch.device("cuda", 0), "nccl", torch.bfloat16, "cuda")


def test_every_gpu_visible_is_cuda_local_rank(monkeypatch):
    _gpus(monkeypatch, 4, "0,1,2,3")
    assert detect_device(3).device == torch.device("cuda", 3)
    _gpus(monkeypatch, 4, None)
    assert detect_device(2).device == torch.device("cuda", 2)


@pytest.mark.parametrize(("count", "visible"), [(1, None), (2, "4,5"), (2, None)])
def test_a_rank_without_a_gpu_of_its_own_is_told_what_was_seen(monkeypatch, count, visible):
    _gpus(monkeypatch, count, visible)
    with pytest.raises(LaunchError) as err:
        detect_device(2)
    message = str(err.value)
    for seen in ("local rank 2", f"sees {count} CUDA device", f"CUDA_VISIBLE_DEVICES={visible or '<unset>'}",
                 "--gpus-per-task=1", f"at most {count} rank"):
        assert seen in message, (seen, message)


def test_unknown_precision():
    with pytest.raises(ConfigError, match="auto, fp32, bf16 or fp16"):
        detect_device(0, "fp8")


def test_tf32_is_set_on_cuda_only():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, False
        set_matmul_precision("cpu", True)  # CPU has no TF32: the CUDA flags are left alone
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        set_matmul_precision("cuda", True)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        set_matmul_precision("cuda", False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_each_cpu_rank_takes_its_share_of_the_cores(monkeypatch):
    """N ranks on one node: cores / N torch threads each (deepspeed, srun and mpiexec set nothing; torch
    would start one thread per core in every rank); a user's OMP_NUM_THREADS wins; GPUs are left alone."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert share_cpu_threads("cpu", 2, environ={}) == 4 and calls == [4]
    assert share_cpu_threads("cpu", 3, environ={}) == 2
    assert share_cpu_threads("cpu", 16, environ={}) == 1  # never 0
    assert share_cpu_threads("cpu", 1, environ={}) == 8
    calls.clear()
    assert share_cpu_threads("cpu", 2, environ={"OMP_NUM_THREADS": "3"}) is None
    assert share_cpu_threads("cuda", 2, environ={}) is None
    assert calls == []
