"""``LinearCrossEntropy``, the chunked head + loss of one rank (``xoron_dist/model/llm/head.py``): the same
loss and gradients as autograd's one-piece head (F.linear, padding rows -inf, F.cross_entropy), whatever the
chunking, the weights, the ignored targets and the padding rows; bf16 within bf16's rounding."""

import pytest
import torch
import torch.nn.functional as F

from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.head import IGNORE_INDEX, LinearCrossEntropy, accumulates_in_place, add_weight_grad

ROWS, USABLE, WIDTH, TOKENS = 40, 37, 16, 23  # rows past USABLE: vocabulary padding, never predicted


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, WIDTH, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(ROWS, WIDTH, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, USABLE, (TOKENS,), generator=g)
    targets[[0, 5, 6]] = IGNORE_INDEX
    weights = torch.rand(TOKENS, generator=g) + 0.5
    return hidden, weight, targets, weights


def _fused(hidden, weight, targets, weights, chunk):
    return LinearCrossEntropy.apply(hidden, weight, targets, weights, USABLE, 0, chunk, None)


def _reference(hidden, weight, targets, weights):
    logits = F.linear(hidden, weight).float()
    logits[:, USABLE:] = float("-inf")
    losses = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (losses * (weights if weights is not None else 1)).sum()


def _grads(loss_of, inputs, scale=1.7):
    hidden, weight = inputs[:2]
    loss = loss_of(*inputs)
    (loss * scale).backward()  # the incoming gradient scales both
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 5, TOKENS, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_same_loss_and_gradients_as_autograd(chunk, weighted):
    inputs = list(_inputs())
    if not weighted:
        inputs[3] = None
    loss, (dh, dw) = _grads(lambda h, w, t, wt: _fused(h, w, t, wt, chunk), inputs)
    ref, (rh, rw) = _grads(_reference, inputs)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, rw, rtol=1e-5, atol=1e-6)
    assert dw[USABLE:].abs().max() == 0  # padding rows: no gradient
    assert dh[[0, 5, 6]].abs().max() == 0  # ignored targets: no gradient


def test_bf16_within_bf16_rounding_of_fp32():
    full = _inputs(torch.float32)
    half = _inputs(torch.bfloat16)
    loss, (dh, dw) = _grads(lambda h, w, t, wt: _fused(h, w, t, wt, 7), half)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    ref, (rh, rw) = _grads(_reference, full)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    for got, want in ((dh, rh), (dw, rw)):
        assert ((got.float() - want).abs().max() / want.abs().max()) < 3e-2


class MixedAddmm:
    """A stand-in on CPU for CUDA's mixed-dtype addmm (``addmm.dtype_out``: bf16/fp16 operands, an fp32
    addend and out, products summed in fp32), which torch's CPU build lacks; counts its calls. ``fault``
    makes it a kernel the probe must refuse: one that drops the addend, or returns a new tensor."""

    def __init__(self, fault: str | None = None):
        self.real, self.fault, self.calls = torch.addmm, fault, 0

    def __call__(self, input, mat1, mat2, *, out_dtype=None, out=None, beta=1, alpha=1):
        if out_dtype is None:
            return self.real(input, mat1, mat2, beta=beta, alpha=alpha, **({} if out is None else {"out": out}))
        assert mat1.dtype == mat2.dtype and mat1.dtype in (torch.bfloat16, torch.float16), (mat1.dtype, mat2.dtype)
        assert out_dtype == input.dtype == out.dtype == torch.float32 and beta == alpha == 1
        self.calls += 1
        product = mat1.float() @ mat2.float()
        if self.fault == "drops the addend":
            return out.copy_(product)
        if self.fault == "new tensor":
            return input + product
        return out.add_(product)


@pytest.fixture
def fresh_probe():
    accumulates_in_place.cache_clear()
    yield
    accumulates_in_place.cache_clear()


