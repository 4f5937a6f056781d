"""Count the device-to-host synchronisations a piece of code asks for, on any device (CPU included).

A GPU kernel launch returns at once; reading a value on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``, ``if t:``) waits until everything queued before it has run, and so do the ops
whose output size depends on the values (``bincount``, ``nonzero``, boolean-mask indexing,
``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size``). ``HostSyncCounter`` is
a ``TorchFunctionMode`` that counts those calls as Python makes them, so a CPU test can bound the
syncs a GPU run would pay (on CUDA, ``torch.cuda.set_sync_debug_mode`` reports the same at run time).

    with HostSyncCounter() as syncs:
        model(x).sum().backward()
    assert syncs.total <= 1, syncs.calls

Not seen: syncs inside an op that do not show in its name or arguments (a kernel's own error check,
a copy to the CPU with ``.to("cpu")``) and anything autograd runs in C++ during ``backward``.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Reads of a value on the host.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}
# Ops whose output shape depends on the values, so the host must see them before it can allocate.
_VALUE_SHAPED = {"bincount", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select"}


class HostSyncCounter(TorchFunctionMode):
    """``calls``: a Counter of the syncing calls seen, by name; ``total``: their sum.

    ``where=True`` also fills ``sites``: the same calls by the first caller outside torch
    (``package/module.py:line name``), to tell which code asks for them."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.where = where

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict[str, Any] | None = None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        seen = None
        if name in _READS or name in _VALUE_SHAPED:
            seen = name
        elif name == "__getitem__" and _has_bool_mask(args[1:]):
            seen = "boolean-mask indexing"
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and _tensor_repeats(args, kwargs):
            seen = "repeat_interleave"
        if seen is not None:
            self.calls[seen] += 1
            if self.where:
                self.sites[f"{_caller()} {seen}"] += 1
        return func(*args, **kwargs)


def _caller() -> str:
    """``package/module.py:line`` of the innermost frame outside torch (and outside this module)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and frame.f_code.co_filename != __file__:
            parts = path.split("/")
            return f"{'/'.join(parts[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "<torch>"


def _has_bool_mask(index: tuple) -> bool:
    items = index[0] if len(index) == 1 and isinstance(index[0], tuple) else index
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _tensor_repeats(args: tuple, kwargs: dict[str, Any]) -> bool:
    """repeat_interleave(input, repeats: Tensor) or repeat_interleave(repeats): the output size is data."""
    if "repeats" in kwargs:
        return isinstance(kwargs["repeats"], torch.Tensor)
    return len(args) == 1 or isinstance(args[1], torch.Tensor)


__all__ = ["HostSyncCounter"]
