"""The noise clock's step: kept on the host so a draw does not wait for the device, re-read whenever the buffer
changed behind its back (a checkpoint load, a reshard's in-place copy, a move), so draws always follow the buffer."""

from __future__ import annotations

import copy

import torch

from xoron_dist.model.common.noise import NoiseClock
from xoron_dist.utils.host_syncs import HostSyncCounter

ITEM = torch.arange(12.0).view(3, 4)


def _draw(clock: NoiseClock) -> float:
    return torch.rand((), generator=clock.generator(ITEM, salt=3)).item()


def _draw_at(step: int) -> float:
    """The draw of a fresh clock whose buffer says ``step``."""
    clock = NoiseClock()
    clock.step.fill_(step)
    return _draw(clock)


def test_advancing_and_drawing_read_the_step_from_the_host():
    clock = NoiseClock()
    _draw(clock)  # the first draw reads the buffer once
    with HostSyncCounter() as syncs:
        for _ in range(3):
            clock.advance()
            clock.generator(ITEM)
    assert "__int__" not in syncs.calls, syncs.calls
    assert int(clock.step) == 3 and _draw(clock) == _draw_at(3)


def test_draws_follow_the_buffer_after_a_load_a_copy_and_a_deepcopy():
    clock = NoiseClock()
    for _ in range(2):
        clock.advance()
    assert _draw(clock) == _draw_at(2)
    clock.load_state_dict({"step": torch.tensor(7)})  # a checkpoint load
    assert _draw(clock) == _draw_at(7)
    clock.step.copy_(torch.tensor(11))  # a reshard writes buffers in place
    assert _draw(clock) == _draw_at(11)
    twin = copy.deepcopy(clock)
    twin.advance()
    assert _draw(twin) == _draw_at(12) and _draw(clock) == _draw_at(11)
    clock.step = torch.tensor(5)  # a new tensor (as a move to another device makes)
    assert _draw(clock) == _draw_at(5)
