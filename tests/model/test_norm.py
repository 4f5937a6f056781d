"""RMSNorm through torch's fused ``F.rms_norm`` equals the composite fp32 formula (HF's DeepseekV3RMSNorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xoron_dist.model.common.norm import BatchNorm1d, RMSNorm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF DeepseekV3RMSNorm: the statistic in fp32, the normalised x cast back, then the weight."""
    dtype = x.dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_equals_the_composite_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48))
    # large and tiny rows: where a bf16 statistic (instead of fp32) would show
    x = (torch.randn(3, 7, 48) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 48).to(dtype)
    ref_w = norm.weight.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    got, ref = norm(x), reference_rms_norm(ref_x, ref_w, 1e-5)
    assert got.dtype == ref.dtype == dtype
    assert torch.equal(got, ref)
    got.backward(grad_out)
    ref.backward(grad_out)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, ref_w.grad, **tol)


def test_rms_norm_keeps_an_fp32_weight_on_bf16_inputs():
    """Mixed precision (fp32 master weight, bf16 activations) promotes as the composite formula does."""
    norm = RMSNorm(16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, 1e-6))
    assert norm(x).dtype == torch.float32


def test_batch_norm_equals_torch_in_fp32_and_keeps_fp32_statistics_under_a_bf16_cast():
    """BatchNorm1d: nn.BatchNorm1d's outputs, running statistics and state dict in fp32; after .bfloat16() (or
    an engine casting the weights only) it takes bf16 input, returns bf16 and updates fp32 statistics (the
    speaker encoder's and the Conformer's norms failed the first bf16 smoke run)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5)
    ours, theirs = BatchNorm1d(4), nn.BatchNorm1d(4)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    for whole_module in (True, False):  # .bfloat16(), or an engine casting the parameters only
        model = BatchNorm1d(4).train()
        if whole_module:
            model.bfloat16()
        for p in model.parameters():
            p.data = p.data.bfloat16()
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16 and model.running_mean.dtype == torch.float32
        torch.testing.assert_close(model.running_mean, 0.1 * x.bfloat16().float().mean((0, 2)))
