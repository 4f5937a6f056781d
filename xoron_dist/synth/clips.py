"""Procedural video clips: shapes that slide, bounce, grow, shrink or change colour, and their captions.

A ``Clip`` is the ground truth. Its motion is simulated frame by frame (``trajectory``), the
frames are drawn from that simulation, and the caption is written from the same simulation (the
direction, the speed class, every edge a shape bounces off), so the words match the pixels.

Speeds are per frame, in fractions of the frame side: "slowly" 0.02, "quickly" 0.06, a factor
three apart, so the class is visible between any two consecutive frames whatever the clip length.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from xoron_dist.synth.scenes import (
    CELL_PHRASES,
    COLOR_NAMES,
    PALETTE,
    SHAPE_NAMES,
    article,
    draw_shape,
    number_word,
    sentence,
)

SPEEDS = {"slowly": 0.02, "quickly": 0.06}
# (sign of dx, sign of dy) -> where that heads; y grows downwards.
DIRECTIONS = {
    (1, 0): "to the right", (-1, 0): "to the left", (0, -1): "up", (0, 1): "down",
    (1, -1): "up and to the right", (-1, -1): "up and to the left",
    (1, 1): "down and to the right", (-1, 1): "down and to the left",
}  # fmt: skip
MOTIONS = ("move", "still", "grow", "shrink", "recolor")


@dataclass(frozen=True)
class Mover:
    """One shape of a clip. ``motion``: move | still | grow | shrink | recolor.

    ``direction`` and ``speed`` only for ``move``; ``end_color`` (changed at frame
    ``frames // 2``) for ``recolor`` and for some movers; ``radius`` is the start size, and
    grow/shrink end at ``end_radius``.
    """

    shape: str
    color: str
    motion: str
    x: float
    y: float
    radius: float
    end_radius: float
    direction: tuple[int, int] = (0, 0)
    speed: str | None = None
    end_color: str | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Clip:
    size: int  # frames are size x size
    frames: int
    background: str
    movers: tuple[Mover, ...]


@dataclass(frozen=True)
class Track:
    """Where a mover is in every frame, and the bounces on the way (frame, "right edge")."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    radii: tuple[float, ...]
    bounces: tuple[tuple[int, str], ...]


def _cell_of(x: float, y: float, size: int) -> tuple[int, int]:
    return min(int(3 * x / size), 2), min(int(3 * y / size), 2)


def sample_clip(rng: random.Random, size: int, min_frames: int, max_frames: int) -> Clip:
    """One or two shapes with distinct names; most move, the rest stay, grow, shrink or recolour."""
    frames = rng.randint(min_frames, max_frames)
    background = rng.choice(COLOR_NAMES)
    names: set[tuple[str, str]] = set()
    movers = []
    for _ in range(rng.choices((1, 2), weights=(7, 3))[0]):
        while True:  # a distinct name per clip, so "the red circle" names one shape
            color = rng.choice([c for c in COLOR_NAMES if c != background])
            shape = rng.choice(SHAPE_NAMES)
            if (color, shape) not in names:
                names.add((color, shape))
                break
        motion = rng.choices(MOTIONS, weights=(12, 2, 2, 2, 3))[0]
        radius = rng.uniform(0.08, 0.12) * size
        end_radius = radius
        if motion in ("grow", "shrink"):
            small, large = 0.06 * size, 0.16 * size
            radius, end_radius = (small, large) if motion == "grow" else (large, small)
        # Start near the middle of a grid cell, so "starts at the top left" is plain to see.
        column, row = rng.choice(sorted(CELL_PHRASES))
        reach = max(radius, end_radius)
        x = min(max((column + 0.5 + rng.uniform(-0.15, 0.15)) * size / 3, reach), size - reach)
        y = min(max((row + 0.5 + rng.uniform(-0.15, 0.15)) * size / 3, reach), size - reach)
        direction, speed, end_color = (0, 0), None, None
        if motion == "move":
            direction = rng.choice(sorted(DIRECTIONS))
            speed = rng.choice(sorted(SPEEDS))
        if motion == "recolor" or (motion == "move" and rng.random() < 0.25):
            end_color = rng.choice([c for c in COLOR_NAMES if c not in (background, color)])
        movers.append(Mover(shape, color, motion, x, y, radius, end_radius, direction, speed, end_color))
    return Clip(size, frames, background, tuple(movers))


def trajectory(mover: Mover, frames: int, size: int) -> Track:
    """Simulate the mover: straight lines at constant speed, mirrored at the frame's edges."""
    step = SPEEDS[mover.speed] * size if mover.speed else 0.0
    norm = math.hypot(*mover.direction) or 1.0
    vx, vy = step * mover.direction[0] / norm, step * mover.direction[1] / norm
    lo, hi = mover.radius, size - mover.radius
    x, y = mover.x, mover.y
    xs, ys, bounces = [x], [y], []
    for frame in range(1, frames):
        x, y = x + vx, y + vy
        hit = []
        if y < lo or y > hi:  # speeds are far below the free span, so one mirror per frame suffices
            hit.append("top" if y < lo else "bottom")
            y, vy = (2 * lo - y, -vy) if y < lo else (2 * hi - y, -vy)
        if x < lo or x > hi:
            hit.append("left" if x < lo else "right")
            x, vx = (2 * lo - x, -vx) if x < lo else (2 * hi - x, -vx)
        if hit:
            bounces.append((frame, " ".join(hit) + (" corner" if len(hit) == 2 else " edge")))
        xs.append(x)
        ys.append(y)
    last = max(frames - 1, 1)
    radii = tuple(mover.radius + (mover.end_radius - mover.radius) * f / last for f in range(frames))
    return Track(tuple(xs), tuple(ys), radii, tuple(bounces))


def color_at(mover: Mover, frame: int, frames: int) -> str:
    return mover.end_color if mover.end_color and frame >= frames // 2 else mover.color


def render_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames, each an RGB image of (clip.size, clip.size)."""
    tracks = [trajectory(m, clip.frames, clip.size) for m in clip.movers]
    images = []
    for frame in range(clip.frames):
        image = Image.new("RGB", (clip.size, clip.size), PALETTE[clip.background])
        draw = ImageDraw.Draw(image)
        for mover, track in zip(clip.movers, tracks, strict=True):
            rgb = PALETTE[color_at(mover, frame, clip.frames)]
            draw_shape(draw, mover.shape, track.xs[frame], track.ys[frame], track.radii[frame], rgb)
        images.append(image)
    return images


# --------------------------------------------------------------------------- words


def _flip(direction: tuple[int, int], edge: str) -> tuple[int, int]:
    dx, dy = direction
    if "left" in edge or "right" in edge:
        dx = -dx
    if "top" in edge or "bottom" in edge:
        dy = -dy
    return dx, dy


def describe_mover(mover: Mover, clip: Clip) -> str:
    """One sentence for one shape: "A blue circle starts on the left and moves slowly to the right."."""
    track = trajectory(mover, clip.frames, clip.size)
    where = CELL_PHRASES[_cell_of(mover.x, mover.y, clip.size)]
    subject = f"{article(mover.color)} {mover.name}"
    recolor = f"changes color from {mover.color} to {mover.end_color}" if mover.end_color else ""
    if mover.motion == "move":
        text = f"{subject} starts {where} and moves {mover.speed} {DIRECTIONS[mover.direction]}"
        if len(track.bounces) == 1:
            edge = track.bounces[0][1]
            text += f", bounces off the {edge} and moves {DIRECTIONS[_flip(mover.direction, edge)]}"
        elif track.bounces:
            text += ", bouncing off the " + ", then the ".join(edge for _, edge in track.bounces)
        return sentence(text + (f", and {recolor}" if recolor else ""))
    if mover.motion == "grow":
        return sentence(f"{subject} {where} grows bigger")
    if mover.motion == "shrink":
        return sentence(f"{subject} {where} gets smaller")
    if mover.motion == "recolor":
        return sentence(f"{subject} stays {where} and {recolor}")
    return sentence(f"{subject} stays still {where}")


def clip_caption(clip: Clip) -> str:
    parts = [describe_mover(m, clip) for m in clip.movers]
    return " ".join(parts + [sentence(f"the background is {clip.background}")])


def clip_question(clip: Clip, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about the clip; the answer is computed from the simulation."""
    mover = rng.choice(clip.movers)
    kind = rng.choice(("count", "direction", "bounce", "color", "size"))
    if kind == "direction":
        if mover.motion != "move":
            return f"Which way does the {mover.name} move?", "It does not move."
        return f"Which way does the {mover.name} move at first?", sentence(DIRECTIONS[mover.direction])
    if kind == "bounce":
        bounces = trajectory(mover, clip.frames, clip.size).bounces
        answer = f"Yes, off the {bounces[0][1]} first." if bounces else "No."
        return f"Does the {mover.name} bounce?", answer
    if kind == "color" and mover.end_color:
        return f"What color does the {mover.name} change to?", sentence(mover.end_color)
    if kind == "size" and mover.motion in ("grow", "shrink"):
        return f"Does the {mover.name} get bigger or smaller?", "Bigger." if mover.motion == "grow" else "Smaller."
    return "How many shapes are there?", sentence(number_word(len(clip.movers)))
