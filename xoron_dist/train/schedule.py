"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

Step ``s`` is the index of the optimizer update about to be taken (0 for the first
update), i.e. the number of updates already applied. With ``W = warmup_steps``,
``T = steps``, ``lr_max = lr`` and ``lr_min = min_lr_ratio * lr``:

    s < W        lr(s) = lr_max * (s + 1) / W                        (linear warmup)
    W <= s < T   lr(s) = lr_min + (lr_max - lr_min) * (1 + cos(pi * (s - W) / (T - W))) / 2
    s >= T       lr(s) = lr_min

Warmup starts at ``lr_max / W`` rather than 0: an update with lr 0 changes nothing
but Adam's moments, so step 0 would be wasted; with ``+1`` the last warmup update
(``s = W - 1``) already runs at ``lr_max``, and the cosine (also ``lr_max`` at
``s = W``) takes over without a jump. ``W = 0`` means no warmup. The cosine reaches
``lr_min`` at ``s = T``, one past the final update ``T - 1`` (nanoGPT's convention);
if ``W >= T`` the whole run is warmup.

A curriculum stage with its own ``steps`` / ``lr`` uses the same formula with a
``TrainConfig`` whose fields are replaced: ``dataclasses.replace(cfg.train,
steps=stage.steps, lr=stage.lr or cfg.train.lr)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from xoron_dist.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """The learning rate of update ``step`` (0-based) under ``train``'s schedule (see module docstring)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = train.lr
    floor = train.min_lr_ratio * peak
    warmup = train.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= train.steps:
        return floor
    progress = (step - warmup) / (train.steps - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``lr_at`` as a torch scheduler: DeepSpeed steps it once per optimizer update and checkpoints it.

    Each param group's lr is its initial lr times ``lr_at(step) / train.lr``, so groups
    configured with a different base lr keep their ratio. Pass a factory to DeepSpeed,
    which builds the optimizer itself from the JSON config:

        deepspeed.initialize(..., lr_scheduler=WarmupCosineSchedule.factory(cfg.train))

    DeepSpeed does not step the scheduler on an update it skipped for an fp16 overflow,
    so ``last_epoch`` counts applied updates.

    On load only the step count is restored; lr, warmup and steps come from the current
    config, so a resumed run may change them (for example to extend the run).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, last_epoch: int = -1) -> None:
        self.train = train
        # A plain function, not a callable object: LambdaLR would store an object's
        # __dict__ in state_dict() and restore it over the current config on load.
        peak = train.lr

        def lr_factor(step: int) -> float:
            return lr_at(step, train) / peak

        super().__init__(optimizer, lr_lambda=lr_factor, last_epoch=last_epoch)

    @classmethod
    def factory(cls, train: TrainConfig) -> Callable[[torch.optim.Optimizer], WarmupCosineSchedule]:
        """A callable DeepSpeed accepts as ``lr_scheduler=``; it receives the optimizer DeepSpeed built."""

        def build(optimizer: torch.optim.Optimizer) -> WarmupCosineSchedule:
            return cls(optimizer, train)

        return build

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self.apply()

    def apply(self) -> None:
        """Write the lr of the current step into the optimizer's param groups.

        Needed after a checkpoint load: DeepSpeed restores the optimizer's param groups
        (with the lr in force when it saved) after the scheduler.
        """
        lrs = [base * lr_at(self.last_epoch, self.train) / self.train.lr for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs
