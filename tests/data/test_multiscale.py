"""Multi-scale media (issue 16, item 4): native-size prep within a budget, one scale bucket per
micro-batch drawn by a seeded schedule (random / progressive / curriculum), exact resume, and the
planner counting the largest bucket."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.media import Blob, FrameList, decode_image, decode_video, target_size
from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from tests.data_prep.inputs import gradient_image, png_bytes
from xoron_dist.config import ConfigError, XoronConfig, load_config
from xoron_dist.config.run import MultiScaleConfig, PrepConfig, ScalePhaseConfig
from xoron_dist.data.loader import ArrowDataLoader, LoaderStateError
from xoron_dist.data.multiscale import Bucket, ScaleSchedule, fit_image, fit_video
from xoron_dist.parallel.layout import Layout
from xoron_dist.plan import memory
from xoron_dist.plan.memory import TrainingShape, estimate_memory, media_activation_bytes
from xoron_dist.plan.parts import ParameterCount, PartParameters

BUDGETS = {"max_pixels": 1_000_000, "max_seconds": 60.0}


# --------------------------------------------------------------------------- native prep


@pytest.mark.parametrize(("shape", "size", "patch"), [
    ((400, 300), 128, 14), ((300, 400), 128, 14), ((1000, 10), 64, 16), ((90, 50), 128, 14), ((640, 360), 256, 16),
])
def test_native_prep_keeps_the_aspect_within_the_budget(shape, size, patch):
    w, h = target_size(*shape, size, "native", patch)
    assert w % patch == 0 and h % patch == 0 and w >= patch and h >= patch
    assert w * h <= size * size  # the budget: as many pixels as a size x size square
    assert w <= shape[0] + patch and h <= shape[1] + patch  # never enlarged (beyond the one-patch floor)
    if min(shape) * math.sqrt(min(1.0, size * size / (shape[0] * shape[1]))) >= 2 * patch:
        # not a sliver: the aspect is kept within one patch per side
        scale = min(1.0, math.sqrt(size * size / (shape[0] * shape[1])))
        assert abs(w - shape[0] * scale) < patch and abs(h - shape[1] * scale) < patch
    pixels = decode_image(Blob("x.png", "png", data=png_bytes(gradient_image(*shape))), size, "native", patch,
                          max_pixels=BUDGETS["max_pixels"])
    assert pixels.shape == (h, w, 3)


def test_native_prep_of_an_image_within_the_budget_is_not_resampled():
    image = gradient_image(56, 28)
    pixels = decode_image(Blob("x.png", "png", data=png_bytes(image)), 64, "native", 14, max_pixels=10**6)
    assert np.array_equal(pixels, np.asarray(image))


def test_native_video_keeps_its_frame_count_up_to_the_cap():
    def clip(n):
        return FrameList(tuple(Blob(f"f/{i}.png", "png", data=png_bytes(Image.new("RGB", (60, 30), (20 * i,) * 3)))
                               for i in range(n)))

    short, fps = decode_video(clip(3), 8, 32, "native", 8, fps=6.0, **BUDGETS)
    assert short.shape == (3, 16, 40, 3) and fps == pytest.approx(6.0)  # own 3 frames, no stretching; 45x23 rounded
    long, fps = decode_video(clip(12), 8, 32, "native", 8, fps=12.0, **BUDGETS)
    assert long.shape[0] == 8 and fps == pytest.approx(8.0)  # capped at video_frames, evenly
    cropped, _ = decode_video(clip(3), 8, 32, "crop", 8, fps=6.0, **BUDGETS)
    assert cropped.shape == (8, 32, 32, 3)  # today's default: unchanged


def test_native_budget_must_hold_a_patch():
    with pytest.raises(ConfigError, match=r"'data.prep.image_size' = 8 .*patch_multiple \(14\)"):
        replace(PrepConfig(), image_size=8, image_resize="native").validate("data.prep")
    PrepConfig(image_size=8).validate("data.prep")  # crop: any size, as before


# --------------------------------------------------------------------------- the schedule (pure)


def _schedule(strategy="random", total=None, **overrides):
    return ScaleSchedule(MultiScaleConfig(strategy=strategy, **overrides), total)


def test_random_buckets_follow_the_configured_probabilities():
    probs = [0.1, 0.2, 0.3, 0.4]
    schedule = _schedule(image_scales=[126, 252, 378, 504], image_probabilities=probs,
                         video_frames=[8, 16, 32], frame_probabilities=[0.5, 0.0, 0.5], seed=3)
    n = 6000
    buckets = [schedule.bucket(k) for k in range(n)]
    images = Counter(b.image_scale for b in buckets)
    for scale, p in zip([126, 252, 378, 504], probs, strict=True):
        assert abs(images[scale] / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    frames = Counter(b.video_frames for b in buckets)
    assert frames[16] == 0 and abs(frames[8] / n - 0.5) < 0.03
    videos = Counter(b.video_scale for b in buckets)  # uniform when no probabilities are given
    assert all(abs(videos[s] / n - 0.2) < 0.03 for s in (128, 192, 256, 320, 384))
    # a pure function of (seed, index): another object, same draws; another seed, others
    assert [_schedule(image_scales=[126, 252, 378, 504], image_probabilities=probs, video_frames=[8, 16, 32],
                      frame_probabilities=[0.5, 0.0, 0.5], seed=3).bucket(k) for k in range(50)] == buckets[:50]
    assert [_schedule(seed=4).bucket(k) for k in range(50)] != [_schedule(seed=3).bucket(k) for k in range(50)]


def test_progressive_grows_monotonically_in_equal_shares():
    schedule = _schedule("progressive", total=100, image_scales=[378, 126, 252], video_frames=[8, 32])
    buckets = [schedule.bucket(k) for k in range(120)]
    for axis in ("image_scale", "video_scale", "video_frames"):
        values = [getattr(b, axis) for b in buckets]
        assert values == sorted(values)  # never shrinks
    assert [b.image_scale for b in buckets[:100]] == [126] * 34 + [252] * 33 + [378] * 33
    assert buckets[0] == Bucket(126, 128, 8) and buckets[-1] == Bucket(378, 384, 32) == schedule.largest()


def test_curriculum_follows_its_phases():
    phases = [ScalePhaseConfig(until=0.25, image_scales=[126], video_scales=[128], video_frames=[8]),
              ScalePhaseConfig(until=0.5, image_scales=[126, 252], video_frames=[8, 16]),
              ScalePhaseConfig(until=1.0)]
    schedule = ScaleSchedule(MultiScaleConfig(strategy="curriculum", phases=phases, schedule_batches=400,
                                              video_frames=[8, 16, 32]))
    buckets = [schedule.bucket(k) for k in range(400)]
    assert set(buckets[:100]) == {Bucket(126, 128, 8)}
    assert {b.image_scale for b in buckets[100:200]} == {126, 252}
    assert {b.video_frames for b in buckets[100:200]} == {8, 16}
    assert max(b.image_scale for b in buckets[200:]) == 504 and max(b.video_frames for b in buckets[200:]) == 32
    # the largest scale a phase allows never falls
    tops = [max(b.image_scale for b in buckets[i:i + 100]) for i in range(0, 400, 100)]
    assert tops == sorted(tops)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"image_scales": []}, "data.multiscale.image_scales"),
    ({"video_frames": []}, "data.multiscale.video_frames"),
    ({"image_probabilities": [0.5, 0.2, 0.2, 0.2]}, "data.multiscale.image_probabilities"),
    ({"image_probabilities": [0.5, 0.5]}, "data.multiscale.image_probabilities"),
    ({"image_scales": [128, 252]}, "data.multiscale.image_scales"),  # 128 is no multiple of 14
    ({"video_scales": [128, 200]}, "data.multiscale.video_scales"),
    ({"strategy": "curriculum"}, "data.multiscale.phases"),
    ({"strategy": "curriculum", "phases": [ScalePhaseConfig(until=0.5)]}, "data.multiscale.phases[0].until"),
    ({"strategy": "curriculum", "phases": [ScalePhaseConfig(image_scales=[140])]},
     "data.multiscale.phases[0].image_scales"),
    ({"strategy": "progressive"}, "data.multiscale.schedule_batches"),
])
def test_bad_multiscale_config_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _schedule(**overrides)
    message = str(err.value)
    assert f"'{field}'" in message and "\n" not in message


def test_the_config_tree_reads_multiscale_from_yaml_style_dicts():
    cfg = XoronConfig.from_dict({"data": {"multiscale": {"strategy": "curriculum", "schedule_batches": 10,
                                                         "phases": [{"until": 1.0, "video_frames": [8]}]}}})
    assert cfg.data.multiscale.phases[0].video_frames == [8]
    with pytest.raises(ConfigError, match="data.multiscale.image_scales"):
        XoronConfig.from_dict({"data": {"multiscale": {"image_scales": []}}})


# --------------------------------------------------------------------------- resizing


def test_fit_pad_keeps_the_aspect_and_letterboxes():
    image = np.asarray(Image.new("RGB", (40, 20), (200, 100, 50)))
    out = fit_image(image, 28, "pad")
    assert out.shape == (28, 28, 3)
    assert (out[:7] == 0).all() and (out[21:] == 0).all()  # bars above and below
    assert (np.abs(out[8:20].astype(int) - (200, 100, 50)) <= 1).all()  # the image, 28 x 14, centred
    assert fit_image(image, 28, "crop").shape == fit_image(image, 28, "squash").shape == (28, 28, 3)
    assert fit_image(out, 28, "crop") is out  # already the bucket's shape


def test_fit_video_picks_frames_evenly_and_resizes_each():
    clip = np.stack([np.full((6, 8, 3), 10 * i, np.uint8) for i in range(12)])
    out = fit_video(clip, 4, 16, "squash")
    assert out.shape == (4, 16, 16, 3)
    assert [int(f[0, 0, 0]) for f in out] == [10, 40, 70, 100]  # frames 1, 4, 7, 10 (prep's rule)
    assert [int(f[0, 0, 0]) for f in fit_video(clip[:2], 4, 16, "squash")] == [0, 0, 10, 10]  # short: held


# --------------------------------------------------------------------------- the loader

SEQ = 48
SMALL = {"image_scales": [14, 28], "video_scales": [16, 32], "video_frames": [2, 4]}


@pytest.fixture(scope="module")
def media_data(tmp_path_factory, arrow_tokenizer):
    root = tmp_path_factory.mktemp("multiscale")
    write_prepared(root, {"text": make_rows("text", 20, seed=1, text_len=(3, 30)),
                          "image_caption": make_rows("image_caption", 24, seed=2, text_len=(3, 8)),
                          "video_caption": make_rows("video_caption", 24, seed=3, text_len=(3, 8)),
                          "text_to_image": make_rows("text_to_image", 8, seed=4, text_len=(3, 8))},
                   arrow_tokenizer)
    return root


def _loader(root, tok, multiscale, *, workers=0, dp_rank=0, dp_size=1, total_batches=None):
    cfg = data_config(root, num_workers=workers, multiscale=multiscale)
    return ArrowDataLoader(root, cfg, tok, seq_len=SEQ, micro_batch_size=3, dp_rank=dp_rank, dp_size=dp_size,
                           seed=5, total_batches=total_batches)


def _take(loader, n):
    batches = [loader.next_batch() for _ in range(n)]
    loader.close()
    return batches


def _inputs(batch, medium):
    flags = getattr(batch, f"{medium}_is_target").tolist()
    return [t for t, target in zip(getattr(batch, f"{medium}s"), flags, strict=True) if not target]


def test_every_micro_batch_has_one_shape_per_medium_and_the_tokens_are_unchanged(media_data, arrow_tokenizer):
    cfg = MultiScaleConfig(**SMALL, seed=1)
    schedule = ScaleSchedule(cfg)
    scaled = _take(_loader(media_data, arrow_tokenizer, cfg), 12)
    plain = _take(_loader(media_data, arrow_tokenizer, None), 12)
    seen = set()
    for k, (a, b) in enumerate(zip(scaled, plain, strict=True)):
        bucket = schedule.bucket(k)
        assert {tuple(t.shape) for t in _inputs(a, "image")} <= {(bucket.image_scale,) * 2 + (3,)}
        assert {tuple(t.shape) for t in _inputs(a, "video")} <= {
            (bucket.video_frames, bucket.video_scale, bucket.video_scale, 3)}
        seen |= {tuple(t.shape) for t in _inputs(a, "image") + _inputs(a, "video")}
        # the packer's work is untouched: same rows, labels and spans; generation targets as prepared
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.image_spans, b.image_spans) and torch.equal(a.video_spans, b.video_spans)
        targets = [(x, y) for x, y, t in zip(a.images, b.images, a.image_is_target.tolist(), strict=True) if t]
        assert all(torch.equal(x, y) for x, y in targets)
    assert len(seen) >= 4  # several buckets were drawn over the run


def test_data_parallel_ranks_share_each_micro_batch_bucket(media_data, arrow_tokenizer):
    cfg = MultiScaleConfig(**SMALL, seed=2)
    ranks = [_take(_loader(media_data, arrow_tokenizer, cfg, dp_rank=r, dp_size=2), 8) for r in range(2)]
    schedule = ScaleSchedule(cfg)
    for k, batches in enumerate(zip(*ranks, strict=True)):
        bucket = schedule.bucket(k)
        for batch in batches:
            assert all(t.shape[0] == bucket.image_scale for t in _inputs(batch, "image"))
            assert all(t.shape[:2] == (bucket.video_frames, bucket.video_scale) for t in _inputs(batch, "video"))


def test_resume_mid_run_gives_the_same_next_batches(media_data, arrow_tokenizer):
    cfg = MultiScaleConfig(**SMALL, strategy="progressive", seed=3)
    reference = _take(_loader(media_data, arrow_tokenizer, cfg, workers=2, total_batches=10), 10)
    schedule = ScaleSchedule(cfg, 10)
    for k, batch in enumerate(reference):  # with two workers too, batch k has bucket k
        bucket = schedule.bucket(k)
        assert all(t.shape[0] == bucket.image_scale for t in _inputs(batch, "image"))
        assert all(t.shape[:2] == (bucket.video_frames, bucket.video_scale) for t in _inputs(batch, "video"))
    first = _loader(media_data, arrow_tokenizer, cfg, workers=2, total_batches=10)
    _take(first, 5)
    state = first.state_dict()
    resumed = _loader(media_data, arrow_tokenizer, cfg, workers=2, total_batches=10)
    resumed.load_state_dict(state)
    for a, b in zip(_take(resumed, 5), reference[5:], strict=True):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        for medium in ("images", "videos"):
            assert all(torch.equal(x, y) for x, y in zip(getattr(a, medium), getattr(b, medium), strict=True))
    # another schedule is another data order: refused, naming it
    for other in (_loader(media_data, arrow_tokenizer, cfg, workers=2, total_batches=20),
                  _loader(media_data, arrow_tokenizer, None, workers=2)):
        with pytest.raises(LoaderStateError, match="multiscale"):
            other.load_state_dict(state)


# --------------------------------------------------------------------------- the planner


def _media_config(multiscale):
    """The smoke model (every encoder, tiny), its video encoder allowed frames up to 128 px."""
    cfg = load_config("pipelines/smoke.yaml")
    cfg.model.video = replace(cfg.model.video, max_resolution=128)
    cfg.data = replace(cfg.data, multiscale=multiscale)
    return cfg


@pytest.mark.parametrize("larger", [{"video_scales": [32, 128]}, {"video_frames": [8, 32]}])
def test_planner_memory_grows_with_the_largest_bucket(larger, monkeypatch):
    base = {"video_patch": 8, "video_scales": [32, 64], "video_frames": [8, 16]}
    small, large = MultiScaleConfig(**base), MultiScaleConfig(**(base | larger))
    cfg_small, cfg_large = _media_config(small), _media_config(large)
    assert media_activation_bytes(_media_config(None), 1, 4, 2) == 0  # media as prepared: unbounded, not counted
    a, b = media_activation_bytes(cfg_small, 1, 4, 2), media_activation_bytes(cfg_large, 1, 4, 2)
    assert 0 < a < b
    frames, side = large.largest()[2], min(large.largest()[1], 128)
    tokens = frames * (side // 8) ** 2
    assert b - a >= 2 * (tokens * tokens - (16 * (64 // 8) ** 2) ** 2)  # at least the two videos' larger masks
    # the stage holding the parts carries exactly that (their parameter counts, which build the model on
    # the meta device and have their own tests, stand in as one small part here)
    monkeypatch.setattr(memory, "rank_parts", lambda cfg, layout: [PartParameters("video", ParameterCount(10), 10)])
    layout = Layout(world=1, dp=1, tp=1, pp=1, sp=1, ep=1, zero_stage=0)
    shape = TrainingShape(2, 128, 1, False, packed_documents=True)
    peaks = [estimate_memory(c, layout, shape, {}, mixed=False).activations for c in (cfg_small, cfg_large)]
    assert peaks[1] - peaks[0] == b - a


@pytest.mark.parametrize("multiscale, field", [
    ({"image_patch": 8, "image_scales": [16, 32]}, "data.multiscale.image_patch"),  # the tiny tower's patch is 8
    ({"video_frames": [4, 8]}, "data.multiscale.video_frames"),  # below model.video.min_frames
])
def test_buckets_must_fit_the_encoders_that_read_them(multiscale, field):
    """Cross-section: scales on the tower's patch grid, frame counts within the video encoder's range."""
    model = {"vision": {"enabled": True, "patch_size": 14}, "video": {"enabled": True, "min_frames": 8}}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        XoronConfig.from_dict({"model": model, "data": {"multiscale": multiscale}})
    XoronConfig.from_dict({"model": model, "data": {"multiscale": {}}})  # the defaults fit the full-size encoders
