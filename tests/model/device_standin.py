"""A stand-in accelerator on CPU: tensors that live on another device, so a CPU test sees device mixes.

The first GPU run died on a device mix no CPU test could see (``fill_spans`` compared a CPU ``arange``
with CUDA span lengths): on a CPU machine every tensor is on the one device. Inside
``standin_accelerator()`` the device it yields (``ACCEL``) is a second device that computes on the CPU:

* a tensor on ``ACCEL`` is an ``OnAccel`` wrapper around a CPU tensor that reports ``device == ACCEL``
  (the ``meta`` device type: the one device besides ``cpu`` that a CPU build of torch can place an
  autograd graph on). ``.to(ACCEL)``, ``module.to(ACCEL)`` and factories given ``device=ACCEL`` make
  them; ``.cpu()`` / ``.to("cpu")`` bring them back; ``.item()`` and ``.tolist()`` read them (host syncs,
  as on a GPU); ``.numpy()`` refuses, as on a GPU;
* every ATen op (forward and backward) runs on the CPU tensors inside, after the check CUDA makes: an
  op that mixes ``ACCEL`` tensors with CPU tensors of one or more dimensions raises ``DeviceMixError``
  naming the op and the shapes. CUDA's exceptions are kept: a 0-dim CPU tensor is a scalar to any op,
  copies cross devices, and ``index`` / ``index_put_`` take CPU indices;
* a ``torch.Generator(device=ACCEL)`` is a CPU generator that remembers its device: a draw with a
  generator of the other device raises, as CUDA's "expected a 'cuda' generator" does;
* ``pin_memory()`` gives a page-locked stand-in (a copy that ``is_pinned()``), so the host-to-device
  paths that pin on a GPU run;
* collectives (c10d's ops) check their buffers like any op and run on gloo with the CPU tensors inside;
  ``dist.batch_isend_irecv``, which looks up a backend by device before dispatching, is handed them too;
* the attention-kernel adapter sees ``ACCEL`` as CUDA and calls the emulated CUDA kernels
  (``tests/model/cuda_sdpa_emulator.py``), so its CUDA branch runs with device-placed inputs; the routed
  experts take the grouped GEMM by an H100's rule (bf16 only), else their per-expert loop.

Code that branches on ``device.type == "cuda"`` elsewhere (the loader's ``pin_memory``, the metrics' peak
FLOP/s) sees ``meta`` and takes its other branch: callers that want the CUDA branch ask for it (the
placement tests pin their batches themselves). ``torch.inference_mode`` runs as ``no_grad`` inside (a
wrapper cannot be an inference tensor), and a lazy conjugate or negation is materialised (a wrapper
carries no conj bit). It checks where tensors live, not speed: the results equal the CPU run's up to the
emulated attention kernels' fp64 math, which the tests check; every op checks that each wrapper
describes the tensor it holds (dtype, shape).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ACCEL = torch.device("meta")
_aten = torch.ops.aten
# ops whose tensors may sit on different devices on CUDA (beyond 0-dim CPU scalars, allowed everywhere)
_CROSS_DEVICE = {_aten.copy_.default, _aten._to_copy.default, _aten.copy.default, _aten._copy_from.default,
                 _aten.lift_fresh.default}
_LAZY_VIEWS = {_aten._conj.default, _aten._neg_view.default}
_CPU_INDICES = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                _aten._index_put_impl_.default}


class DeviceMixError(RuntimeError):
    """An op got tensors on the accelerator and on the host (CUDA: 'Expected all tensors to be on the same
    device')."""


class OnAccel(torch.Tensor):
    """A tensor on ``ACCEL``: the CPU tensor ``elem`` behind a wrapper that reports the other device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnAccel:
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=ACCEL,
                                                   requires_grad=elem.requires_grad, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset())
        out.elem = elem
        return out

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:  # ``module.to(dtype)`` sets ``param.data``: keep elem in step
        if not isinstance(new, OnAccel):
            raise DeviceMixError(f"a tensor on the accelerator given .data on the host {tuple(new.shape)}")
        torch.Tensor.data.__set__(self, new)
        self.elem = new.elem

    def numpy(self, *, force: bool = False):
        raise TypeError("can't convert a tensor on the accelerator to numpy (CUDA: 'can't convert cuda:0 device type "
                        "tensor to numpy'); use .cpu() first")

    def tolist(self):  # a device read (a host sync on a GPU); torch refuses tolist on wrapper subclasses
        return self.elem.tolist()

    def __repr__(self) -> str:
        return f"OnAccel({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class StandInGenerator(torch.Generator):
    """``torch.Generator(device=...)`` inside the stand-in: a CPU generator that remembers its device."""

    def __new__(cls, device: torch.device | str = "cpu") -> StandInGenerator:
        gen = super().__new__(cls, "cpu")
        gen.on_accel = torch.device(device).type == ACCEL.type
        return gen

    def __init__(self, device: torch.device | str = "cpu") -> None:
        pass

    @property
    def device(self) -> torch.device:
        return ACCEL if self.on_accel else torch.device("cpu")


_local = threading.local()  # the device of the generator of the torch call being dispatched


def _unwrap(x):
    return x.elem if isinstance(x, OnAccel) else x


def _leaves(x) -> list:
    """The leaves of an op's arguments or results (tuples, lists, dicts of tensors and scalars): torch's pytree
    does the same at several times the cost, most of the stand-in's own time."""
    if isinstance(x, list | tuple):
        return [leaf for item in x for leaf in _leaves(item)]
    if isinstance(x, dict):
        return [leaf for item in x.values() for leaf in _leaves(item)]
    return [x]


def _map(fn, x):
    if isinstance(x, list | tuple):
        return type(x)(_map(fn, item) for item in x)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _where(t: torch.Tensor) -> str:
    return f"{'accel' if isinstance(t, OnAccel) else 'cpu'} {tuple(t.shape)}"


def _check_mix(func, args, tensors: list[torch.Tensor]) -> None:
    on = [t for t in tensors if isinstance(t, OnAccel)]
    if not on:
        return
    host = [t for t in tensors if not isinstance(t, OnAccel) and t.dim() > 0]
    if func in _CPU_INDICES:  # indices may stay on the host; self and values may not
        flat_indices = _leaves(args[1])
        host = [t for t in host if not any(t is i for i in flat_indices)]
    if host:
        raise DeviceMixError(f"{func}: tensors on the accelerator and on the host in one op "
                             f"({', '.join(_where(t) for t in tensors)}); make the host ones on the "
                             "accelerator (device=...) or move them there first")


def _run(func, args, kwargs):
    if func is _aten._pin_memory.default:
        pinned = args[0].clone()
        pinned.standin_pinned = True
        return pinned
    if func is _aten.is_pinned.default:
        return getattr(args[0], "standin_pinned", False)
    tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    for t in tensors:  # the stand-in's own invariant: a wrapper describes the tensor it holds
        if isinstance(t, OnAccel) and (t.dtype != t.elem.dtype or t.shape != t.elem.shape):
            raise AssertionError(f"{func}: a stand-in tensor says {t.dtype} {tuple(t.shape)} but holds "
                                 f"{t.elem.dtype} {tuple(t.elem.shape)}")
    if func not in _CROSS_DEVICE:
        _check_mix(func, args, tensors)
    to_accel = any(isinstance(t, OnAccel) for t in tensors)
    if kwargs.get("device") is not None:
        to_accel = torch.device(kwargs["device"]).type == ACCEL.type
        kwargs = {**kwargs, "device": torch.device("cpu")}
    if kwargs.get("generator") is not None:
        gen_on_accel = getattr(_local, "generator_on_accel", False)
        if gen_on_accel != to_accel:
            raise DeviceMixError(f"{func}: a generator on {'the accelerator' if gen_on_accel else 'the host'} "
                                 f"draws a tensor on {'the accelerator' if to_accel else 'the host'}; make the "
                                 "generator on the tensor's device (torch.Generator(device=...))")
    out = func(*_map(_unwrap, args), **_map(_unwrap, kwargs))
    if func in _LAZY_VIEWS and to_accel:  # a wrapper carries no conj/neg bit: it holds the values instead
        return OnAccel(out.resolve_conj().resolve_neg())
    if args and isinstance(args[0], OnAccel) and out is args[0].elem:  # in place: the wrapper is the result
        _follow_metadata(args[0])
        return args[0]
    if not to_accel:
        return out
    return _map(lambda t: OnAccel(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnAccel) else t, out)


def _follow_metadata(wrapper: OnAccel) -> None:
    """After an in-place op: the wrapper takes the shape and strides the op gave its CPU tensor (``transpose_``,
    ``resize_``, ...; ``torch.stft`` transposes its result in place). The wrapper is a meta tensor, whose own
    kernels change metadata alone."""
    elem = wrapper.elem
    if wrapper.shape != elem.shape or wrapper.stride() != elem.stride():
        with torch._C._DisableTorchDispatch():
            _aten.as_strided_.default(wrapper, elem.shape, elem.stride(), elem.storage_offset())


class _DispatchCheck(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


class _TorchCalls(TorchFunctionMode):
    """What the dispatcher cannot see: the device of the ``generator`` a torch call was given (it sees a plain
    CPU generator), and ``torch.tensor(data, device=ACCEL)`` (built below the dispatcher, on the real meta
    device: no data), which is built on the CPU and wrapped here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA and kwargs.get("device") is not None and torch.device(kwargs["device"]) == ACCEL:
            return OnAccel(func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.tolist and isinstance(args[0], OnAccel):  # also called unbound: Tensor.tolist(t)
            return args[0].elem.tolist()
        gen = kwargs.get("generator")
        before = getattr(_local, "generator_on_accel", False)
        _local.generator_on_accel = bool(getattr(gen, "on_accel", False)) if gen is not None else before
        try:
            return func(*args, **kwargs)
        finally:
            _local.generator_on_accel = before


def _no_grad_for_inference(mode: bool = True):
    """``torch.inference_mode`` inside the stand-in: wrapper tensors cannot be inference tensors (torch refuses
    their views' version counters), so decoding runs under ``no_grad``, the same computation."""
    return torch.no_grad() if mode else contextlib.nullcontext()


@contextlib.contextmanager
def standin_accelerator() -> Iterator[torch.device]:
    """Run the body with ``ACCEL`` as a second device (see the module docstring); yields ``ACCEL``."""
    import xoron_dist.model.common.attention_kernels as ak
    from tests.model import cuda_sdpa_emulator as emu
    from xoron_dist.model.common import grouped_mm

    cpu_fits, batch_isend_irecv = grouped_mm.fits, dist.batch_isend_irecv

    def fits(a: torch.Tensor, *bs: torch.Tensor) -> bool:  # an H100's rule: the grouped kernel in bf16 only
        if not isinstance(a, OnAccel):
            return cpu_fits(a, *bs)
        return a.dtype == torch.bfloat16 and cpu_fits(a.elem, *(_unwrap(b) for b in bs))

    def host_p2p(ops: list) -> list:  # the process group has a backend for cpu only: pass the CPU tensors
        return batch_isend_irecv([dist.P2POp(op.op, _unwrap(op.tensor), op.peer, op.group, op.tag) for op in ops])

    patches = [(torch, "Generator", StandInGenerator), (torch, "inference_mode", _no_grad_for_inference),
               (ak, "_device_type", lambda t: "cuda" if t.device.type == ACCEL.type else t.device.type),
               (ak, "CUDA_OPS", emu.EMULATED_CUDA_OPS), (grouped_mm, "fits", fits),
               (dist, "batch_isend_irecv", host_p2p)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        with _TorchCalls(), _DispatchCheck():
            yield ACCEL
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


__all__ = ["ACCEL", "DeviceMixError", "OnAccel", "StandInGenerator", "standin_accelerator"]
