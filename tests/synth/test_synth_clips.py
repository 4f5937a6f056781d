"""Moving-shape clips: the simulated motion, the frames and the caption agree."""

import random

import pytest

from xoron_dist.synth import clips
from xoron_dist.synth.clips import Clip, Mover
from xoron_dist.synth.scenes import PALETTE


def test_bounce_off_the_right_edge():
    mover = Mover("circle", "red", "move", x=80.0, y=50.0, radius=8.0, end_radius=8.0, direction=(1, 0),
                  speed="quickly")
    clip = Clip(100, 10, "black", (mover,))
    track = clips.trajectory(mover, clip.frames, clip.size)
    assert [edge for _, edge in track.bounces] == ["right edge"]
    assert max(track.xs) <= 92.0 and track.xs[-1] < track.xs[1]
    assert clips.clip_caption(clip) == (
        "A red circle starts on the right and moves quickly to the right, bounces off the right edge and "
        "moves to the left. The background is black."
    )
    frames = clips.render_clip(clip)
    assert len(frames) == 10
    for frame, x, y in zip(frames, track.xs, track.ys, strict=True):
        assert frame.getpixel((round(x), round(y))) == PALETTE["red"]


def test_slow_is_slower_than_quick_and_colour_changes_half_way():
    slow = Mover("square", "blue", "move", 20.0, 50.0, 6.0, 6.0, (1, 0), "slowly", end_color="yellow")
    quick = Mover("star", "green", "move", 20.0, 20.0, 6.0, 6.0, (0, 1), "quickly")
    clip = Clip(100, 8, "white", (slow, quick))
    a, b = (clips.trajectory(m, 8, 100) for m in clip.movers)
    assert a.xs[1] - a.xs[0] == pytest.approx(2.0) and b.ys[1] - b.ys[0] == pytest.approx(6.0)
    frames = clips.render_clip(clip)
    assert frames[3].getpixel((round(a.xs[3]), round(a.ys[3]))) == PALETTE["blue"]
    assert frames[4].getpixel((round(a.xs[4]), round(a.ys[4]))) == PALETTE["yellow"]
    caption = clips.clip_caption(clip)
    assert "moves slowly to the right, and changes color from blue to yellow" in caption
    assert "A green star starts at the top left and moves quickly down." in caption


def test_grow_and_still():
    grow = Mover("heart", "pink", "grow", 50.0, 50.0, 6.0, 16.0)
    track = clips.trajectory(grow, 5, 100)
    assert track.radii[0] == 6.0 and track.radii[-1] == 16.0 and not track.bounces
    assert clips.describe_mover(grow, Clip(100, 5, "black", (grow,))) == "A pink heart in the center grows bigger."
    still = Mover("cross", "gray", "still", 10.0, 90.0, 6.0, 6.0)
    expected = "A gray cross stays still at the bottom left."
    assert clips.describe_mover(still, Clip(100, 5, "black", (still,))) == expected


@pytest.mark.parametrize("seed", range(30))
def test_sampled_clips_stay_in_frame_and_answer_right(seed):
    rng = random.Random(f"clip/{seed}")
    clip = clips.sample_clip(rng, 64, 4, 24)
    assert 4 <= clip.frames <= 24 and len({m.name for m in clip.movers}) == len(clip.movers)
    for mover in clip.movers:
        assert mover.color != clip.background
        track = clips.trajectory(mover, clip.frames, clip.size)
        for x, y, r in zip(track.xs, track.ys, track.radii, strict=True):
            assert r - 1e-9 <= x <= 64 - r + 1e-9 and r - 1e-9 <= y <= 64 - r + 1e-9
    for _ in range(10):
        question, answer = clips.clip_question(clip, rng)
        if question == "How many shapes are there?":
            assert answer == ("One." if len(clip.movers) == 1 else "Two.")
        elif question.startswith("Does the ") and question.endswith(" bounce?"):
            (mover,) = [m for m in clip.movers if m.name == question[len("Does the "):-len(" bounce?")]]
            assert (answer == "No.") == (not clips.trajectory(mover, clip.frames, clip.size).bounces)
