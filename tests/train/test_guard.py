"""The numerics guard: what DeepSpeed does with a NaN gradient under each ZeRO stage, our update gate
for the stage that applies it (ZeRO-0), and the skip / rollback / stop decisions."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_checkpoint import _engine, _train_step, single_rank_deepspeed  # noqa: F401 (fixture)
from xoron_dist.config import TrainConfig
from xoron_dist.train.guard import NumericsGuard, install_update_gate


def _nan_step(engine) -> None:
    x = torch.randn(2, 8)
    loss = engine(x).pow(2).mean() * float("nan")
    engine.backward(loss)
    engine.step()


def _weights(engine) -> list[torch.Tensor]:
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_nan_step_changes_nothing_but_the_skip_count(stage):
    """fp32: ZeRO-1/2/3 skip the step themselves (invalid gradient norm = overflow); ZeRO-0 needs our gate.
    Weights, optimizer step count and LR schedule stay as they were; the next finite step trains."""
    engine, _ = _engine(stage, seed=0)
    assert install_update_gate(engine) == (stage == 0)
    _train_step(engine)
    before, lr_step = _weights(engine), engine.lr_scheduler.last_epoch
    _nan_step(engine)
    assert engine.skipped_steps == 1 and engine.lr_scheduler.last_epoch == lr_step
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine), strict=True))
    _train_step(engine)
    after = _weights(engine)
    assert all(torch.isfinite(w).all() for w in after)
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert engine.lr_scheduler.last_epoch == lr_step + 1


def test_without_the_gate_zero0_writes_nan_into_the_weights():
    """Why the gate exists: DeepSpeed hands ZeRO-0's NaN gradients to the torch optimizer."""
    engine, _ = _engine(0, seed=0)
    _nan_step(engine)
    assert engine.skipped_steps == 0
    assert not all(torch.isfinite(w).all() for w in _weights(engine))


def _guard(**train) -> NumericsGuard:
    return NumericsGuard(TrainConfig(**train), fp16=False)


OK = {"lm": 2.0}
NAN = {"lm": float("nan")}


def _flags(guard: NumericsGuard, *args, **kwargs) -> tuple[bool, bool]:
    """``local_flags``' (non-finite, spike), which it leaves on the device, as bools."""
    return tuple(value > 0 for value in guard.local_flags(*args, **kwargs).tolist())


def test_policies_count_consecutive_skips():
    skip = _guard(nonfinite_policy="skip", max_skipped_steps=2)
    assert _flags(skip, NAN, 1.0, engine_skipped=True) == (True, False)
    assert skip.record(1, NAN, True, False) is None and skip.record(2, NAN, True, False) is None
    assert not skip.healthy
    diverged = skip.record(3, NAN, True, False)
    assert diverged.first_bad_step == 1 and diverged.step == 3
    assert "non-finite loss or gradients at 3 steps in a row (1..3)" in diverged.reason
    assert skip.record(4, OK, False, False) is None and skip.healthy  # an applied step ends the streak

    stop = _guard(nonfinite_policy="stop", max_skipped_steps=5)  # stop: the first one is already divergence
    assert stop.record(7, NAN, True, False).reason == "non-finite loss or gradients at step 7"


def test_finite_loss_with_a_skipped_update_or_an_infinite_norm_counts():
    guard = _guard()
    assert _flags(guard, OK, float("inf"), engine_skipped=False) == (True, False)
    assert _flags(guard, OK, None, engine_skipped=True) == (True, False)
    assert _flags(guard, OK, 1.0, engine_skipped=False) == (False, False)
    fp16 = NumericsGuard(TrainConfig(), fp16=True)  # the loss scaler's overflow skips are routine
    assert _flags(fp16, OK, float("inf"), engine_skipped=True) == (False, False)
    assert _flags(fp16, NAN, None, engine_skipped=True) == (True, False)


def test_loss_spike_over_the_running_mean():
    guard = _guard(loss_spike_factor=3.0, loss_spike_window=4)
    for step, loss in enumerate([2.0, 2.2, 1.8, 2.0], start=1):
        assert _flags(guard, {"lm": loss}, 1.0, False) == (False, False)  # window not full yet
        assert guard.record(step, {"lm": loss}, False, False) is None
    assert _flags(guard, {"lm": 5.9}, 1.0, False) == (False, False)
    assert _flags(guard, {"lm": 6.1}, 1.0, False) == (False, True)
    diverged = guard.record(5, {"lm": 6.1}, False, True)
    assert diverged.first_bad_step == 5 and "loss 6.1 > 3 x 2, the mean of the last 4 steps" in diverged.reason
    guard.reset()
    assert _flags(guard, {"lm": 60.0}, 1.0, False) == (False, False)  # history restarts after a rollback


def test_the_flags_are_made_on_the_device_without_a_read():
    """The trainer hands over device tensors (each objective's mean, the grad norm) and all-reduces and reads
    the flags with the step's other values: making them reads nothing."""
    from xoron_dist.utils.host_syncs import HostSyncCounter

    guard = _guard(loss_spike_factor=3.0, loss_spike_window=1)
    guard.record(1, {"lm": 2.0}, False, False)
    means = {"lm": torch.tensor(7.0), "other": torch.tensor(float("inf"))}
    with HostSyncCounter() as syncs:
        flags = guard.local_flags(means, torch.tensor(1.0), engine_skipped=False)
        spiking = guard.local_flags({"lm": torch.tensor(7.0)}, torch.tensor(1.0), engine_skipped=False)
    assert syncs.total == 0, syncs.calls
    assert flags.tolist() == [1.0, 0.0] and spiking.tolist() == [0.0, 1.0]  # a non-finite step is no spike


def test_config_checks():
    from xoron_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.watchdog_minutes"):
        load_config(None, ["preset=tiny", "train.dist_timeout_minutes=2", "train.watchdog_minutes=3"])
    with pytest.raises(ConfigError, match="train.loss_spike_factor"):
        load_config(None, ["preset=tiny", "train.loss_spike_factor=0.5"])
    with pytest.raises(ConfigError, match="train.nonfinite_policy"):
        load_config(None, ["preset=tiny", "train.nonfinite_policy=ignore"])
    cfg = load_config(None, ["preset=tiny", "train.dist_timeout_minutes=0.5"])
    assert cfg.train.watchdog_seconds == 15.0 and TrainConfig().dist_timeout_minutes == 10.0
