"""The device-generic attention adapter: CPU kernel == emulated CUDA kernels == fp64 reference, and the emulator
is faithful to the real CUDA ops (signatures against their schemas, outputs against their meta registrations,
refusals).

The CUDA branch runs on CPU by swapping the adapter's op lookup for ``tests/model/cuda_sdpa_emulator.py``;
``test_real_cuda_kernels_match_sdpa`` runs the real ops and is skipped without a GPU.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import xoron_dist.model.common.attention_kernels as ak
from tests.model import cuda_sdpa_emulator as emu
from xoron_dist.parallel import ring_attention as ra

REAL_OPS = {
    "flash": torch.ops.aten._scaled_dot_product_flash_attention.default,
    "flash_backward": torch.ops.aten._scaled_dot_product_flash_attention_backward.default,
    "efficient": torch.ops.aten._scaled_dot_product_efficient_attention.default,
    "efficient_backward": torch.ops.aten._scaled_dot_product_efficient_attention_backward.default,
}


@pytest.fixture
def emulated_cuda(monkeypatch):
    """The adapter sees every tensor as a CUDA tensor and calls the emulated CUDA ops."""
    monkeypatch.setattr(ak, "_device_type", lambda t: "cuda")
    monkeypatch.setattr(ak, "CUDA_OPS", emu.EMULATED_CUDA_OPS)


def _reference(q, k, v, allowed, causal, scale):
    """fp64 masked attention: out (b, h, s, dv) (0 for rows with no key) and lse (b, h, s) (-inf there)."""
    s, t = q.shape[2], k.shape[2]
    mask = torch.ones(1, 1, s, t, dtype=torch.bool)
    if causal:
        mask = mask & torch.ones(s, t, dtype=torch.bool).tril()
    if allowed is not None:
        mask = mask & allowed
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp().nan_to_num(0.0)) @ v.double(), lse


def _inputs(dtype, masked, qk=12, dv=7, s=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, s, qk, generator=gen).to(dtype) for _ in range(2))
    v, dout = (torch.randn(2, 3, s, dv, generator=gen).to(dtype) for _ in range(2))
    allowed = empty = None
    if masked:
        allowed = torch.rand(2, 1, s, s, generator=gen) < 0.5
        allowed[:, :, 3] = False  # a row that sees no key at all
        empty = ~allowed.any(-1)[:, 0]
    return q, k, v, dout, allowed, empty


# --- the emulator is faithful to the real ops --------------------------------------------------


@pytest.mark.parametrize("name", list(REAL_OPS))
def test_emulator_signatures_match_the_registered_schemas(name):
    schema = REAL_OPS[name]._schema
    params = list(inspect.signature(getattr(emu, name)).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for param, arg in zip(params, schema.arguments, strict=True):
        assert (param.kind == param.KEYWORD_ONLY) == arg.kwarg_only, arg.name
        if arg.has_default_value():
            assert param.default == arg.default_value, arg.name
        else:
            assert param.default is param.empty, arg.name


def _meta_and_emulated(name, args_of):
    def same(out_meta, out_emu):
        assert len(out_meta) == len(out_emu)
        for m, e in zip(out_meta, out_emu, strict=True):
            if isinstance(m, torch.Tensor):
                assert (tuple(m.shape), m.dtype) == (tuple(e.shape), e.dtype), name
            else:
                assert m == e, name

    same(REAL_OPS[name](*args_of("meta")), getattr(emu, name)(*args_of("cpu")))


@pytest.mark.parametrize("seq", [37, 64])
def test_emulator_outputs_match_the_meta_registrations(seq):
    """Shapes and dtypes of every output (incl. the efficient kernel's LSE padded to ceil32(seq))."""
    b, h, t = 2, 3, 50

    def make(device, *shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype, device=device)

    def flash(d):
        return make(d, b, h, seq, 16), make(d, b, h, t, 16), make(d, b, h, t, 16), 0.0, True, False

    def flash_bwd(d):
        q, k, v = flash(d)[:3]
        seed = (torch.zeros(2, dtype=torch.uint64, device=d), torch.zeros((), dtype=torch.uint64, device=d))
        return (q, q, k, v, q, make(d, b, h, seq, dtype=torch.float32), None, None, seq, t, 0.0, True, *seed)

    def efficient(d):
        return make(d, b, h, seq, 16), make(d, b, h, t, 16), make(d, b, h, t, 8), None, True, 0.0, False

    def efficient_bwd(d):
        q, k, v = efficient(d)[:3]
        lse = make(d, b, h, math.ceil(seq / 32) * 32, dtype=torch.float32)
        seed = torch.zeros((), dtype=torch.int64, device=d)
        out = make(d, b, seq, h, 8).transpose(1, 2)  # the forward's own (b, s, h, d) memory
        return (out, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], False)

    for name, args in (("flash", flash), ("flash_backward", flash_bwd), ("efficient", efficient),
                       ("efficient_backward", efficient_bwd)):
        _meta_and_emulated(name, args)


