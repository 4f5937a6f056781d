"""Still scenes: the words must be true of the pixels."""

import random

import pytest

from xoron_dist.synth import scenes
from xoron_dist.synth.scenes import PALETTE, Scene, SceneShape


def _shape(shape, color, size, column, row, width=300, height=300):
    cell_w, cell_h = width / 3, height / 3
    radius = scenes.SIZE_FRACTIONS[size] * min(cell_w, cell_h) / 2
    return SceneShape(shape, color, size, column, row, (column + 0.5) * cell_w, (row + 0.5) * cell_h, radius)


KNOWN = Scene(300, 300, "white", (
    _shape("circle", "red", "large", 0, 0),
    _shape("star", "red", "small", 2, 0),
    _shape("square", "blue", "large", 1, 1),
))


def test_known_scene_pixels_and_words():
    image = scenes.render_scene(KNOWN)
    assert image.size == (300, 300)
    for s in KNOWN.shapes:
        assert image.getpixel((int(s.cx), int(s.cy))) == PALETTE[s.color], s
    assert image.getpixel((5, 295)) == PALETTE["white"]  # an empty cell shows the background
    assert scenes.describe_scene(KNOWN) == (
        "Three shapes on a white background: a large red circle at the top left, "
        "a small red star at the top right and a large blue square in the center."
    )
    assert scenes.count_caption(KNOWN) == "A red circle, a red star and a blue square on a white background."


@pytest.mark.parametrize("seed", range(40))
def test_questions_match_the_scene(seed):
    rng = random.Random(seed)
    scene = scenes.sample_scene(rng, *scenes.sample_image_size(rng, 64, 256))
    for _ in range(20):
        question, answer = scenes.scene_question(scene, rng)
        assert answer.endswith(".") and answer[0].isupper()
        if question.startswith("How many ") and question.endswith(" shapes are there?") and question != \
                "How many shapes are there?":
            color = question.split()[2]
            expected = sum(s.color == color for s in scene.shapes)
            assert answer == scenes.sentence(scenes.number_word(expected)), (question, answer)
        elif question == "How many shapes are there?":
            assert answer == scenes.sentence(scenes.number_word(len(scene.shapes)))
        elif question == "What color is the background?":
            assert answer == scenes.sentence(scene.background)
        elif question.startswith("Where is the "):
            name = question[len("Where is the "):-1]
            (match,) = [s for s in scene.shapes if s.name == name]
            assert answer == scenes.sentence(match.where)


@pytest.mark.parametrize("seed", range(40))
def test_sampled_scenes_keep_shapes_in_their_cells(seed):
    rng = random.Random(f"cells/{seed}")
    width, height = scenes.sample_image_size(rng, 32, 512)
    assert 32 <= width <= 512 and 32 <= height <= 512 and 0.5 <= height / width <= 2.0
    scene = scenes.sample_scene(rng, width, height)
    image = scenes.render_scene(scene)
    assert scene.background not in {s.color for s in scene.shapes}
    cells = [(s.column, s.row) for s in scene.shapes]
    assert len(set(cells)) == len(cells) and cells == sorted(cells, key=lambda c: (c[1], c[0]))
    for s in scene.shapes:
        # the shape's box stays inside its cell, so its position words are right and nothing overlaps
        assert s.column * width / 3 <= s.cx - s.radius and s.cx + s.radius <= (s.column + 1) * width / 3
        assert s.row * height / 3 <= s.cy - s.radius and s.cy + s.radius <= (s.row + 1) * height / 3
        assert image.getpixel((int(s.cx), int(s.cy))) == PALETTE[s.color]
    caption = scenes.describe_scene(scene)
    for s in scene.shapes:
        assert f"{s.size} {s.color} {s.shape} {s.where}" in caption
    assert f"{scene.background} background" in caption


def test_relation_caption_names_a_true_relation():
    caption = scenes.relation_caption(KNOWN, random.Random(0))
    first = caption.split(". ")[0]
    allowed = {
        "A red circle is left of a blue square", "A blue square is right of a red circle",
        "A red star is right of a blue square", "A blue square is left of a red star",
        "A red circle is left of a red star", "A red star is right of a red circle",
    }
    assert first in allowed


@pytest.mark.parametrize("shape", scenes.SHAPE_NAMES)
def test_every_shape_is_filled_at_its_centre(shape):
    scene = Scene(90, 90, "black", (_shape(shape, "yellow", "small", 1, 1, 90, 90),))
    assert scenes.render_scene(scene).getpixel((45, 45)) == PALETTE["yellow"]
