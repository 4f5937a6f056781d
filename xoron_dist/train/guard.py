"""The numerics guard: a step with a non-finite loss or gradient never changes the weights, and a
run that keeps producing them (or whose loss spikes) rolls back or stops, as configured.

Megatron checks the loss for NaN on every step by default; we check the loss and the gradient norm
on every rank and agree with one all-reduced flag per step: the flags are made on the device, the
trainer's stop-signal all-reduce carries them and the step's one host read reads them
(``readout.py``), so the check adds no host synchronisation.

Who keeps a non-finite update out of the weights (checked by ``tests/train/test_guard.py``, fp32,
DeepSpeed 0.19 on CPU):

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ZeRO-3: an invalid gradient norm marks the step as an
  overflow; DeepSpeed drops the gradients, skips the optimizer and the LR schedule, and counts it
  in ``engine.skipped_steps`` (fp16 and bf16 check overflow themselves as well).
- ZeRO-0: DeepSpeed hands the gradients to the plain torch optimizer, clipping with a NaN norm
  turns them all NaN, and the step writes NaN into every weight. ``install_update_gate`` wraps
  that optimizer's ``step``: the gradients' finiteness is all-reduced (one flag: DeepSpeed's own
  ZeRO stages take the same all-reduce and host read for their overflow check) and a non-finite
  step is dropped; the gate sets the optimizer's ``overflow``, which the engine reads, so the
  skip is counted and the LR schedule waits, exactly as with the ZeRO stages.

A skipped step consumes its batches (the data position moves on) and changes nothing else: not
the weights, the optimizer, the LR schedule, the expert biases or the codebooks.

Divergence: more than ``train.max_skipped_steps`` skipped steps in a row, or (``loss_spike_factor``
> 1) a loss above that factor times the mean of the last ``loss_spike_window`` losses. Then
``nonfinite_policy`` decides: ``rollback`` reloads the newest checkpoint saved before the trouble
began and skips every batch from there to the diverging step; ``skip`` and ``stop`` (which counts
even the first non-finite step as divergence) raise ``TrainingDiverged``: exit status 4.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from xoron_dist.config import TrainConfig
from xoron_dist.train.checkpoint import complete_tags, newest_verified

logger = logging.getLogger(__name__)

DIVERGED_EXIT_STATUS = 4


class TrainingDiverged(RuntimeError):
    """The run diverged and the policy says stop (or no rollback is possible); exit status 4."""


@dataclass
class Divergence:
    """Why the run diverged, and from which step the trouble began (a rollback goes to before it)."""

    reason: str
    first_bad_step: int
    step: int


class NumericsGuard:
    """Judges each step from its losses, gradient norm and whether the engine applied it.

    ``local_flags`` (this rank's view) -> all-reduced by the trainer -> ``record`` (every rank
    the same), which returns a ``Divergence`` when the policy's limit is reached.
    """

    def __init__(self, train: TrainConfig, *, fp16: bool) -> None:
        self.policy = train.nonfinite_policy
        self.max_skipped = 0 if self.policy == "stop" else train.max_skipped_steps
        self.spike_factor = train.loss_spike_factor
        self.fp16 = fp16
        self.streak = 0
        self.first_bad_step: int | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=train.loss_spike_window)
        self._spike_mean: float | None = None  # the mean the last ``local_flags`` compared the loss with

    @property
    def healthy(self) -> bool:
        """No skipped step since the last applied one: the state is fit to become a rollback target."""
        return self.streak == 0

    def local_flags(self, losses: dict[str, torch.Tensor | float], grad_norm: torch.Tensor | float | None,
                    engine_skipped: bool) -> torch.Tensor:
        """(non-finite, spike) as this rank sees the step: 0/1 in a float32 (2,) tensor on the losses'
        device, made without reading it (the trainer all-reduces the flags and reads them with the step's
        other values). ``losses``: each objective's mean over the step, device 0-dim tensors or floats."""
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses.values()])
        nonfinite = ~torch.isfinite(values).all()
        if not self.fp16:
            # fp16: the loss scaler skips overflowing steps and lowers the scale (routine, not divergence)
            if grad_norm is not None:
                norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(values.device)
                nonfinite = nonfinite | ~torch.isfinite(norm)
            nonfinite = nonfinite | engine_skipped
        spike = torch.zeros((), dtype=torch.bool, device=values.device)
        self._spike_mean = None
        if self.spike_factor > 0 and len(self._recent) == self._recent.maxlen:
            self._spike_mean = sum(self._recent) / len(self._recent)
            loss = values[list(losses).index("lm")] if "lm" in losses else values[0]
            spike = ~nonfinite & (loss > self.spike_factor * self._spike_mean)
        return torch.stack([nonfinite, spike]).float()

    def record(self, step: int, losses: dict[str, float], nonfinite: bool, spike: bool) -> Divergence | None:
        """Take the agreed verdict of ``step``; a ``Divergence`` when the run has diverged."""
        if nonfinite:
            self.streak += 1
            self.first_bad_step = self.first_bad_step or step
            logger.warning("step %d: non-finite loss or gradients; the update is skipped (%d in a row)",
                           step, self.streak)
            if self.streak > self.max_skipped:
                where = (f"step {step}" if self.streak == 1
                         else f"{self.streak} steps in a row ({self.first_bad_step}..{step})")
                return Divergence(f"non-finite loss or gradients at {where}", self.first_bad_step, step)
            return None
        if spike:
            loss = losses.get("lm", next(iter(losses.values()), 0.0))
            seen = (f"loss {loss:.4g} > {self.spike_factor:g} x {self._spike_mean:.4g}, the mean of the last "
                    f"{len(self._recent)} steps") if self._spike_mean is not None else "on another rank"
            return Divergence(f"loss spike at step {step} ({seen})", step, step)
        self.streak, self.first_bad_step = 0, None
        self._recent.append(losses.get("lm", next(iter(losses.values()), 0.0)))
        return None

    def reset(self) -> None:
        """After a rollback: the trouble is behind us and the loss history restarts."""
        self.streak, self.first_bad_step = 0, None
        self._recent.clear()


def install_update_gate(engine) -> bool:
    """Keep non-finite gradients out of the weights where DeepSpeed does not (ZeRO-0); True if installed."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):
        return False  # DeepSpeed's ZeRO, fp16 and bf16 optimizers check and skip themselves
    real_step = optimizer.step
    device = next(engine.module.parameters()).device

    def gated_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        bad = (~torch.isfinite(norm)).float().reshape(1).to(device)
        dist.all_reduce(bad)  # every rank drops the step, or none
        optimizer.overflow = bool(bad.item())  # read by the engine: skipped_steps += 1, no LR step
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return real_step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = gated_step
    return True


def rollback_tag(ckpt_root: Path, divergence: Divergence) -> str | None:
    """The newest complete checkpoint saved before ``divergence`` began whose files verify; collective."""
    before = [t for t in complete_tags(ckpt_root) if int(t[len("step"):]) < divergence.first_bad_step]
    return newest_verified(ckpt_root, list(reversed(before)))


__all__ = ["DIVERGED_EXIT_STATUS", "Divergence", "NumericsGuard", "TrainingDiverged", "install_update_gate",
           "rollback_tag"]
