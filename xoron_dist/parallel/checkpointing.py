"""Activation checkpointing: chosen blocks recompute their forward in backward instead of keeping
their activations (torch's non-reentrant ``checkpoint``).

``apply_activation_checkpointing(model, block_types, every)`` wraps the ``forward`` of every
``every``-th block of the given types (1 = all: the most memory saved; 2 = half of them, for less
recompute; the index counts blocks of one type in module order). A wrapped block checkpoints only
while training with gradients; decoding (a KV cache, ``no_grad``) runs it plainly. The block
stays where it is, under its name, so parameter names and checkpoints do not change.

Host reads are not repeated by the recompute. A block that must read the device to go on (the expert
exchange's row counts, the ring's tile plan) asks through ``host_read(read, witness)``: the forward
runs ``read`` and keeps its value on the block's tape, and the recompute takes the value from the tape
instead of reading again (and skips the collective ``read`` may hold; every rank replays alike). The
recompute is the same computation on the same inputs with the same RNG state, so its values match;
``witness``, a small device tensor the value was derived from, is compared with the forward's on the
device (``torch._assert_async``: no host sync), so a recompute that routed differently stops the run
instead of training on a mismatched exchange. A checkpoint traced by ``torch.compile`` from outside (a
whole model compiled) runs without a tape, since a compiled checkpoint refuses the side effect, and its
recompute reads again; ``train.compile`` compiles inside the checkpoint instead (``train/compile.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

T = TypeVar("T")

_local = threading.local()  # .tapes: the tapes of the checkpointed calls running on this thread, innermost last


class _HostTape:
    """The host values one checkpointed call read in its forward, in order, for its recompute(s)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.entries: list[tuple[object, torch.Tensor]] = []
        self.calls = 0  # 1: the forward (records); 2 and on: recomputes (replay from the start)
        self.position = 0

    def running(self, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            self.calls += 1
            self.position = 0
            tapes = _tapes()
            tapes.append(self)
            try:
                return fn(*args, **kwargs)
            finally:  # also when the recompute stops early (torch raises to end it once it has what it needs)
                tapes.pop()

        return run

    def read(self, read: Callable[[], T], witness: torch.Tensor) -> T:
        if self.calls == 1:
            value = read()
            self.entries.append((value, witness.detach().clone()))
            return value
        if self.position >= len(self.entries):
            raise RuntimeError(f"the recompute of checkpointed {self.where} asked for host read "
                               f"{self.position + 1}, but its forward made only {len(self.entries)}: the "
                               "block's forward must take the same path when it is run again")
        value, recorded = self.entries[self.position]
        self.position += 1
        if witness.shape != recorded.shape:
            raise RuntimeError(f"the recompute of checkpointed {self.where} reached host read {self.position} "
                               f"with a witness of shape {tuple(witness.shape)}; its forward had "
                               f"{tuple(recorded.shape)}")
        torch._assert_async((witness == recorded).all(),
                            f"the recompute of checkpointed {self.where} differs from its forward at host read "
                            f"{self.position} (for example, tokens routed to other experts): its recorded values "
                            "would not fit. Recompute must repeat the forward exactly; turn off activation "
                            "checkpointing for this block to run with a nondeterministic forward")
        return value


def _tapes() -> list[_HostTape]:
    if not hasattr(_local, "tapes"):
        _local.tapes = []
    return _local.tapes


def host_read(read: Callable[[], T], witness: torch.Tensor) -> T:
    """``read()``, once per checkpointed call: inside a checkpointed block's recompute, the value its
    forward read (checked against ``witness``, a device tensor the value follows from). Outside a
    checkpointed block (no checkpointing, decoding, evaluation) it is just ``read()``."""
    tapes = _tapes()
    return tapes[-1].read(read, witness) if tapes else read()


class _CheckpointedForward:
    """A block's ``forward`` run under ``checkpoint`` while its module trains with gradients."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner: Callable = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # a compiled checkpoint refuses the tape's side effects
                return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
            tape = _HostTape(type(self.module).__name__)
            return checkpoint(tape.running(self.inner), *args, use_reentrant=False, **kwargs)
        return self.inner(*args, **kwargs)


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type, ...], every: int = 1) -> int:
    """Checkpoint every ``every``-th block of ``block_types`` in ``model``; returns how many blocks."""
    if every < 1:
        raise ValueError(f"every = {every}: checkpoint every n-th block needs n >= 1")
    wrapped = 0
    seen: dict[type, int] = {}
    for module in model.modules():
        kind = next((t for t in block_types if isinstance(module, t)), None)
        if kind is None:
            continue
        index = seen.get(kind, 0)
        seen[kind] = index + 1
        if index % every == 0 and not isinstance(module.forward, _CheckpointedForward):
            module.forward = _CheckpointedForward(module)
            wrapped += 1
    return wrapped


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)
