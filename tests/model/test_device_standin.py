"""The stand-in accelerator (tests/model/device_standin.py) refuses what CUDA refuses, allows what CUDA allows,
and computes what the CPU computes: the device-placement tests (tests/train/test_device_placement.py) rest
on all three."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.model.device_standin import ACCEL, DeviceMixError, OnAccel, standin_accelerator
from xoron_dist.model.common import attention_kernels as ak
from xoron_dist.model.common.norm import RMSNorm


def test_a_host_tensor_beside_an_accelerator_tensor_is_refused():
    """The first GPU run's failure (``fill_spans``, 80536f6): span offsets from a host ``arange`` compared
    with span lengths on the device. Made on the lengths' device, the same comparison runs and equals
    the CPU's."""
    lengths = torch.tensor([3, 1, 4])
    with standin_accelerator():
        on_device = lengths.to(ACCEL)
        with pytest.raises(DeviceMixError, match=r"aten\.[lg]t\.Tensor.*accel \(3, 1\), cpu \(1, 4\)"):
            _ = torch.arange(4)[None] < on_device[:, None]
        valid = torch.arange(4, device=on_device.device)[None] < on_device[:, None]
        assert isinstance(valid, OnAccel) and valid.device == ACCEL
        assert torch.equal(valid.cpu(), torch.arange(4)[None] < lengths[:, None])


def test_what_cuda_allows_across_devices_runs():
    """0-dim host tensors are scalars to any op, copies cross devices, and indexing takes host indices."""
    host = torch.arange(12.0).reshape(3, 4)
    with standin_accelerator():
        x = host.to(ACCEL)
        assert torch.equal((x * torch.tensor(2.0)).cpu(), host * 2)
        assert torch.equal(x[torch.tensor([2, 0])].cpu(), host[[2, 0]])
        y = torch.zeros(3, 4, device=ACCEL)
        y[torch.tensor([1])] = x[torch.tensor([0])]
        y.copy_(host)  # host -> device
        back = torch.empty(3, 4)
        back.copy_(y)  # device -> host
        assert torch.equal(back, host)
        assert x.sum().item() == host.sum().item() and x.tolist() == host.tolist() == torch.Tensor.tolist(x)
        with pytest.raises(TypeError, match="use .cpu"):
            x.numpy()
        with pytest.raises(DeviceMixError):
            torch.cat([x, host])


def test_generators_draw_on_their_own_device():
    with standin_accelerator():
        on_device = torch.Generator(device=ACCEL).manual_seed(7)
        assert on_device.device == ACCEL
        drawn = torch.randn(5, generator=on_device, device=ACCEL)
        with pytest.raises(DeviceMixError, match="generator on the host draws a tensor on the accelerator"):
            torch.randn(5, generator=torch.Generator().manual_seed(7), device=ACCEL)
        with pytest.raises(DeviceMixError, match="generator on the accelerator draws a tensor on the host"):
            torch.rand(5, generator=on_device)
        probs = torch.full((2, 4), 0.25, device=ACCEL)
        with pytest.raises(DeviceMixError, match="aten.multinomial"):
            torch.multinomial(probs, 1, generator=torch.Generator())
    assert torch.Generator is torch._C.Generator  # restored
    assert torch.equal(drawn.cpu(), torch.randn(5, generator=torch.Generator().manual_seed(7)))


def test_a_module_on_the_accelerator_computes_what_the_cpu_computes():
    """Forward, backward, an optimizer step, a dtype cast of the module (``param.data`` swaps), an op that
    changes its result's shape in place (``torch.stft`` transposes in place) and a lazy conjugate all match
    the CPU."""
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(8, 16), RMSNorm(16), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with standin_accelerator():
        dev = copy.deepcopy(cpu).to(ACCEL)
        assert all(isinstance(p, OnAccel) and isinstance(p, torch.nn.Parameter) for p in dev.parameters())
        for model, inputs in ((cpu, x), (dev, x.to(ACCEL))):
            model(inputs).square().sum().backward()
            torch.optim.AdamW(model.parameters(), lr=0.1).step()
        for a, b in zip(cpu.parameters(), dev.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad.cpu()) and torch.equal(a.detach(), b.detach().cpu())
        dev.to(torch.bfloat16)
        assert {p.dtype for p in dev.parameters()} == {torch.bfloat16}
        assert dev(x.to(ACCEL, torch.bfloat16)).dtype == torch.bfloat16
        wave = torch.randn(400)
        # a lazy conjugate (the pitch tracker's correlation): the wrapper holds its values, not a conj bit
        spectrum = torch.fft.rfft(wave[:64])
        on_device = torch.fft.rfft(wave[:64].to(ACCEL))
        assert torch.equal((on_device.conj() * on_device).cpu(), spectrum.conj() * spectrum)
        spec = torch.stft(wave.to(ACCEL), 64, window=torch.hann_window(64, device=ACCEL), return_complex=True)
        assert torch.equal(spec.abs().cpu(), torch.stft(wave, 64, window=torch.hann_window(64),
                                                         return_complex=True).abs())


def test_pinned_host_memory_is_emulated():
    host = torch.arange(6.0)
    with standin_accelerator():
        pinned = host.pin_memory()
        assert pinned.is_pinned() and not host.is_pinned()
        assert torch.equal(pinned.to(ACCEL, non_blocking=True).cpu(), host)


def test_attention_on_the_accelerator_takes_the_emulated_cuda_kernels():
    """The adapter sees the stand-in as CUDA: bf16 without a mask goes to the flash kernel (emulated), and its
    forward and backward match the CPU flash kernel's within bf16 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = ak.fused_attention(q, k, v, scale=32 ** -0.5, causal=True)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    called = []
    with standin_accelerator():
        flash = ak.CUDA_OPS.flash
        ak.CUDA_OPS = ak.CudaOps(lambda *a, **kw: (called.append("flash"), flash(*a, **kw))[1],
                                 ak.CUDA_OPS.flash_backward, ak.CUDA_OPS.efficient, ak.CUDA_OPS.efficient_backward)
        qd, kd, vd = (t.detach().to(ACCEL).requires_grad_() for t in (q, k, v))
        out_dev = ak.fused_attention(qd, kd, vd, scale=32 ** -0.5, causal=True)
        out_dev.float().square().sum().backward()
    assert called == ["flash"]
    torch.testing.assert_close(out_dev.cpu(), out, atol=2e-2, rtol=2e-2)
    for got, want in zip((qd.grad, kd.grad, vd.grad), grads, strict=True):
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=5e-2, rtol=5e-2)
    assert ak.CUDA_OPS.flash is torch.ops.aten._scaled_dot_product_flash_attention  # restored


def test_rms_norm_keeps_the_input_dtype_on_the_accelerator():
    """On the stand-in torch takes F.rms_norm's composite path (the device is neither CPU nor CUDA to it): fp32
    statistics, then a cast back to the input's dtype; the wrapper describes what it holds, and the values
    equal the CPU's."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with standin_accelerator():
        y = F.rms_norm(x.to(ACCEL), (8,), eps=1e-6)
        assert y.dtype == y.elem.dtype == torch.bfloat16
    assert torch.equal(y.cpu(), F.rms_norm(x, (8,), eps=1e-6))
