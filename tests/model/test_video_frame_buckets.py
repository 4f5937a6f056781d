"""Tower-mode video with the multi-scale loader's frame buckets: a clip of T frames fills the fixed span S
with S / T tokens per frame (``TowerVideoEncoder(span=S)``, ``tower_clip_sizes``)."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_video import TOWER_CFG, TOWER_MODEL, VISION, _video
from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.video import TowerVideoEncoder, tower_clip_sizes
from xoron_dist.model.vision import VisionTower

SPAN = 12  # TOWER_CFG.tokens_per_frame = 3: 4 frames use the learned queries as they are

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _encoders() -> tuple[TowerVideoEncoder, TowerVideoEncoder]:
    """The same weights as a fixed 4-frame encoder and as a span-12 encoder."""
    torch.manual_seed(0)
    tower = VisionTower(VISION).eval()
    fixed = TowerVideoEncoder(TOWER_CFG, VISION.hidden_size, frames=SPAN // TOWER_CFG.tokens_per_frame)
    spanned = TowerVideoEncoder(TOWER_CFG, VISION.hidden_size, span=SPAN)
    spanned.load_state_dict(fixed.state_dict())
    for encoder in (fixed, spanned):
        encoder.use_tower(tower)
    return fixed.eval(), spanned.eval()


def test_every_bucket_fills_the_span_and_the_default_bucket_is_the_fixed_encoder():
    fixed, spanned = _encoders()
    clips = [_video(4, 16, 12, seed=40), _video(4, 8, 8, seed=41)]
    with torch.no_grad():
        torch.testing.assert_close(spanned(clips), fixed(clips), rtol=0, atol=0)
        for frames in (2, 3, 6):  # one bucket per call, as the loader gives them
            features, mask = spanned([_video(frames, 16, 12, seed=frames), _video(frames, 8, 8, seed=50 + frames)])
            assert features.shape == (2, SPAN, TOWER_CFG.hidden_size) and bool(mask.all()), frames
            assert bool(torch.isfinite(features).all())
    with pytest.raises(ValueError, match="one frame count dividing 12.*got \\[2, 3\\]"):
        spanned([_video(2, 8, 8, seed=1), _video(3, 8, 8, seed=2)])
    with pytest.raises(ValueError, match="dividing 12.*got \\[5\\]"):
        spanned([_video(5, 8, 8, seed=1)])


def test_a_bucket_clip_stays_causal_frame_by_frame():
    """6 frames, 2 tokens each: changing frame j leaves the tokens of frames < j exactly unchanged."""
    _, spanned = _encoders()
    video = _video(6, 16, 12, seed=60)
    with torch.no_grad():
        base, _ = spanned([video])
        for frame in (1, 3, 5):
            changed = video.clone()
            changed[frame] = _video(1, 16, 12, seed=70 + frame)[0]
            out, _ = spanned([changed])
            assert torch.equal(out[0, : 2 * frame], base[0, : 2 * frame]), frame
            assert not torch.allclose(out[0, 2 * frame:], base[0, 2 * frame:]), frame


def test_bucket_frame_counts_are_checked_against_the_span():
    multiscale = ["data.multiscale={video_frames: [1, 2, 3, 6], image_scales: [16], video_scales: [16], "
                  "image_patch: 4, video_patch: 4}"]
    assert tower_clip_sizes(load_config(None, TOWER_MODEL)) == (3, None)  # no buckets: today's fixed count
    assert tower_clip_sizes(load_config(None, [*TOWER_MODEL, *multiscale])) == (None, 6)
    with pytest.raises(ConfigError, match=r"multiscale.video_frames.*\[4\] do not; use counts from \[1, 2, 3, 6\]"):
        tower_clip_sizes(load_config(None, [*TOWER_MODEL, *multiscale, "data.multiscale.video_frames=[2,4]"]))
