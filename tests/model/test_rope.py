"""Rotary tables keep fp32 through a blanket cast of the model to bf16 (inference, export, DeepSpeed bf16)."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config import XoronConfig
from xoron_dist.model.llm import XoronLLM


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(), lambda m: m.half()])
def test_rope_tables_stay_fp32_after_the_model_is_cast(cast):
    model = XoronLLM(XoronConfig.preset("tiny").llm)
    positions = torch.arange(0, 131072, 4096)[None]  # far positions: where rounded frequencies show
    cos, sin = model.rope(positions)
    inv_freq = model.rope.inv_freq.clone()
    cast(model)
    assert next(model.parameters()).dtype != torch.float32  # the model itself was cast ...
    assert model.rope.inv_freq.dtype == torch.float32  # ... its rotary frequencies were not
    assert torch.equal(model.rope.inv_freq, inv_freq)
    cos_after, sin_after = model.rope(positions)
    assert torch.equal(cos_after, cos) and torch.equal(sin_after, sin)


def test_rope_tables_follow_the_device_and_stay_fp32():
    model = XoronLLM(XoronConfig.preset("tiny").llm)
    model.to(device="meta", dtype=torch.bfloat16)
    assert model.rope.inv_freq.device.type == "meta" and model.rope.inv_freq.dtype == torch.float32
