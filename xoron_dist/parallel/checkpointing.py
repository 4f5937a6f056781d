"""Activation checkpointing: chosen blocks recompute their forward in backward instead of keeping
their activations (torch's non-reentrant ``checkpoint``).

``apply_activation_checkpointing(model, block_types, every)`` wraps the ``forward`` of every
``every``-th block of the given types (1 = all: the most memory saved; 2 = half of them, for less
recompute; the index counts blocks of one type in module order). A wrapped block checkpoints only
while training with gradients; decoding (a KV cache, ``no_grad``) runs it plainly. The block
stays where it is, under its name, so parameter names and checkpoints do not change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _CheckpointedForward:
    """A block's ``forward`` run under ``checkpoint`` while its module trains with gradients."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner: Callable = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
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
