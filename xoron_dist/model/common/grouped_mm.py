"""The experts' grouped GEMM: ``torch._grouped_mm`` where its layout rules hold, traceable by ``torch.compile``.

``grouped_mm(a, b, offs)`` multiplies each group's rows of ``a`` by that group's matrix of ``b``:

    a (rows, K) sorted by group, b (groups, K, N), offs (groups,) int32 ends  ->  (rows, N)
    a (K, rows), b (rows, N) grouped along rows (the weight gradient)         ->  (groups, K, N)

``offs`` stays on the device (no host sync). ``fits(a, *bs)`` says whether the kernel takes the operands:
bf16 (CPU, and CUDA on compute capability 9.x/10.x) or fp32 (CPU only), every non-unit stride, every output
row and every data pointer a multiple of 16 bytes; where it does not, ``RoutedExperts`` runs its per-expert
loop instead (one host read of the group sizes per layer). On other GPUs (A100's 8.0, 8.9, 12.x) torch has
no grouped kernel: ``torch._grouped_mm`` there copies ``offs`` to the host on every call and loops, six
hidden syncs per MoE layer per step (two calls forward, four backward), so ``fits`` sends those to the loop.

Why not ``torch._grouped_mm`` alone: eager, it is what runs (its C++ autograd included). Under
``torch.compile`` its fake (meta) kernel refuses fp32, the CPU's training dtype, and a data pointer cannot
be read while tracing. So a compiled caller gets ``xoron::grouped_mm``, a custom op around the same kernel
with its own fake (output shapes only) and a backward made of the same op (grad a = grad @ bᵀ per group,
grad b = aᵀ @ grad per group). The routed experts then compile inside their decoder block
(``train.compile``) instead of breaking its graph in two; the op checks the pointers when it runs and
copies an operand that is not 16-byte aligned (inductor may hand it a view at an offset).
"""

from __future__ import annotations

import torch

_KERNEL_DTYPES = {torch.bfloat16: ("cpu", "cuda"), torch.float32: ("cpu",)}
_ALIGN = 16  # bytes: torch._grouped_mm's TMA/layout rule for strides, output rows and base pointers
# CUDA compute capabilities (major) with torch's CUTLASS grouped kernel (sm90, sm100); others fall back
_CUDA_KERNEL_MAJORS = (9, 10)


def has_kernel(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` has a grouped kernel on ``device`` (not a per-group loop behind a host sync)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device)[0] in _CUDA_KERNEL_MAJORS


def fits(a: torch.Tensor, *bs: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``a`` with each of ``bs`` (the 3-D ``(groups, K, N)`` form).

    The strides and widths are checked always; the data pointers only outside a ``torch.compile`` trace,
    where they exist (inside one, ``xoron::grouped_mm`` re-aligns its operands when it runs)."""
    if a.device.type not in _KERNEL_DTYPES.get(a.dtype, ()) or any(b.dtype != a.dtype for b in bs):
        return False
    if not has_kernel(a.device):
        return False
    size = a.element_size()
    operands = (a, *bs)
    if any(st * size % _ALIGN for t in operands for st in t.stride() if st != 1):
        return False
    if any(b.shape[-1] * size % _ALIGN for b in bs):  # the output's row stride
        return False
    return torch.compiler.is_compiling() or all(t.data_ptr() % _ALIGN == 0 for t in operands)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)``; compiled callers trace ``xoron::grouped_mm`` instead."""
    if torch.compiler.is_compiling():
        return torch.ops.xoron.grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % _ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("xoron::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(_aligned(a), _aligned(b), offs=offs)


@_grouped_mm_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (rows, K) x (groups, K, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # (K, rows) x (rows, N) -> (groups, K, N)


def _setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    a, b, offs = inputs
    if b.dim() != 3:
        ctx.mark_non_differentiable(output)  # the weight-gradient form is only ever called in a backward
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = torch.ops.xoron.grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = torch.ops.xoron.grouped_mm(a.transpose(0, 1), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)

__all__ = ["fits", "grouped_mm", "has_kernel"]