def test_weight_gradient_accumulates_in_fp32_in_place_where_the_device_can(monkeypatch, fresh_probe):
    """bf16 operands: on CPU (no mixed-dtype GEMM) the product is made in bf16 and added in fp32; where
    ``addmm(..., out_dtype=fp32, out=acc)`` works (CUDA; here its stand-in) every chunk adds into the
    accumulator in place, with the fp32 sum of the products, and the loss keeps bf16's accuracy."""
    cpu = torch.device("cpu")
    assert not accumulates_in_place(cpu, torch.bfloat16) and not accumulates_in_place(cpu, torch.float32)
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(8, 16, generator=g)
    grad, x = (torch.randn(40, n, generator=g).bfloat16() for n in (8, 16))
    portable = acc.clone()
    add_weight_grad(portable, grad, x)
    assert torch.equal(portable, acc + (grad.t() @ x).float())

    accumulates_in_place.cache_clear()
    mixed = MixedAddmm()
    monkeypatch.setattr(torch, "addmm", mixed)
    assert accumulates_in_place(cpu, torch.bfloat16)
    in_place = acc.clone()
    before, calls = in_place.data_ptr(), mixed.calls
    add_weight_grad(in_place, grad, x)
    assert mixed.calls == calls + 1 and in_place.data_ptr() == before
    torch.testing.assert_close(in_place, acc + grad.float().t() @ x.float(), rtol=1e-6, atol=1e-6)

    calls = mixed.calls
    loss, (dh, dw) = _grads(lambda h, w, t, wt: _fused(h, w, t, wt, 7), _inputs(torch.bfloat16))
    assert mixed.calls == calls + -(-TOKENS // 7)  # every chunk's ∂W
    ref, (rh, rw) = _grads(_reference, _inputs(torch.float32))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    assert ((dw.float() - rw).abs().max() / rw.abs().max()) < 3e-2


@pytest.mark.parametrize("fault", ["drops the addend", "new tensor"])
def test_the_in_place_probe_refuses_a_kernel_that_does_not_accumulate(monkeypatch, fresh_probe, fault):
    monkeypatch.setattr(torch, "addmm", MixedAddmm(fault))
    assert not accumulates_in_place(torch.device("cpu"), torch.bfloat16)


def test_frozen_weight_or_hidden_and_weights_that_need_gradients():
    hidden, weight, targets, weights = _inputs()
    weight.requires_grad_(False)
    _fused(hidden, weight, targets, weights, 4).backward()
    _, (rh, _) = _grads(_reference, (hidden.detach().requires_grad_(), weight.requires_grad_(), targets, weights),
                        scale=1.0)
    torch.testing.assert_close(hidden.grad, rh)
    with torch.no_grad():  # no gradients wanted: the loss alone
        loss = _fused(hidden, weight, targets, weights, 4)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets, weights).detach())
    with pytest.raises(ValueError, match="loss weights are constants"):
        _fused(hidden, weight, targets, weights.requires_grad_(), 4)


def test_non_finite_hidden_gives_a_non_finite_loss():
    """The numerics guard sees a NaN activation through the loss, as with autograd's head."""
    hidden, weight, targets, weights = _inputs()
    with torch.no_grad():
        hidden[3, 2] = float("nan")
    assert torch.isnan(_fused(hidden, weight, targets, weights, 8))


def test_model_chunked_loss_runs_through_it(one_thread, monkeypatch):
    """XoronLLM with ``loss_chunk_tokens``: the head's module call runs LinearCrossEntropy (no logits are made),
    with the one-piece model's loss and gradients."""
    cfg = load_config(None, ["preset=tiny"]).llm
    torch.manual_seed(0)
    whole, chunked = XoronLLM(cfg).train(), XoronLLM(cfg).train()
    chunked.load_state_dict(whole.state_dict())
    chunked.lm_head.chunk_tokens = 24
    ids = torch.randint(0, cfg.usable_vocab_size, (2, 33))
    labels = ids[:, 1:].clone()
    labels[0, :4] = IGNORE_INDEX
    calls = []
    apply = LinearCrossEntropy.apply
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: calls.append(a[6]) or apply(*a))
    outs = [model(ids[:, :-1], labels=labels) for model in (whole, chunked)]
    for out in outs:
        out.loss.backward()
    assert calls == [24] and outs[1].logits is None and outs[0].logits is not None
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
