"""Count the device-to-host synchronisations a piece of code asks for, on any device (CPU included).

A GPU kernel launch returns at once; reading a value on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``, ``if t:``, ``torch.equal``) waits until everything queued before it has run, and
so do the ops whose output size depends on the values (``bincount``, ``nonzero``, boolean-mask indexing,
``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size``), and so does a tensor made
from host values straight on a device (``torch.tensor(values, device=...)``: on CUDA a copy followed by a
stream sync; ``upload`` makes the same tensor without one). ``HostSyncCounter``
counts those calls as Python makes them, so a CPU test can bound the syncs a GPU run would pay (on CUDA,
``torch.cuda.set_sync_debug_mode`` reports the same at run time).

    with HostSyncCounter() as syncs:
        model(x).sum().backward()
    assert syncs.total <= 1, syncs.calls

While a counter is open, those entry points (``torch.Tensor``'s methods and the ``torch.*`` functions) are
wrapped, process-wide: a ``TorchFunctionMode`` would miss everything Python runs inside ``backward`` (the
autograd engine runs a custom ``Function``'s backward and an activation checkpoint's recomputed forward
with no mode active), which is where the recompute of a checkpointed block asks again. A call made inside
a counted call (``Tensor.unique`` calling ``torch.unique``) counts once.

Not seen: syncs inside an op that do not show in its name or arguments (a kernel's own error check,
a copy between host and device with ``.to(...)``). Seen although no GPU would wait: reads of tensors kept
on the CPU, and ``torch.tensor(values, device=d)`` where ``d`` is the CPU on purpose (a CPU-only machine
cannot tell them apart; ``device="cpu"`` written out is not counted).

Ways not to ask, used across the model:

* ``upload(values, device=)``: host values onto the device through pinned memory, asynchronously;
* host copies: ``PackedBatch.to`` keeps a host copy of what the model reads on the host (spans, target
  flags, document ids: ``keep_host_copy``); ``on_host``/``host_list``/``host_copy`` read it,
  ``select_rows`` takes rows of such a tensor on both sides, ``prefix_mask`` makes a padding mask from host
  lengths with its copy;
* ``where_true(mask, count)``: the indices of a mask's True entries when their number is known on the
  host, instead of ``nonzero`` or a boolean-mask index;
* ``host_values()``: reads of host memory (a batch before its move, the trainer's own bookkeeping) that
  no counter should count.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# Reads of a value on the host (Tensor methods).
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
# Comparisons that answer with a Python bool (Tensor methods and torch functions).
_ANSWERS = ("equal", "allclose")
# Ops whose output shape depends on the values, so the host must see them before it can allocate
# (Tensor methods and torch functions).
_VALUE_SHAPED = ("bincount", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select")
# Tensors made from host values with a device given (torch functions): a blocking copy to the device.
_UPLOADS = ("tensor", "as_tensor")

_open: list[HostSyncCounter] = []  # the counters open now, outermost first
_lock = threading.Lock()
_local = threading.local()  # .depth: counted calls under way on this thread (a nested one is not counted)
_originals: dict[tuple[object, str], tuple[bool, Callable]] = {}  # (owner, name) -> (owner's own?, original)


class HostSyncCounter:
    """``calls``: a Counter of the syncing calls seen, by name; ``total``: their sum.

    ``where=True`` also fills ``sites``: the same calls by the first caller outside torch
    (``path:line name``), to tell which code asks for them."""

    def __init__(self, where: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.where = where

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __enter__(self) -> HostSyncCounter:
        with _lock:
            if not _open:
                _wrap_entry_points()
            _open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _open.remove(self)
            if not _open:
                _unwrap_entry_points()

    def _record(self, name: str, site: str | None) -> None:
        self.calls[name] += 1
        if self.where and site is not None:
            self.sites[f"{site} {name}"] += 1


def _which_sync(name: str, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """The sync a call to ``name`` asks for (None: this call asks for none)."""
    if name == "__getitem__":
        return "boolean-mask indexing" if _has_bool_mask(args[1:]) else None
    if name == "repeat_interleave":
        return name if kwargs.get("output_size") is None and _tensor_repeats(args, kwargs) else None
    if name in _UPLOADS:
        device = kwargs.get("device")  # keyword-only in both
        from_host = not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor)
        return "host-to-device copy" if from_host and device is not None and device != "cpu" else None
    return name


def _counted(name: str, original: Callable) -> Callable:
    def call(*args, **kwargs):
        depth = getattr(_local, "depth", 0)
        if depth == 0 and _open:
            seen = _which_sync(name, args, kwargs)
            if seen is not None:
                site = _caller() if any(c.where for c in _open) else None
                for counter in list(_open):
                    counter._record(seen, site)
        _local.depth = depth + 1
        try:
            return original(*args, **kwargs)
        finally:
            _local.depth = depth

    call.__name__ = getattr(original, "__name__", name)
    call.__doc__ = getattr(original, "__doc__", None)
    return call


def _entry_points() -> list[tuple[object, str]]:
    methods = [*_READS, *_ANSWERS, *_VALUE_SHAPED, "__getitem__", "repeat_interleave"]
    functions = [*_ANSWERS, *_VALUE_SHAPED, "repeat_interleave", *_UPLOADS]
    return [(torch.Tensor, n) for n in methods] + [(torch, n) for n in functions if hasattr(torch, n)]


def _wrap_entry_points() -> None:
    for owner, name in _entry_points():
        original = getattr(owner, name)
        _originals[(owner, name)] = (name in vars(owner), original)
        setattr(owner, name, _counted(name, original))


def _unwrap_entry_points() -> None:
    for (owner, name), (own, original) in _originals.items():
        if own:
            setattr(owner, name, original)
        else:  # inherited (Tensor's C methods): drop the wrapper, the base class's shows through again
            delattr(owner, name)
    _originals.clear()


def _caller() -> str:
    """``path:line`` of the innermost frame outside torch (and outside this module): from ``xoron_dist/`` for
    ours, from the package for an installed one (``deepspeed/runtime/...``), else the last two path parts."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and frame.f_code.co_filename != __file__:
            if "/site-packages/" in path:
                where = path.rsplit("/site-packages/", 1)[1]
            elif "/xoron_dist/" in path:
                where = "xoron_dist/" + path.rsplit("/xoron_dist/", 1)[1]
            else:
                where = "/".join(path.split("/")[-2:])
            return f"{where}:{frame.f_lineno}"
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


