"""Multi-scale media: one scale bucket per micro-batch, drawn by a seeded schedule (``data.multiscale``).

The seed trains on image scales 128-512, video scales 128-384 and 8-32 frames, picking the size per
batch (random, progressive or curriculum). Here a **bucket** is (image scale, video scale, frame
count); every micro-batch draws one, and every image and video that an encoder reads in that
micro-batch is brought to it: images to ``scale x scale``, video frames to ``scale x scale`` and the
clip to ``frames`` frames. So media shapes are static within a micro-batch (one tensor shape per
medium: no padding inside the encoders, one compiled shape per bucket).

**The bucket of micro-batch k** (k counts a DP rank's micro-batches from the start of the stage's
loader: consumed batch k came from worker ``k % W`` as its ``k // W``-th batch, ``loader.py``) is a
pure function of (``seed``, k): no state. A resumed loader knows k from its saved per-worker batch
counts, so it draws exactly the buckets the uninterrupted run would; and every DP rank's k-th
micro-batch has the same bucket (k does not depend on the rank), so the ranks of one step do the
same encoder work.

* ``random``       each axis independently by its probabilities: ``numpy.random.default_rng([seed, k])``
                   gives one uniform number per axis, inverted through the axis's cumulative
                   probabilities;
* ``progressive``  axis value ``i = floor(n * k / K)`` of its sorted list (capped at the last): the
                   smallest scale for the first 1/n of the schedule, then the next, up to the largest;
* ``curriculum``   the phase holding ``k / K`` (``phases[j].until``), random within the phase's subset.

``K`` is the schedule length in micro-batches (``schedule_batches``, or the stage's). Beyond it the
last value / phase holds.

**Why the packer does not care.** A medium's placeholder span in the token stream is fixed per
medium (``data.image_tokens``, ``data.video_tokens``: the Perceiver projector always emits that many
tokens, whatever the resolution and frame count), so a bucket changes pixel shapes only; the
token rows, labels and spans are those of the run without buckets. Audio has no bucket.

**What is resized.** Encoder inputs only (``is_target`` False). Generation targets keep their
prepared size: the generators have their own pixel multiples (``image_gen``/``video_gen``) and
latent shapes, which a 14-pixel image scale would not respect.

Resampling is PIL's bicubic (as ``xoron prep``), frames are picked as prep picks them
(``floor((i + 0.5) * n / frames)``: evenly, a short clip repeats frames). ``fit`` (how a non-square
medium meets a square bucket): ``pad`` keeps the aspect ratio (longer side to the scale, the shorter
``round(short * scale / long)``, centred on black), ``crop`` the centred square, ``squash`` ignores
the aspect. Note the vision tower with ``vision.resize: native`` re-grids every image to its
``max_patches`` budget, so the image scale sets the detail an image carries, not the tower's token
count; the video encoder (``video.frame_encoder: own``) keeps a frame's size within
[min_resolution, max_resolution] and at most ``max_frames`` frames, so the video bucket sets its
token count (frames x (scale / patch)²), which the planner counts at the largest bucket
(``xoron_dist.plan.memory.media_activation_bytes``). With ``frame_encoder: tower`` the span stays
``video_tokens`` tokens whatever the bucket: a clip of T frames gives ``video_tokens / T`` tokens per
frame (the compressor's queries resampled to that count), so every bucket's T must divide
``video_tokens`` (``xoron_dist.model.video.tower_clip_sizes`` checks it).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from xoron_dist.config.run import MultiScaleConfig
from xoron_dist.data.batch import Allocate, BatchBlock, allocate_local
from xoron_dist.data.packing import Document, MediaSpan
from xoron_dist.data.stream import SlotStream
from xoron_dist.utils.typed_config import field_error

RESAMPLING = Image.Resampling.BICUBIC  # what xoron prep resizes with
AXES = (("image_scales", "image_probabilities"), ("video_scales", "video_probabilities"),
        ("video_frames", "frame_probabilities"))


@dataclass(frozen=True)
class Bucket:
    """The media shapes of one micro-batch: images (scale, scale, 3), videos (frames, scale, scale, 3)."""

    image_scale: int
    video_scale: int
    video_frames: int


class ScaleSchedule:
    """``bucket(k)``: the bucket of micro-batch ``k`` (see the module docstring).

    ``total_batches``: the schedule length K when ``cfg.schedule_batches`` is 0 (the stage's
    micro-batches per rank); progressive and curriculum need one of the two.
    """

    def __init__(self, cfg: MultiScaleConfig, total_batches: int | None = None,
                 where: str = "data.multiscale") -> None:
        cfg.validate(where)
        self.cfg, self.where = cfg, where
        self.total = cfg.schedule_batches or total_batches or 0
        if cfg.strategy != "random" and self.total <= 0:
            raise field_error(f"{where}.schedule_batches", cfg.schedule_batches,
                              f"strategy {cfg.strategy} needs the schedule's length in micro-batches per rank; set it "
                              "(0 only works where the trainer passes the stage's length)")
        # per axis: values sorted ascending, and their probabilities (uniform when none are given)
        self.values: list[list[int]] = []
        self.weights: list[np.ndarray] = []
        for axis, probs in AXES:
            values, weights = getattr(cfg, axis), getattr(cfg, probs)
            weights = np.asarray(weights or [1.0] * len(values), dtype=np.float64)
            order = np.argsort(values, kind="stable")
            self.values.append([int(values[i]) for i in order])
            self.weights.append(weights[order])
        # curriculum: per phase and axis, the cumulative probabilities over the phase's subset
        self.phase_ends = [phase.until for phase in cfg.phases]
        self.phase_cdfs: list[list[np.ndarray]] = []
        for j, phase in enumerate(cfg.phases):
            cdfs = []
            for a, (axis, probs) in enumerate(AXES):
                allowed = set(getattr(phase, axis) or self.values[a])
                mask = np.array([v in allowed for v in self.values[a]])
                w = np.where(mask, self.weights[a], 0.0)
                if w.sum() <= 0:
                    raise field_error(f"{where}.phases[{j}].{axis}", getattr(phase, axis),
                                      f"every value of this phase has probability 0 in {where}.{probs}")
                cdfs.append(np.cumsum(w / w.sum()))
            self.phase_cdfs.append(cdfs)
        self.cdfs = [np.cumsum(w / w.sum()) for w in self.weights]

    def bucket(self, index: int) -> Bucket:
        """The bucket of micro-batch ``index`` (>= 0)."""
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        strategy = self.cfg.strategy
        if strategy == "progressive":
            picks = [min(len(v) - 1, len(v) * index // self.total) for v in self.values]
        else:
            cdfs = self.cdfs
            if strategy == "curriculum":
                phase = min(bisect_right(self.phase_ends, index / self.total), len(self.phase_ends) - 1)
                cdfs = self.phase_cdfs[phase]
            u = np.random.default_rng([self.cfg.seed, index]).random(len(AXES))
            # side="right": a value of probability 0 (a flat step of the CDF) is never chosen
            picks = [min(int(np.searchsorted(cdf, x, side="right")), len(cdf) - 1)
                     for cdf, x in zip(cdfs, u, strict=True)]
        return Bucket(*(values[i] for values, i in zip(self.values, picks, strict=True)))

    def largest(self) -> Bucket:
        """The largest bucket any micro-batch can draw (what memory must hold)."""
        return largest_bucket(self.cfg)


def largest_bucket(cfg: MultiScaleConfig) -> Bucket:
    """The largest value of each axis a micro-batch can draw (a curriculum: within its phases)."""
    return Bucket(*cfg.largest())


# --------------------------------------------------------------------------- resizing


def fit_image(pixels: np.ndarray, scale: int, fit: str) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (scale, scale, 3) by ``fit`` (pad | crop | squash)."""
    height, width = pixels.shape[:2]
    if (height, width) == (scale, scale):
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if fit == "squash":
        out = image.resize((scale, scale), RESAMPLING)
    elif fit == "crop":
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        out = image.resize((scale, scale), RESAMPLING, box=box)
    elif fit == "pad":
        longest = max(width, height)
        inner = (max(1, round(width * scale / longest)), max(1, round(height * scale / longest)))
        out = Image.new("RGB", (scale, scale), (0, 0, 0))
        out.paste(image.resize(inner, RESAMPLING), ((scale - inner[0]) // 2, (scale - inner[1]) // 2))
    else:
        raise ValueError(f"unknown fit {fit!r}; expected pad, crop or squash")
    return np.asarray(out, dtype=np.uint8)


def pick_frames(clip_frames: int, frames: int) -> list[int]:
    """``frames`` indices evenly over a clip of ``clip_frames`` (prep's rule: floor((i + 0.5) * n / frames))."""
    return [(2 * i + 1) * clip_frames // (2 * frames) for i in range(frames)]


def fit_video(clip: np.ndarray, frames: int, scale: int, fit: str) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (frames, scale, scale, 3): frames picked evenly, each fitted."""
    if clip.shape[0] == 0:
        raise ValueError("a video without frames cannot be fitted to a bucket")
    picked = pick_frames(clip.shape[0], frames)
    done: dict[int, np.ndarray] = {}  # a short clip repeats frames: resize each once
    for index in picked:
        if index not in done:
            done[index] = fit_image(clip[index], scale, fit)
    return np.stack([done[i] for i in picked])


def fit_medium(medium: str, data: np.ndarray, bucket: Bucket, fit: str) -> np.ndarray:
    """One medium of a micro-batch brought to ``bucket`` (audio passes unchanged)."""
    if medium == "image":
        return fit_image(data, bucket.image_scale, fit)
    if medium == "video":
        return fit_video(data, bucket.video_frames, bucket.video_scale, fit)
    return data


# --------------------------------------------------------------------------- the loader's stream


class ScaledSlotStream(SlotStream):
    """A ``SlotStream`` whose micro-batches carry their bucket's media shapes.

    ``worker``/``workers``: this stream's logical loader worker and the rank's worker count, which
    give its batches' micro-batch indices (``batches * workers + worker``). Batching, collating, the
    state and so the resume stay ``SlotStream``'s: the rows its packer hands out pass through
    ``_scaled_row``, which swaps each encoder input for a copy at the micro-batch's bucket (the
    packer's window keeps the documents as read; the bucket needs nothing but the index).
    """

    def __init__(self, *args: Any, schedule: ScaleSchedule, worker: int, workers: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule, self.worker, self.workers = schedule, worker, workers
        self.bucket: Bucket | None = None  # of the batch being made, then of the last one made
        self._packed_row = self.packer.next_row
        self.packer.next_row = self._scaled_row

    def micro_batch_index(self) -> int:
        """The rank-level index of the batch this stream makes next."""
        return self.batches * self.workers + self.worker

    def next_block(self, allocate: Allocate = allocate_local) -> BatchBlock:
        self.bucket = self.schedule.bucket(self.micro_batch_index())
        return super().next_block(allocate)

    def _scaled_row(self) -> list[Document]:
        row = self._packed_row()
        fit = self.schedule.cfg.fit
        for i, doc in enumerate(row):
            span = doc.media
            if span is not None and not span.is_target and span.medium in ("image", "video"):
                row[i] = _with_media(doc, replace(span, data=fit_medium(span.medium, span.data, self.bucket, fit),
                                                  source=None))
        return row


def _with_media(doc: Document, span: MediaSpan) -> Document:
    return Document(doc.sample_id, doc.length, doc.parts, doc.target_start, doc.target_end, span, doc.ref, doc.runs)


__all__ = ["Bucket", "ScaleSchedule", "ScaledSlotStream", "fit_image", "fit_medium", "fit_video", "largest_bucket",
           "pick_frames"]
