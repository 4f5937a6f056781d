"""RMSNorm through torch's fused ``F.rms_norm`` equals the composite fp32 formula (HF's DeepseekV3RMSNorm)."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.model.common.norm import RMSNorm


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
