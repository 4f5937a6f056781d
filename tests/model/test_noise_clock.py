"""The noise clock's step: kept on the host so a draw does not wait for the device, re-read whenever the buffer
changed behind its back (a checkpoint load, a reshard's in-place copy, a move), so draws always follow the buffer.
The content keys: a batch moved to the device carries its media's keys, hashed from the host copies, so a draw
reads no medium back (the ``meta`` device stands in for the GPU: it has no values to read)."""

from __future__ import annotations

import copy

import torch

from xoron_dist.data.batch import PackedBatch
from xoron_dist.model.common.noise import NoiseClock, content_key, keep_content_keys
from xoron_dist.utils.host_syncs import HostSyncCounter, host_values

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


def test_a_moved_batch_carries_its_media_keys_and_a_draw_reads_nothing():
    image = torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8)
    audio = torch.randint(-300, 300, (50,), dtype=torch.int16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    batch = PackedBatch(ids, ids, ids, ids, [["a"]], 0, images=[image], audios=[audio])
    with HostSyncCounter() as syncs:
        moved = batch.to("meta")  # the keys are hashed from the host copies: no read counted
    assert syncs.total == 0, syncs.calls
    assert moved.images[0].device.type == "meta"
    # a meta tensor has no values: these keys can only be the ones the move gave
    assert content_key(moved.images[0]) == content_key(image)
    assert content_key(moved.audios[0]) == content_key(audio)
    again = moved.to("meta")  # moved twice: the key travels on
    assert content_key(again.images[0]) == content_key(image)
    clock = NoiseClock()
    clock.advance()
    with HostSyncCounter() as syncs:
        seed = clock.seed(moved.images[0], salt=1)
    assert syncs.total == 0 and seed == clock.seed(image, salt=1)


def test_an_item_without_a_key_is_read_and_host_values_are_not_counted():
    item = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        content_key(item)  # made on the device in a real run: its values must be read
    assert syncs.total == 1, syncs.calls
    target = torch.empty(6)
    with HostSyncCounter() as syncs:
        keep_content_keys([item], [target])
        with host_values():
            item.tolist()
    assert syncs.total == 0, syncs.calls
    assert content_key(target) == content_key(item)


def test_draws_are_made_on_the_item_device_and_host_choices_share_the_seed():
    clock = NoiseClock()
    item = ITEM.to(torch.float64)
    [draw] = clock.normal([item], [(2, 3)], salt=4)
    assert draw.device == item.device and draw.shape == (2, 3)
    torch.testing.assert_close(draw, torch.randn((2, 3), generator=torch.Generator().manual_seed(clock.seed(item, 4))))
    first = clock.host_random(item, salt=2).randrange(1000)
    assert first == clock.host_random(item, salt=2).randrange(1000)
    assert [clock.host_random(item, salt=s).random() for s in range(4)] != [clock.host_random(item, 0).random()] * 4


def test_blank_items_carry_the_key_of_zeros_without_a_read():
    from xoron_dist.model.common.noise import blank_item

    for shape, dtype in (((4, 4, 3), torch.uint8), ((10,), torch.int16)):
        with HostSyncCounter() as counter:
            first, second = blank_item(shape, dtype, "cpu"), blank_item(shape, dtype, "cpu")
            keys = content_key(first), content_key(second)
        assert counter.total == 0 and first is not second and not first.any()
        assert keys[0] == keys[1] == content_key(torch.zeros(shape, dtype=dtype).clone())