@contextmanager
def host_values() -> Iterator[None]:
    """Reads made inside are of tensors that are in host memory in every run (a batch before it moves to the
    device): no GPU waits for them, so no counter counts them."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1  # as inside a counted call: nested calls are not counted
    try:
        yield
    finally:
        _local.depth = depth


_HOST_COPY = "_xoron_host_copy"  # on a tensor: its values in host memory (True: it is in host memory itself)


def keep_host_copy(host: torch.Tensor, moved: torch.Tensor) -> None:
    """Let ``moved`` (``host`` moved to the device) be read by ``host_list`` without a sync: it keeps a copy
    of ``host`` (its own clone: not a view into the loader's buffers), or, when the move was no move (a CPU
    run), a mark that its own values are on the host. A tensor already on a device passes on the copy it
    keeps, if any (a batch moved twice)."""
    if host.device.type != "cpu":
        copy = host_copy(host)
        if copy is not None:
            setattr(moved, _HOST_COPY, copy)
        return
    setattr(moved, _HOST_COPY, True if moved is host else host.clone())


def host_copy(t: torch.Tensor) -> torch.Tensor | None:
    """The host copy ``t`` keeps (``keep_host_copy``; ``t`` itself when it is in host memory), or None. Read
    it inside ``host_values()``."""
    copy = getattr(t, _HOST_COPY, None)
    return t if copy is True else copy


def _host_copies(tensors: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None] | None:
    """The host copies ``tensors`` keep (a None stays None), or None when one of them keeps none."""
    copies = [None if t is None else host_copy(t) for t in tensors]
    return None if any(t is not None and c is None for t, c in zip(tensors, copies, strict=True)) else copies


def on_host(read: Callable[..., Any], *tensors: torch.Tensor | None,
            otherwise: Callable[[], Any] | None = None) -> Any:
    """``read(*tensors)`` made on the host copies the tensors keep (``keep_host_copy``; a None passes as
    None): no sync. If one of them keeps none: ``otherwise()``, a read of what the device already has, or
    by default ``read`` of the tensors themselves (``read`` must then be the same function of the values on
    either side)."""
    copies = _host_copies(tensors)
    if copies is None:
        return read(*tensors) if otherwise is None else otherwise()
    with host_values():
        return read(*copies)


def with_host_copy(make: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """``make(*tensors)``, keeping ``make`` of their host copies as its own host copy when they all keep one
    (a None passes as None): a mask derived from masks the host knows stays known there. ``make`` must make
    its tensors on its inputs' device."""
    made = make(*tensors)
    copies = _host_copies(tensors)
    if copies is None:
        return made
    if all(c is t for t, c in zip(tensors, copies, strict=True)):  # all in host memory: so is ``made``
        keep_host_copy(made, made)
    else:
        with host_values():
            keep_host_copy(make(*copies), made)
    return made


