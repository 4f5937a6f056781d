"""The experts' grouped GEMM (``model.common.grouped_mm``): the layout check, the ``xoron::grouped_mm`` op that
compiled callers trace (forward, backward, re-alignment), and a whole MoE layer traced with ``fullgraph``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xoron_dist.config import MoEConfig
from xoron_dist.model.common import grouped_mm
from xoron_dist.model.common.moe import MoEFeedForward

ENDS = torch.tensor([5, 20, 20, 40], dtype=torch.int32)  # group 2 is empty


def _operands(dtype=torch.float32, k=16, n=24):
    torch.manual_seed(0)
    a = torch.randn(40, k, dtype=dtype, requires_grad=True)
    w = torch.randn(4, n, k, dtype=dtype, requires_grad=True)  # stored (groups, out, in) like the experts
    return a, w


def test_fits_follows_the_kernels_layout_rules():
    a, w = _operands()
    assert grouped_mm.fits(a, w.transpose(-2, -1))
    assert grouped_mm.fits(a.bfloat16(), w.bfloat16().transpose(-2, -1))
    assert not grouped_mm.fits(a.half(), w.half().transpose(-2, -1))  # no fp16 kernel
    assert not grouped_mm.fits(a, w.bfloat16().transpose(-2, -1))  # mixed dtypes
    odd_a, odd_w = _operands(k=6, n=24)
    assert not grouped_mm.fits(odd_a, odd_w.transpose(-2, -1))  # a row of 6 fp32 is 24 bytes
    narrow_a, narrow_w = _operands(n=6)
    assert not grouped_mm.fits(narrow_a, narrow_w.transpose(-2, -1))  # output rows of 24 bytes
    buffer = torch.randn(41 * 16)
    shifted = buffer[1:641].view(40, 16)  # rows 64 bytes apart, but the base 4 bytes off
    assert shifted.data_ptr() % 16 and not grouped_mm.fits(shifted, w.transpose(-2, -1))


@pytest.mark.parametrize(("capability", "kernel"), [((9, 0), True), ((10, 0), True), ((8, 0), False),
                                                     ((8, 9), False), ((12, 0), False)])
def test_only_gpus_with_the_grouped_kernel_take_it(capability, kernel, monkeypatch):
    """Elsewhere torch._grouped_mm loops behind a copy of offs to the host on every call (GroupedBlas.cpp)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped_mm.has_kernel(torch.device("cuda", 0)) is kernel
    assert grouped_mm.has_kernel(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_and_its_backward_equal_the_eager_kernel(dtype):
    a, w = _operands(dtype)
    grad = torch.randn(40, 24, dtype=dtype)

    def run(fn):
        a.grad = w.grad = None
        out = fn(a, w.transpose(-2, -1), ENDS)
        out.backward(grad)
        return out.detach(), a.grad, w.grad

    got = run(torch.ops.xoron.grouped_mm)
    ref = run(lambda x, y, offs: torch._grouped_mm(x, y, offs=offs))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    loop = torch.cat([a[s:e] @ w[i].T for i, (s, e) in enumerate(zip([0, 5, 20, 20], ENDS.tolist(), strict=True))])
    torch.testing.assert_close(got[0], loop.detach())
    assert got[2][2].abs().max() == 0  # the empty group's weight gets no gradient


def test_op_realigns_an_operand_at_an_offset(monkeypatch):
    """The CPU kernel takes any pointer; CUDA's refuses one not 16-byte aligned: a stand-in with that rule."""
    kernel = torch._grouped_mm

    def cuda_rules(a, b, offs=None):
        assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0, "misaligned operand"
        return kernel(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", cuda_rules)
    _, w = _operands()
    buffer = torch.randn(41 * 16)
    shifted = buffer[1:641].view(40, 16)
    with pytest.raises(AssertionError, match="misaligned"):
        cuda_rules(shifted, w.detach().transpose(-2, -1), ENDS)
    got = torch.ops.xoron.grouped_mm(shifted, w.detach().transpose(-2, -1), ENDS)
    torch.testing.assert_close(got, kernel(shifted.clone(), w.detach().transpose(-2, -1), offs=ENDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_traces_whole_and_matches_eager(dtype):
    """fullgraph: one graph for router, dispatch, grouped experts, combine and shared expert (fp32 is the CPU's
    training dtype, which torch's own _grouped_mm fake kernel refuses; bf16 the GPU's)."""
    torch.manual_seed(0)
    moe = MoEFeedForward(32, MoEConfig(num_experts=8, top_k=2, num_shared_experts=1, expert_intermediate_size=16))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.to(dtype)
    x = torch.randn(2, 24, 32, dtype=dtype)

    def run(module):
        moe.zero_grad()
        inp = x.clone().requires_grad_()
        out = module(inp)
        F.mse_loss(out, torch.ones_like(out)).backward()
        return out.detach(), inp.grad, moe.experts.gate_up.grad.clone(), moe.experts.down.grad.clone()

    torch._dynamo.reset()
    ref = run(moe)
    got = run(torch.compile(moe, backend="aot_eager", fullgraph=True))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)
