"""Procedural still scenes: coloured shapes on a 3x3 grid, drawn with PIL, and the words for them.

A ``Scene`` is the ground truth; ``render_scene`` draws it and every caption, question and
answer below is computed from it, so the text is right for the pixels by construction. Each
shape sits inside its own grid cell (no overlap), its centre pixel has its exact colour in a
PNG, and its cell names its position ("at the top left", "in the center", ...).

Words follow ``xoron_dist.data.synthetic_text`` (American "color", number words, the same colour
and shape names), so the captions share vocabulary with the tokenizer's corpus.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from xoron_dist.data.synthetic_text import NUMBER_WORDS

# name -> RGB. Hues far apart, so a colour stays nameable after JPEG / H.264 compression.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
COLOR_NAMES = tuple(PALETTE)
# Every shape is filled at its centre (no rings), so the centre pixel shows the shape's colour.
SHAPE_PLURALS = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
    "diamond": "diamonds", "hexagon": "hexagons", "cross": "crosses", "heart": "hearts",
}  # fmt: skip
SHAPE_NAMES = tuple(SHAPE_PLURALS)
# Bounding radius as a fraction of half the cell's shorter side.
SIZE_FRACTIONS = {"small": 0.45, "large": 0.85}
# (column, row) -> where that cell is, as a phrase and as an answer.
CELL_PHRASES = {
    (0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentence(text: str) -> str:
    """Capitalised, with a full stop: the form every caption and answer takes."""
    return capitalize(text) + ("" if text.endswith(".") else ".")


# --------------------------------------------------------------------------- drawing


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) inside a box of half-side ``r`` (not for circles)."""

    def ring(n: int, radii: tuple[float, ...], turn: float = -math.pi / 2) -> list[tuple[float, float]]:
        points = []
        for i in range(n * len(radii)):
            angle = turn + 2 * math.pi * i / (n * len(radii))
            radius = radii[i % len(radii)]
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points

    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # points up; its centroid (inside) is the centre
        return ring(3, (r,))
    if shape == "star":
        return ring(5, (r, 0.45 * r))
    if shape == "hexagon":
        return ring(6, (r,), turn=0.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "cross":
        a = 0.3 * r
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    if shape == "heart":  # the classic parametric heart; its origin lies inside, between the lobes
        s = r / 17.0
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + s * x, cy - s * y + 2.5 * s))
        return points
    raise ValueError(f"unknown shape '{shape}'; known shapes: {', '.join(SHAPE_NAMES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               rgb: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=rgb)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneShape:
    """One shape: its kind, colour and size class, its grid cell, and where it is drawn (pixels)."""

    shape: str
    color: str
    size: str  # "small" | "large"
    column: int
    row: int
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:  # "red circle"
        return f"{self.color} {self.shape}"

    @property
    def phrase(self) -> str:  # "a large red circle"
        return f"{article(self.size)} {self.size} {self.color} {self.shape}"

    @property
    def where(self) -> str:  # "at the top left"
        return CELL_PHRASES[(self.column, self.row)]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[SceneShape, ...]  # in reading order: top row first, left to right


def sample_image_size(rng: random.Random, min_size: int, max_size: int) -> tuple[int, int]:
    """(width, height), each in [min_size, max_size], aspect ratio within 1:2 .. 2:1."""
    width = rng.randint(min_size, max_size)
    height = rng.randint(max(min_size, (width + 1) // 2), min(max_size, 2 * width))
    return width, height


def sample_scene(rng: random.Random, width: int, height: int) -> Scene:
    """1-5 shapes in distinct cells; colours and kinds come from small per-scene pools so that
    counts ("two red shapes") are worth asking about."""
    background = rng.choice(COLOR_NAMES)
    colors = rng.sample([c for c in COLOR_NAMES if c != background], rng.randint(1, 3))
    kinds = rng.sample(SHAPE_NAMES, rng.randint(1, 3))
    count = rng.choices((1, 2, 3, 4, 5), weights=(2, 3, 3, 2, 1))[0]
    cells = sorted(rng.sample(sorted(CELL_PHRASES), count), key=lambda cell: (cell[1], cell[0]))
    cell_w, cell_h = width / 3, height / 3
    shapes = []
    for column, row in cells:
        size = rng.choice(tuple(SIZE_FRACTIONS))
        radius = SIZE_FRACTIONS[size] * min(cell_w, cell_h) / 2
        # Jitter inside the cell, never past its border, so the cell (and the caption) stays right.
        slack_x, slack_y = cell_w / 2 - radius, cell_h / 2 - radius
        cx = (column + 0.5) * cell_w + rng.uniform(-0.5, 0.5) * slack_x
        cy = (row + 0.5) * cell_h + rng.uniform(-0.5, 0.5) * slack_y
        shapes.append(SceneShape(rng.choice(kinds), rng.choice(colors), size, column, row, cx, cy, radius))
    return Scene(width, height, background, tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of (scene.width, scene.height)."""
    image = Image.new("RGB", (scene.width, scene.height), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        draw_shape(draw, s.shape, s.cx, s.cy, s.radius, PALETTE[s.color])
    return image


# --------------------------------------------------------------------------- words


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(color, shape, count) per distinct coloured kind, in order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        counts[(s.color, s.shape)] = counts.get((s.color, s.shape), 0) + 1
    return [(color, shape, n) for (color, shape), n in counts.items()]


def _group_phrase(color: str, shape: str, n: int) -> str:  # "a red circle" / "two red circles"
    if n == 1:
        return f"{article(color)} {color} {shape}"
    return f"{number_word(n)} {color} {SHAPE_PLURALS[shape]}"


def _relation(a: SceneShape, b: SceneShape) -> str:
    """Where ``a`` stands relative to ``b``; cells differ, so one of these holds."""
    if a.column != b.column:
        return "left of" if a.column < b.column else "right of"
    return "above" if a.row < b.row else "below"


def describe_scene(scene: Scene) -> str:
    """Every shape with size, colour, kind and position, and the background."""
    items = [f"{s.phrase} {s.where}" for s in scene.shapes]
    if len(items) == 1:
        return sentence(f"{items[0]}, on {article(scene.background)} {scene.background} background")
    head = f"{number_word(len(items))} shapes on {article(scene.background)} {scene.background} background"
    return sentence(f"{head}: {_join(items)}")


def count_caption(scene: Scene) -> str:
    """What is there and how many, without positions: "Two red circles and a blue square on ..."."""
    phrases = [_group_phrase(*group) for group in _groups(scene)]
    return sentence(f"{_join(phrases)} on {article(scene.background)} {scene.background} background")


def relation_caption(scene: Scene, rng: random.Random) -> str:
    """How two differently named shapes stand to each other, then what is there by count."""
    pairs = [(a, b) for a in scene.shapes for b in scene.shapes if a.name != b.name]
    if not pairs:  # one shape, or all alike ("a red star is left of a red star" says little)
        return describe_scene(scene)
    a, b = rng.choice(pairs)
    first = sentence(f"{article(a.color)} {a.name} is {_relation(a, b)} {article(b.color)} {b.name}")
    return f"{first} {count_caption(scene)}"


def scene_caption(scene: Scene, rng: random.Random) -> str:
    """One of the three caption styles, every one of them true of the image."""
    style = rng.choices(("describe", "count", "relation"), weights=(3, 1, 1))[0]
    if style == "describe":
        return describe_scene(scene)
    if style == "count":
        return count_caption(scene)
    return relation_caption(scene, rng)


def scene_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about the image; the answer is computed from the scene."""
    kind = rng.choice(("count_color", "count_all", "count_shape", "background", "cell", "where", "which_color",
                       "exists"))
    shapes = scene.shapes
    if kind == "count_color":
        color = rng.choice(sorted({s.color for s in shapes}) + [rng.choice(COLOR_NAMES)])
        n = sum(s.color == color for s in shapes)
        return f"How many {color} shapes are there?", sentence(number_word(n))
    if kind == "count_shape":
        shape = rng.choice(SHAPE_NAMES)
        n = sum(s.shape == shape for s in shapes)
        return f"How many {SHAPE_PLURALS[shape]} are there?", sentence(number_word(n))
    if kind == "background":
        return "What color is the background?", sentence(scene.background)
    if kind == "cell":
        cell = rng.choice(sorted(CELL_PHRASES))
        there = [s for s in shapes if (s.column, s.row) == cell]
        return f"What is {CELL_PHRASES[cell]}?", sentence(there[0].phrase if there else "nothing")
    unique = [s for s in shapes if sum(t.name == s.name for t in shapes) == 1]
    if kind == "where" and unique:
        s = rng.choice(unique)
        return f"Where is the {s.name}?", sentence(s.where)
    unique_kind = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
    if kind == "which_color" and unique_kind:
        s = rng.choice(unique_kind)
        return f"What color is the {s.shape}?", sentence(s.color)
    if kind == "exists":
        color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPE_NAMES)
        if rng.random() < 0.5:
            color, shape = rng.choice(shapes).color, rng.choice(shapes).shape
        present = any(s.color == color and s.shape == shape for s in shapes)
        return f"Is there {article(color)} {color} {shape}?", "Yes." if present else "No."
    return "How many shapes are there?", sentence(number_word(len(shapes)))