class TensorMemo:
    """A value derived from one tensor, kept until another tensor or a new version of that one comes
    (identity and ``_version``: an in-place write bumps it). Holding the tensor keeps its id from being
    reused. For host-side values worth computing once per tensor: a layout planned from ids, a step read."""

    def __init__(self) -> None:
        self._entry: tuple[torch.Tensor, int, Any] | None = None

    def get(self, tensor: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any:
        entry = self._entry
        if entry is None or entry[0] is not tensor or entry[1] != tensor._version:
            return self.put(tensor, make(tensor))
        return entry[2]

    def put(self, tensor: torch.Tensor, value: Any) -> Any:
        """Remember ``value`` for ``tensor`` as it is now (after an in-place update the caller made)."""
        self._entry = (tensor, tensor._version, value)
        return value


def read_together(values: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of ``values`` read on the host in one read (one sync where each ``.tolist()`` would be
    one): each comes back as its ``tolist()`` (a 0-dim tensor as a float), read as float64, so integer
    counts up to 2**53 are exact; a list of tensors (and Nones) comes back as a list of those. Anything else
    passes through. The tensors must be on one device."""
    def tensors_of(value: Any) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, list) and value and all(v is None or isinstance(v, torch.Tensor) for v in value):
            return [v for v in value if v is not None]
        return []

    everything = [t for value in values.values() for t in tensors_of(value)]
    if not everything:
        return dict(values)
    flat = torch.cat([t.detach().to(torch.float64).flatten() for t in everything]).tolist()
    offset = 0

    def take(t: torch.Tensor) -> Any:
        nonlocal offset
        part = flat[offset:offset + t.numel()]
        offset += t.numel()
        with host_values():
            return torch.tensor(part, dtype=torch.float64).view(t.shape).tolist()

    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = take(value)
        elif tensors_of(value):
            out[name] = [None if v is None else take(v) for v in value]
        else:
            out[name] = value
    return out


def host_list(t: torch.Tensor) -> list:
    """``t.tolist()`` from the host copy ``t`` keeps (``keep_host_copy``): no sync. Without one, a read of ``t``."""
    return on_host(torch.Tensor.tolist, t)


def mask_lengths(mask: torch.Tensor) -> list[int]:
    """The True count of each row of a padding mask (n, width), as ints, read on its host copy (``on_host``:
    no sync) when it keeps one (``prefix_mask``'s masks do)."""
    return on_host(lambda m: m.sum(1).tolist(), mask)


def prefix_mask(lengths: Sequence[int], width: int, device: torch.device | str) -> torch.Tensor:
    """(len(lengths), width) bool: row i True on its first ``lengths[i]`` entries. Made on the host from
    lengths the host knows and uploaded (``upload``) with its host copy, so ``on_host`` reads it for free."""
    host = torch.arange(width)[None] < torch.tensor(list(lengths), dtype=torch.long).view(-1, 1)
    return upload(host, device=device, keep_host=True)


def select_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]`` for rows known on the host, without a sync (a list index would be a blocking copy to the
    device), keeping ``t``'s host copy for the rows taken."""
    taken = t.index_select(0, upload(rows, dtype=torch.long, device=t.device))
    copy = host_copy(t)
    if copy is not None:
        keep_host_copy(copy[rows], taken)
    return taken


def where_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of ``mask``'s True entries, in order (``mask.flatten().nonzero()[:, 0]``), given how
    many there are (known on the host): the first ``count`` of a stable sort by "False", with no sync
    (``nonzero`` and boolean-mask indexing read their output size from the device)."""
    return (~mask.flatten()).to(torch.int8).argsort(stable=True)[:count]


def upload(values, *, device: torch.device | str, dtype: torch.dtype | None = None,
           keep_host: bool = False) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without making the host wait for the device.

    On an accelerator the values are staged in pinned host memory and copied asynchronously (torch keeps
    the pinned block until the copy has run), where ``torch.tensor(..., device=)`` copies and then waits
    for the stream to drain: everything queued before it. On the CPU it is the plain tensor. ``values`` may
    also be a tensor in host memory (then it is what moves, cast to ``dtype``). ``keep_host``: the tensor
    keeps its host copy (``host_list`` reads it without a sync)."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"upload moves host values to a device; this tensor is on {values.device} already")
        host = values if dtype is None else values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    moved = host if torch.device(device).type == "cpu" else host.pin_memory().to(device, non_blocking=True)
    if keep_host:
        keep_host_copy(host, moved)
    return moved


__all__ = ["HostSyncCounter", "host_copy", "host_list", "host_values", "keep_host_copy", "mask_lengths", "on_host",
           "prefix_mask", "read_together", "select_rows", "upload", "where_true", "with_host_copy"]
