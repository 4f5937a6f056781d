import hashlib
from collections import Counter

import numpy as np
import pytest

from xoron_dist.config import ConfigError
from xoron_dist.data.blend import BLOCK, BlendEntry, BlendSampler, resolve_blend
from xoron_dist.data.order import EpochOrder, derive_seed, slot_index, slot_position
from xoron_dist.data.schema import DatasetInfo, ShardInfo


def test_seed_derivation_and_order_are_pinned():
    # sha256 + numpy's PCG64: the same in every process and Python run (no hash()). A change here
    # changes the data order of every run, so resumes of older checkpoints: pinned on purpose.
    assert derive_seed("xoron-order", 0, "text", 0) == 0x719AB35AB6148F29E495657ADB63EBCC
    assert derive_seed("a", 1) == int.from_bytes(hashlib.sha256(b"a/1").digest()[:16], "little")
    assert EpochOrder(0, "text", 10).permutation(0).tolist() == [2, 6, 9, 5, 1, 0, 8, 4, 7, 3]


def test_each_epoch_is_a_fresh_permutation_fixed_by_seed_name_and_epoch():
    order = EpochOrder(seed=3, name="text", rows=50)
    first, second = order.permutation(0).copy(), order.permutation(1).copy()
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert not np.array_equal(first, second)
    assert np.array_equal(EpochOrder(3, "text", 50).permutation(0), first)
    assert not np.array_equal(EpochOrder(4, "text", 50).permutation(0), first)
    assert not np.array_equal(EpochOrder(3, "image_caption", 50).permutation(0), first)
    assert order.row_at(50 + 7) == (1, int(second[7]))


@pytest.mark.parametrize(("rows", "dp_size", "workers"), [(48, 2, 2), (50, 2, 2), (7, 3, 2), (5, 2, 4)])
def test_slots_split_every_epoch_disjointly_and_completely(rows, dp_size, workers):
    """Every epoch of the stream: each row goes to exactly one (rank, worker); the remainder of an
    epoch that does not divide goes on into the next epoch, nothing dropped or repeated."""
    order = EpochOrder(seed=1, name="text", rows=rows)
    slots = dp_size * workers
    owner = {}
    for rank in range(dp_size):
        for worker in range(workers):
            slot = slot_index(rank, worker, dp_size)
            for count in range(3 * rows // slots + 2):
                position = slot_position(count, slot, slots)
                assert position % dp_size == rank and (position // dp_size) % workers == worker
                assert position not in owner
                owner[position] = slot
    for epoch in range(3):
        seen = [order.row_at(p)[1] for p in range(epoch * rows, (epoch + 1) * rows) if p in owner]
        assert sorted(seen) == list(range(rows))


def _info(kind, rows):
    return DatasetInfo(kind, [ShardInfo(f"{kind}/a.arrow", rows, 1, "")])


DATASETS = {"text": _info("text", 300), "image_caption": _info("image_caption", 100),
            "text_to_image": _info("text_to_image", 20)}


def test_resolve_blend_defaults_to_rows_and_filters_kinds():
    entries = resolve_blend(DATASETS)
    assert {e.name: round(e.weight, 3) for e in entries} == {"image_caption": 0.238, "text": 0.714,
                                                             "text_to_image": 0.048}
    entries = resolve_blend(DATASETS, kinds=["text", "text_to_image"])
    assert [e.name for e in entries] == ["text", "text_to_image"]
    entries = resolve_blend(DATASETS, mix={"text": 3, "image_caption": 1})
    assert {e.name: e.weight for e in entries} == {"text": 0.75, "image_caption": 0.25}  # unlisted: weight 0


def test_resolve_blend_errors_name_the_field():
    with pytest.raises(ValueError, match="no datasets"):
        resolve_blend({})
    with pytest.raises(ConfigError, match=r"stages\[1\].kinds.*unknown kinds \['picture'\]"):
        resolve_blend(DATASETS, kinds=["picture"], kinds_field="stages[1].kinds")
    with pytest.raises(ConfigError, match=r"stages\[1\].kinds.*matches no dataset"):
        resolve_blend(DATASETS, kinds=["audio_transcript"], kinds_field="stages[1].kinds")
    with pytest.raises(ConfigError, match=r"data.mix.speech.*no dataset 'speech'"):
        resolve_blend(DATASETS, mix={"speech": 1.0})
    with pytest.raises(ConfigError, match=r"stages\[0\].mix.image_caption.*not in"):
        resolve_blend(DATASETS, kinds=["text"], mix={"image_caption": 1.0}, mix_field="stages[0].mix")
    with pytest.raises(ConfigError, match="every weight is 0"):
        resolve_blend(DATASETS, mix={"text": 0.0})


def test_blend_proportions_and_small_dataset_cycles():
    entries = [BlendEntry("big", "text", 100_000, 0.7), BlendEntry("small", "image_caption", 40, 0.3)]
    sampler = BlendSampler(entries, seed=5, slot=1, num_slots=4)
    draws = [sampler.next() for _ in range(5000)]
    share = Counter(d for d, _ in draws)[0] / 5000
    assert abs(share - 0.7) < 0.03
    # the small dataset wrapped through many epochs of its own, the big one not even one
    assert sampler.cursors[1] * 4 // 40 > 30 and sampler.cursors[0] * 4 < 100_000
    small_positions = [p for d, p in draws if d == 1]
    assert small_positions == [slot_position(j, 1, 4) for j in range(len(small_positions))]
    # a pure function of (seed, slot, draw): a resumed sampler continues identically
    resumed = BlendSampler(entries, seed=5, slot=1, num_slots=4)
    replay = BlendSampler(entries, seed=5, slot=1, num_slots=4)
    for _ in range(1234):
        replay.next()
    resumed.load_state_dict(replay.state_dict())
    assert [resumed.next() for _ in range(100)] == draws[1234:1334]
    other_slot = BlendSampler(entries, seed=5, slot=2, num_slots=4)
    assert [other_slot.pick(k) for k in range(200)] != [sampler.pick(k) for k in range(200)]


def test_resolved_draws_match_the_draws_one_by_one():
    # draw() resolves a block of draws at once (vectorised); it must equal pick + cursor + row_at,
    # across a block boundary, through many epochs of a tiny dataset, and after a resume mid-block
    entries = [BlendEntry("big", "text", 5_000, 0.6), BlendEntry("tiny", "image_caption", 7, 0.3),
               BlendEntry("mid", "audio_transcript", 300, 0.1)]
    sampler = BlendSampler(entries, seed=3, slot=2, num_slots=3)
    cursors = [0, 0, 0]
    for draw in range(BLOCK + 500):
        dataset = sampler.pick(draw)
        position = slot_position(cursors[dataset], 2, 3)
        cursors[dataset] += 1
        assert sampler.draw() == (dataset, position, sampler.row_at(dataset, position))
    resumed = BlendSampler(entries, seed=3, slot=2, num_slots=3)
    resumed.load_state_dict(sampler.state_dict())
    assert [resumed.draw() for _ in range(300)] == [sampler.draw() for _ in range(300)]
