"""Training noise that depends on the item and the optimizer step only, never on the layout.

A generator's training loss draws random numbers per item (flow-matching noise and time, a crop
of a clip). Drawn from one stream per rank, they would depend on which rank holds the item and
in which micro-batch, so a data-parallel step could not equal the single-rank step and a resumed
run would not repeat an uninterrupted one. Here each item draws from its own generator, seeded by
a hash of the item's content and the ``NoiseClock``'s step: the same item in the same optimizer
step gets the same numbers on any rank, in any micro-batch, after any resume (the step is a buffer,
so it travels in the checkpoint). ``StepRunner`` advances every clock after each optimizer step.

Nothing here waits for the device in a training step:

* the content key is computed from the host copy of the item when the batch moves to the device
  (``keep_content_keys``, called by ``PackedBatch.to``) and travels with the device tensor; an item
  without one (made on the device) is hashed from a read of its values;
* the step is kept on the host. The host copy is trusted only while the buffer is the same tensor at
  the same version (in-place writes bump the version): a checkpoint load, a reshard's ``copy_`` or a
  move to another device makes the next draw read the buffer once;
* the generators live on the item's device, so the draws are made there (no copy from the host). The
  same seed gives the same numbers on every rank of one kind of device; a CPU and a GPU (whose
  generator is another algorithm) draw different numbers from it. Host decisions (a crop's start)
  draw from ``host_random``.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence

import torch
from torch import nn

from xoron_dist.utils.host_syncs import TensorMemo, host_values

_SAMPLED_VALUES = 4096  # values of an item hashed (evenly strided): enough to tell real items apart
_KEY = "_xoron_content_key"  # the attribute a moved item carries its host copy's key in


def content_key(item: torch.Tensor) -> int:
    """A 63-bit hash of an item's shape and (up to ``_SAMPLED_VALUES`` evenly spaced) values."""
    known = getattr(item, _KEY, None)
    if known is not None:
        return known
    flat = item.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLED_VALUES)
    sample = flat[::stride].cpu().contiguous()
    digest = hashlib.blake2b(repr(tuple(item.shape)).encode() + sample.numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def keep_content_keys(host: Sequence[torch.Tensor], moved: Sequence[torch.Tensor]) -> None:
    """Give each moved item the content key of its host copy, so no draw for it reads the device."""
    for source, target in zip(host, moved, strict=True):
        if source.device.type == "cpu":
            with host_values():  # a read of host memory in every run
                setattr(target, _KEY, content_key(source))
        else:  # moved again: its key (or, without one, a read of the device)
            setattr(target, _KEY, content_key(source))


def blank_item(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero item (a generator's idle call) made on ``device`` with its content key (hashed on the host,
    once per shape and dtype)."""
    item = torch.zeros(shape, dtype=dtype, device=device)
    setattr(item, _KEY, _blank_key(tuple(shape), dtype))
    return item


@functools.lru_cache(maxsize=64)
def _blank_key(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    with host_values():  # a read of host memory in every run
        return content_key(torch.zeros(shape, dtype=dtype))


class NoiseClock(nn.Module):
    """The optimizer step the draws belong to (a buffer) and the per-item generators of that step."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host = TensorMemo()  # the buffer's value as last seen

    def advance(self) -> None:
        known = self._host_step()
        self.step += 1
        self._host.put(self.step, known + 1)

    def _host_step(self) -> int:
        """The step as a Python int, read from the device only when the buffer changed behind our back."""
        return self._host.get(self.step, int)

    def seed(self, item: torch.Tensor, salt: int = 0) -> int:
        """The 63-bit seed of ``item`` in this step (``salt`` separates independent uses of one item)."""
        text = f"{content_key(item)}/{self._host_step()}/{salt}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

    def generator(self, item: torch.Tensor, salt: int = 0) -> torch.Generator:
        """A generator on ``item``'s device, seeded for ``item`` in this step."""
        return torch.Generator(device=item.device).manual_seed(self.seed(item, salt))

    def host_random(self, item: torch.Tensor, salt: int = 0) -> random.Random:
        """Python's generator with the same seed, for choices the host makes (no tensor, nothing to read)."""
        return random.Random(self.seed(item, salt))

    def normal(self, items: list[torch.Tensor], shapes: list[tuple[int, ...]], salt: int = 0) -> list[torch.Tensor]:
        """Standard normal draws, one tensor of ``shapes[i]`` per item, on that item's device."""
        return [torch.randn(shape, generator=self.generator(item, salt), device=item.device)
                for item, shape in zip(items, shapes, strict=True)]

    def uniform(self, items: list[torch.Tensor], salt: int = 0) -> torch.Tensor:
        """One U[0, 1) number per item, (n,) on the items' device."""
        return torch.stack([torch.rand((), generator=self.generator(item, salt), device=item.device)
                            for item in items])


def advance_clocks(model: nn.Module) -> None:
    """Advance every ``NoiseClock`` of ``model`` (after an optimizer step)."""
    for module in model.modules():
        if isinstance(module, NoiseClock):
            module.advance()


__all__ = ["NoiseClock", "advance_clocks", "blank_item", "content_key", "keep_content_keys"]