def test_emulator_refuses_what_the_cuda_ops_refuse():
    half = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        emu.flash(half.float(), half.float(), half.float())
    wide = torch.zeros(1, 2, 8, 264, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 256"):
        emu.flash(wide, wide, wide)
    with pytest.raises(RuntimeError, match="same head dimension"):
        emu.flash(half, half, half[..., :8])
    with pytest.raises((TypeError, RuntimeError), match="attn_mask"):  # the flash op has no mask argument
        emu.flash(half, half, half, attn_mask=torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16))
    with pytest.raises((TypeError, RuntimeError), match="attn_mask"):
        REAL_OPS["flash"](half, half, half, attn_mask=torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16))
    unaligned = torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16)  # row stride 8
    with pytest.raises(RuntimeError, match="strideM"):
        emu.efficient(half, half, half, unaligned, True)
    with pytest.raises(RuntimeError, match="should match query's dtype"):
        emu.efficient(half, half, half, torch.zeros(1, 1, 8, 16)[..., :8], True)
    out, lse, seed, offset = emu.efficient(half, half, half, None, True)
    assert lse.shape == (1, 2, 32) and lse[..., 8:].isinf().all()  # padded rows are not LSEs
    assert out.transpose(1, 2).is_contiguous()  # laid out (b, s, h, d), as the real kernel's
    with pytest.raises(RuntimeError, match="ceil32"):
        emu.efficient_backward(out, half, half, half, None, out, lse[..., :8], seed, offset, 0.0,
                               [True, True, True, False])
    with pytest.raises(RuntimeError, match=r"laid out \(batch, seq, heads, dim\)"):  # half: dq, dk wrong on a GPU
        emu.efficient_backward(half, half, half, half, None, out.contiguous(), lse, seed, offset, 0.0,
                               [True, True, True, False])


# --- kernel choice -------------------------------------------------------------------------------


def test_the_adapter_picks_the_kernel_by_device_dtype_head_dim_and_mask():
    pick = ak.select_kernel
    assert pick("cpu", torch.float32, 192, 128, masked=True) == "cpu_flash"
    assert pick("cuda", torch.bfloat16, 192, 128, masked=False) == "cuda_flash"
    assert pick("cuda", torch.bfloat16, 192, 128, masked=True) == "cuda_efficient"  # flash takes no mask
    assert pick("cuda", torch.float32, 192, 128, masked=False) == "cuda_efficient"  # flash is half precision
    assert pick("cuda", torch.float16, 264, 128, masked=False) == "cuda_efficient"  # flash stops at 256
    assert pick("cuda", torch.float16, 250, 128, masked=False) == "cuda_flash"  # 250 pads to 256: still flash
    with pytest.raises(ak.AttentionKernelError, match="float64"):
        pick("cuda", torch.float64, 16, 16, masked=False)
    with pytest.raises(ak.AttentionKernelError, match="cpu and cuda only"):
        pick("mps", torch.float32, 16, 16, masked=False)


# --- the adapter: CPU == emulated CUDA == reference, forward and backward ------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask_with_empty_row"])
@pytest.mark.parametrize("device", ["cpu", "emulated_cuda"])
def test_forward_and_backward_match_the_reference(request, dtype, masked, device):
    if device == "emulated_cuda":
        request.getfixturevalue("emulated_cuda")
    q, k, v, dout, allowed, empty = _inputs(dtype, masked)
    causal, scale = not masked, 0.3
    out, lse = ak.attention_forward(q, k, v, scale=scale, causal=causal, allowed=allowed, empty_rows=empty)
    assert out.shape == v.shape[:2] + (q.shape[2], v.shape[-1]) and out.dtype == dtype and lse.dtype == torch.float32
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*ref_in, allowed, causal, scale)
    ref_out.backward(dout.double())
    grads = ak.attention_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, allowed=allowed)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.double() - ref_out).abs().max() <= tol
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert (lse.double() - ref_lse).nan_to_num(0.0).abs().max() <= 1e-4
    for got, ref in zip(grads, ref_in, strict=True):
        assert got.shape == ref.shape and got.dtype == dtype
        assert (got.double() - ref.grad).abs().max() <= tol * max(1.0, ref.grad.abs().max().item())


