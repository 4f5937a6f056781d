"""Warmup + cosine schedule: the formula, and the torch scheduler DeepSpeed steps and checkpoints."""

import math

import pytest
import torch

from xoron_dist.config import TrainConfig
from xoron_dist.train.schedule import WarmupCosineSchedule, lr_at

TRAIN = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=4, steps=20)


def test_warmup_is_linear_and_never_zero():
    assert [lr_at(s, TRAIN) for s in range(4)] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert lr_at(0, TRAIN) > 0


def test_cosine_from_peak_to_floor():
    assert lr_at(4, TRAIN) == pytest.approx(1e-3)
    mid = 4 + (20 - 4) // 2
    assert lr_at(mid, TRAIN) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(20, TRAIN) == pytest.approx(1e-4)
    assert lr_at(1000, TRAIN) == pytest.approx(1e-4)
    decay = [lr_at(s, TRAIN) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_formula_matches_docstring():
    s = 9
    expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
    assert lr_at(s, TRAIN) == pytest.approx(expected)


def test_no_warmup_and_all_warmup():
    assert lr_at(0, TrainConfig(lr=2e-3, warmup_steps=0, steps=10)) == pytest.approx(2e-3)
    long_warmup = TrainConfig(lr=1e-3, warmup_steps=50, steps=10)
    assert lr_at(9, long_warmup) == pytest.approx(1e-3 * 10 / 50)


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, TRAIN)


def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=TRAIN.lr)


def test_scheduler_follows_lr_at():
    opt = _optimizer()
    sched = WarmupCosineSchedule.factory(TRAIN)(opt)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, TRAIN) for s in range(25)])


def test_state_dict_restores_step_and_takes_config_from_the_new_run():
    opt = _optimizer()
    sched = WarmupCosineSchedule(opt, TRAIN)
    for _ in range(7):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    assert saved == {"last_epoch": 7, "_step_count": 8}

    longer = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=4, steps=40)
    opt2 = _optimizer()
    resumed = WarmupCosineSchedule(opt2, longer)
    resumed.load_state_dict(saved)
    assert resumed.last_epoch == 7
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(7, longer))
    assert resumed.get_last_lr() == pytest.approx([lr_at(7, longer)])
    opt2.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(8, longer))


def test_param_groups_keep_their_lr_ratio():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": TRAIN.lr}, {"params": [b], "lr": TRAIN.lr / 10}])
    WarmupCosineSchedule(opt, TRAIN)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(0, TRAIN))
    assert opt.param_groups[1]["lr"] == pytest.approx(lr_at(0, TRAIN) / 10)
