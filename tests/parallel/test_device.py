"""Device, backend and dtype on this CPU machine; precision requests the hardware cannot honour."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config import ConfigError
from xoron_dist.parallel.device import DeviceInfo, apex_available, detect_device

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


@cpu_only
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_cpu_is_gloo_fp32(precision):
    assert detect_device(0, precision) == DeviceInfo(torch.device("cpu"), "gloo", torch.float32, "cpu")


@cpu_only
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_is_refused_naming_the_field(precision):
    with pytest.raises(ConfigError, match=f"train.precision' = '{precision}'.*use train.precision=fp32"):
        detect_device(0, precision)


def test_unknown_precision():
    with pytest.raises(ConfigError, match="auto, fp32, bf16 or fp16"):
        detect_device(0, "fp8")


def test_apex_probe_is_a_bool_and_never_requires_apex():
    assert isinstance(apex_available(), bool)
