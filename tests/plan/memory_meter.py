"""The peak of live tensor memory in one process, measured on any device (CPU included).

``torch.cuda.max_memory_allocated`` exists only on GPUs. ``LiveTensorMeter`` measures the same
quantity on CPU: the bytes of every tensor storage alive at once.

* On entry it finds every storage that already exists (the model's weights, the optimizer's
  states, DeepSpeed's flat buffers: every ``torch.Tensor`` the garbage collector knows), counts
  each once (views share a storage), and watches each with a finalizer.
* While active it is a ``TorchDispatchMode``: every ATen op's outputs are seen (forward,
  backward, the optimizer, DeepSpeed's flatten/partition copies), new storages are added and a
  finalizer subtracts them when they die; ``UntypedStorage.resize_`` (which ZeRO-3 uses to free
  and re-gather partitions, and which bypasses dispatch) is patched to count size changes.
* ``peak`` is the largest total seen, ``baseline`` the total on entry.

Storages that never pass through a Python tensor or a dispatched op (allocator caches, gloo's
internal buffers, Python objects) are not tensors and are not counted, as on a GPU.
"""

from __future__ import annotations

import gc
import weakref
from functools import wraps

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class LiveTensorMeter(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        self.baseline = 0

    # ------------------------------------------------------------------ bookkeeping

    def _watch(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._forget(key))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _forget(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._sizes:
            new = storage.nbytes()
            self.current += new - self._sizes[key]
            self._sizes[key] = new
            self.peak = max(self.peak, self.current)
        else:
            self._watch(storage)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse/nested tensors: none here
            return
        self._watch(storage)

    # ------------------------------------------------------------------ mode

    def __enter__(self) -> LiveTensorMeter:
        gc.collect()
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                self._track(obj)
                if obj.grad is not None if isinstance(obj, torch.nn.Parameter) else False:
                    self._track(obj.grad)
        self.baseline = self.current
        self.peak = self.current
        original = torch.UntypedStorage.resize_
        self._original_resize = original

        @wraps(original)
        def resize_(storage, size):
            result = original(storage, size)
            self._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.UntypedStorage.resize_ = self._original_resize
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out