def test_emulated_cuda_takes_both_kernels_with_the_padded_lse(emulated_cuda, monkeypatch):
    """Both CUDA kernels really run (counted), and the efficient kernel's padded LSE never leaks out."""
    calls = []
    for name in ("flash", "efficient", "efficient_backward", "flash_backward"):
        op = getattr(emu.EMULATED_CUDA_OPS, name)
        monkeypatch.setattr(ak, "CUDA_OPS", ak.CudaOps(**{
            **vars(ak.CUDA_OPS), name: lambda *a, _op=op, _n=name, **kw: calls.append(_n) or _op(*a, **kw)}))
    q, k, v, dout, allowed, empty = _inputs(torch.bfloat16, masked=True, s=33)
    out, lse = ak.attention_forward(q, k, v, scale=0.3, allowed=allowed, empty_rows=empty)
    assert lse.shape == (2, 3, 33) and not (lse == float("inf")).any()
    ak.attention_backward(dout, q, k, v, out, lse, scale=0.3, allowed=allowed)
    out, lse = ak.attention_forward(q, k, v, scale=0.3, causal=True)
    ak.attention_backward(dout, q, k, v, out, lse, scale=0.3, causal=True)
    assert calls == ["efficient", "efficient_backward", "flash", "flash_backward"]


def test_fused_attention_is_differentiable_and_equals_sdpa():
    q, k, v, dout, _, _ = _inputs(torch.float32, masked=False)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ak.fused_attention(*ours, scale=0.3, causal=True).backward(dout)
    F.scaled_dot_product_attention(*ref, is_causal=True, scale=0.3).backward(dout)
    for a, b in zip(ours, ref, strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-5


# --- the ring's block step on the emulated CUDA kernels -------------------------------------------


def _one_rank_ring(emulate: bool, monkeypatch, dtype, causal: bool):
    """The whole ring (tile plan, merge, recomputing backward) on one rank: every block is the local one."""
    if emulate:
        monkeypatch.setattr(ak, "_device_type", lambda t: "cuda")
        monkeypatch.setattr(ak, "CUDA_OPS", emu.EMULATED_CUDA_OPS)
    gen = torch.Generator().manual_seed(5)
    b, s, h, d, dv = 2, 24, 3, 12, 7
    q, k = (torch.randn(b, s, h, d, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen).to(dtype).requires_grad_()
    docs = (torch.rand(b, s, generator=gen) < 0.2).long().cumsum(-1)
    meta = ra._pack_meta(torch.arange(s)[None], docs)
    ring = SimpleNamespace(size=1, rank=0)
    plans = ra._plans(meta, [meta], causal)  # one rank: its own block at the one ring step
    out = ra._RingAttentionFunction.apply(q, k, v, plans, ring, d**-0.5)
    out.backward(torch.ones_like(out))
    monkeypatch.undo()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("causal", [True, False], ids=["causal_packed", "full_packed"])
def test_ring_block_step_on_emulated_cuda_equals_the_cpu_kernel(monkeypatch, causal):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        cpu = _one_rank_ring(False, monkeypatch, dtype, causal)
        cuda = _one_rank_ring(True, monkeypatch, dtype, causal)
        for a, b in zip(cpu, cuda, strict=True):
            assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item()), dtype


# --- the real CUDA kernels (skipped on CPU machines) -----------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask_with_empty_row"])
def test_real_cuda_kernels_match_sdpa(dtype, masked):
    q, k, v, dout, allowed, empty = (None if t is None else t.cuda() for t in _inputs(dtype, masked, qk=192, dv=128))
    out, lse = ak.attention_forward(q, k, v, scale=0.1, causal=not masked, allowed=allowed, empty_rows=empty)
    grads = ak.attention_backward(dout, q, k, v, out, lse, scale=0.1, causal=not masked, allowed=allowed)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*ref_in, None if allowed is None else allowed.cpu(), not masked, 0.1)
    ref_out.backward(dout.cpu().double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.cpu().double() - ref_out).abs().max() <= tol
    assert (lse.cpu().double() - ref_lse).nan_to_num(0.0).abs().max() <= 1e-3
    for got, ref in zip(grads, ref_in, strict=True):
        assert (got.cpu().double() - ref.grad).abs().max() <= tol * max(1.0, ref.grad.abs().max().item())
