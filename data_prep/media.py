"""Decode, check and normalise media: images and video frames to RGB by a resize policy, audio to mono int16.

Every function takes a ``Blob`` (a file on disk from a JSONL manifest, or a member's bytes from a
webdataset tar) and gives the same array for the same bytes, whichever it was. Anything that
cannot be decoded or converted raises ``RejectedSample`` with the reason.

Budgets, checked from the headers before anything is decoded, so one hostile or broken file cannot
take a worker's memory or hours of its time: ``max_pixels`` per image or video frame (PIL reads an
image's size without decoding it; PIL's own decompression-bomb limit, 179 MP, still applies above
ours), ``max_seconds`` per audio clip (soundfile's frame count and rate) and per video (PyAV's
container duration, then frames / rate). A file on disk must resolve inside its Blob's ``root``
(symbolic links followed) before it is opened, listed or even tested for being a folder.

Images (PIL): EXIF orientation applied, alpha composited onto white, converted to RGB, resized
with bicubic resampling (PIL's, which widens its kernel when shrinking, so downscaling is
anti-aliased) by the ``PrepConfig`` policy:

* ``crop``     the centred square of side ``min(w, h)`` scaled to ``size x size`` (shorter side to
               size, centre crop);
* ``pad``      longer side to ``size``, the other ``round(short * size / long)``, centred on a
               black ``size x size`` canvas;
* ``squash``   to ``size x size``, aspect ignored;
* ``max_side`` longer side to ``size``, aspect kept, then both sides rounded *down* to multiples
               of ``patch_multiple`` (at least one patch) and the image scaled straight to that
               size, so the aspect error stays under one patch.
* ``native``   the image's own size within a budget of ``size²`` pixels (as many as a ``size x size``
               square, so as many patches): an image above it shrinks by ``sqrt(size² / (w·h))``,
               aspect kept; one within it keeps its size (never enlarged); then both sides are rounded
               *down* to multiples of ``patch_multiple`` (at least one patch; a sliver so thin that
               its one-patch short side breaks the budget has its long side cut to fit). For
               native-resolution encoders (``vision.resize: native``) and the loader's scale
               buckets (``xoron_dist.data.multiscale``), which then start from the real aspect.

Video: ``frames`` frames at ``floor((i + 0.5) * n / frames)``, i.e. evenly over the clip. A clip
with fewer than ``frames`` frames is *stretched*: the same rule repeats frames (nearest-frame
sampling), and the recorded fps (``frames`` / clip duration) says how fast the sampled frames
play. With ``video_resize: native`` the frame count is native too: a clip keeps its own
``n`` frames up to ``frames`` (``video_frames`` is then the cap; a longer clip is sampled evenly
down to it, a shorter one is never stretched), and each frame is sized as a ``native`` image
within ``video_size²`` pixels. MP4 (any container FFmpeg reads) through PyAV; frame folders through
PIL, frames sorted by file name, all of one size, at the sample's ``fps`` field or ``DEFAULT_FRAME_FPS``.

Audio (soundfile: WAV, FLAC, ...): channels averaged to mono, resampled with
``data_prep.resample.resample_poly``, stored as int16. A clip longer than ``max_audio_seconds``
is rejected, not cut: its transcript would no longer match the audio. A truncated WAV (a partial
copy) is rejected too: libsndfile quietly shortens a file whose data chunk runs past its end (the
frame count it reports is what the file holds, not what the header promised), so the RIFF
header's data size is read here. A cut FLAC fails in libsndfile's decoder and is rejected as
undecodable; truncated AIFF/AU/W64 files are shortened by libsndfile without a trace.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from data_prep.errors import RejectedSample
from data_prep.resample import resample_poly

RESAMPLING = Image.Resampling.BICUBIC
PAD_COLOR = (0, 0, 0)
ALPHA_BACKGROUND = (255, 255, 255, 255)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
DEFAULT_FRAME_FPS = 24.0  # a frame folder carries no timing; the sample's "fps" field overrides this
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1_000, 768_000  # outside: a broken header, not audio we can convert


@dataclass(frozen=True)
class Blob:
    """One media file: a path (JSONL input; ``data`` is None) or a tar member's bytes.

    ``name`` is what messages call it (a JSONL path relative to the data root, or the tar member
    name); ``ext`` is its lower-case extension without the dot. ``root``: the folder ``path`` must
    resolve inside (symbolic links followed); None: anywhere (tar members, ``--allow-outside-root``).
    """

    name: str
    ext: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    root: Path | None = None

    def contained_path(self, what: str) -> Path:
        """``path``, once it is known to resolve inside ``root``."""
        assert self.path is not None
        if self.root is not None:
            real, root = os.path.realpath(self.path), os.path.realpath(self.root)
            if os.path.commonpath([real, root]) != root:
                raise RejectedSample(
                    f"{what} path '{self.name}' leads outside the data root (through '..' or a symbolic link); "
                    "keep media inside the manifest's folder, name a wider one with --data-root, or pass "
                    "--allow-outside-root for a manifest you trust"
                )
        return self.path

    def open(self, what: str) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        path = self.contained_path(what)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise RejectedSample(f"{what} file '{self.name}' not found") from None
        except IsADirectoryError:
            raise RejectedSample(f"{what} '{self.name}' is a folder, expected a file") from None
        except OSError as err:
            raise RejectedSample(f"cannot read {what} file '{self.name}': {err.strerror or err}") from None


@dataclass(frozen=True)
class FrameList:
    """The frames of one video as separate images, in order (``frameNNN.png`` members of a tar)."""

    frames: tuple[Blob, ...]


# --------------------------------------------------------------------------- images


def target_size(width: int, height: int, size: int, policy: str, patch_multiple: int) -> tuple[int, int]:
    """(width, height) an image of ``width x height`` has after resizing by ``policy``."""
    if policy in ("crop", "pad", "squash"):
        return size, size
    if policy == "max_side":
        longest = max(width, height)
        # Integer arithmetic: floor(side * size / longest / patch) patches, at least one.
        w = max(1, width * size // (longest * patch_multiple)) * patch_multiple
        h = max(1, height * size // (longest * patch_multiple)) * patch_multiple
        return w, h
    if policy == "native":
        return native_size(width, height, size * size, patch_multiple)
    raise ValueError(f"unknown resize policy {policy!r}; expected crop, pad, squash, max_side or native")


def native_size(width: int, height: int, max_pixels: int, patch_multiple: int) -> tuple[int, int]:
    """(width, height) of the ``native`` policy: aspect kept, at most ``max_pixels``, never enlarged,
    both sides multiples of ``patch_multiple`` (rounded down, at least one patch)."""
    p = patch_multiple
    if max_pixels < p * p:
        raise ValueError(f"a budget of {max_pixels} pixels holds no {p}x{p} patch")
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w, h = max(1, int(width * scale) // p) * p, max(1, int(height * scale) // p) * p
    # the one-patch floor of a thin sliver can break the budget: cut the long side to fit
    if w * h > max_pixels:
        if w >= h:
            w = max_pixels // (h * p) * p
        else:
            h = max_pixels // (w * p) * p
    return w, h


def resize_image(image: Image.Image, size: int, policy: str, patch_multiple: int) -> Image.Image:
    """Resize an RGB image by ``policy`` (see the module docstring)."""
    w, h = image.size
    if policy == "crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return image.resize((size, size), RESAMPLING, box=box)
    if policy == "pad":
        scale = size / max(w, h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new("RGB", (size, size), PAD_COLOR)
        canvas.paste(image.resize(inner, RESAMPLING), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    target = target_size(w, h, size, policy, patch_multiple)
    if policy == "native" and target == (w, h):
        return image  # already native within the budget: no resampling pass
    return image.resize(target, RESAMPLING)


def _check_pixels(what: str, name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise RejectedSample(
            f"{what} '{name}' is {width}x{height} = {width * height:,} pixels, more than "
            f"data.prep.max_image_pixels = {max_pixels:,} (read from its header, not decoded); "
            "shrink the file or raise the budget"
        )


def load_image(blob: Blob, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode to an upright RGB image (EXIF orientation applied, alpha over white).

    The size comes from the header (``Image.open`` decodes nothing) and is checked against
    ``max_pixels`` before ``load()``.
    """
    with blob.open(what) as f:
        try:
            with warnings.catch_warnings():  # PIL warns from 89 MP on; our budget has decided by then
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)
            _check_pixels(what, blob.name, *image.size, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise RejectedSample(f"cannot decode {what} '{blob.name}': {err}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode_image(blob: Blob, size: int, policy: str, patch_multiple: int, *, max_pixels: int) -> np.ndarray:
    """uint8 (height, width, 3)."""
    return np.asarray(resize_image(load_image(blob, max_pixels), size, policy, patch_multiple), dtype=np.uint8)


# --------------------------------------------------------------------------- video


def frame_indices(clip_frames: int, frames: int) -> list[int]:
    """``frames`` indices evenly over a clip of ``clip_frames``: floor((i + 0.5) * n / frames).

    Distinct when the clip is long enough; repeated (each frame held) when it is shorter.
    """
    return [(2 * i + 1) * clip_frames // (2 * frames) for i in range(frames)]


def frames_to_keep(clip_frames: int, frames: int, policy: str) -> int:
    """Frames a clip of ``clip_frames`` gives: ``frames``, or with ``native`` its own count capped at ``frames``."""
    return min(frames, clip_frames) if policy == "native" else frames


def decode_video(
    media: Blob | FrameList, frames: int, size: int, policy: str, patch_multiple: int, fps: float | None, *,
    max_pixels: int, max_seconds: float,
) -> tuple[np.ndarray, float]:
    """uint8 (frames, height, width, 3) and the fps of the sampled frames.

    ``media``: a frame folder (a Blob whose path is a directory), a FrameList, or a video file.
    ``fps`` is the source rate of a frame folder/list (None: ``DEFAULT_FRAME_FPS``); a video
    file's own rate is used for it. ``max_pixels`` bounds each frame, ``max_seconds`` the clip.
    """
    if isinstance(media, Blob) and media.path is not None and media.contained_path("video").is_dir():
        frames_found = _folder_frames(media)
        if not frames_found:
            raise RejectedSample(f"video frame folder '{media.name}' holds no png/jpg/jpeg frames")
        media = FrameList(frames_found)
    if isinstance(media, FrameList):
        return _decode_frame_list(media, frames, size, policy, patch_multiple, fps or DEFAULT_FRAME_FPS,
                                  max_pixels, max_seconds)
    return _decode_video_file(media, frames, size, policy, patch_multiple, max_pixels, max_seconds)


def _check_seconds(what: str, name: str, seconds: float, max_seconds: float, setting: str, how: str) -> None:
    if seconds > max_seconds:
        raise RejectedSample(
            f"{what} '{name}' is {seconds:.2f} s long, more than {setting}={max_seconds:g} ({how}); "
            f"cut it into shorter clips or raise data.prep.{setting}"
        )


def _folder_frames(folder: Blob) -> tuple[Blob, ...]:
    assert folder.path is not None
    found = sorted(
        p.name for p in folder.path.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    # each frame keeps the folder's root: a frame that is a link out of the root is refused when opened
    return tuple(Blob(f"{folder.name}/{name}", Path(name).suffix.lower().lstrip("."), folder.path / name,
                      root=folder.root) for name in found)


def _stack(images: list[Image.Image], size: int, policy: str, patch_multiple: int, name: str) -> np.ndarray:
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise RejectedSample(f"video '{name}': frames differ in size ({sorted(sizes)})")
    return np.stack([np.asarray(resize_image(im, size, policy, patch_multiple), dtype=np.uint8) for im in images])


def _decode_frame_list(
    media: FrameList, frames: int, size: int, policy: str, patch_multiple: int, fps: float, max_pixels: int,
    max_seconds: float,
) -> tuple[np.ndarray, float]:
    if not media.frames:
        raise RejectedSample("the video has no frames")
    name = media.frames[0].name.rsplit("/", 1)[0]
    _check_seconds("video", name, len(media.frames) / fps, max_seconds, "max_video_seconds",
                  f"{len(media.frames)} frames at {fps:g} fps")
    loaded: dict[int, Image.Image] = {}  # a short clip repeats frames: decode each once
    images = []
    frames = frames_to_keep(len(media.frames), frames, policy)
    for index in frame_indices(len(media.frames), frames):
        if index not in loaded:
            loaded[index] = load_image(media.frames[index], max_pixels, "video frame")
        images.append(loaded[index])
    return _stack(images, size, policy, patch_multiple, name), frames * fps / len(media.frames)


def _decode_video_file(
    blob: Blob, frames: int, size: int, policy: str, patch_multiple: int, max_pixels: int, max_seconds: float
) -> tuple[np.ndarray, float]:
    import av  # PyAV: heavy, and only video samples need it

    def open_stream(f: BinaryIO):
        container = av.open(f)
        if not container.streams.video:
            container.close()
            raise RejectedSample(f"video '{blob.name}' has no video stream")
        return container, container.streams.video[0]

    try:
        with blob.open("video") as f:
            container, stream = open_stream(f)
            with container:
                _check_pixels("video", blob.name, stream.codec_context.width, stream.codec_context.height,
                             max_pixels)
                if container.duration:  # in av.time_base units (microseconds)
                    _check_seconds("video", blob.name, container.duration / av.time_base, max_seconds,
                                  "max_video_seconds", "the container's duration, read before decoding")
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                clip = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if not clip:
            raise RejectedSample(f"video '{blob.name}' has no frames")
        if rate:  # a header without a duration: the frame count (demuxed, not decoded) tells
            _check_seconds("video", blob.name, clip / float(rate), max_seconds, "max_video_seconds",
                          f"{clip} frames at {float(rate):g} fps, counted before decoding")
        wanted = frames_to_keep(clip, frames, policy)
        images, decoded = _decode_picked(blob, open_stream, frame_indices(clip, wanted))
        if images is None:  # the header promised more frames than the stream holds
            clip = decoded
            if not clip:
                raise RejectedSample(f"video '{blob.name}' has no decodable frames")
            wanted = frames_to_keep(clip, frames, policy)
            images, _ = _decode_picked(blob, open_stream, frame_indices(clip, wanted))
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise RejectedSample(f"cannot decode video '{blob.name}': {err}") from None
    if not rate:
        raise RejectedSample(f"video '{blob.name}' has no frame rate in its header")
    return _stack(images, size, policy, patch_multiple, blob.name), wanted * float(rate) / clip


def _decode_picked(blob: Blob, open_stream, picked: list[int]) -> tuple[list[Image.Image] | None, int]:
    """The frames at ``picked`` (sorted, may repeat), or (None, frames decoded) when the stream ends early."""
    wanted = set(picked)
    found: dict[int, Image.Image] = {}
    decoded = 0
    with blob.open("video") as f:
        container, stream = open_stream(f)
        with container:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    found[index] = frame.to_image()
                    if len(found) == len(wanted):
                        return [found[i] for i in picked], decoded
    return None, decoded


# --------------------------------------------------------------------------- audio


def decode_audio(blob: Blob, sample_rate: int, max_seconds: float) -> np.ndarray:
    """int16 mono (samples,) at ``sample_rate``."""
    import soundfile

    with blob.open("audio") as f:
        declared = _wav_data_chunk(f)
        f.seek(0)
        try:
            with soundfile.SoundFile(f) as sound:
                rate, frames, channels = sound.samplerate, sound.frames, sound.channels
                _check_audio_header(blob.name, rate, frames, channels, max_seconds, declared)
                data = sound.read(frames, dtype="float64", always_2d=True)  # within the budget: checked above
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            detail = getattr(err, "error_string", None) or str(err)  # libsndfile's words, without the file object
            raise RejectedSample(f"cannot decode audio '{blob.name}': {detail}") from None
    if not np.isfinite(data).all():
        raise RejectedSample(f"audio '{blob.name}' holds NaN or infinite samples")
    mono = data.mean(axis=1)
    if rate != sample_rate:
        mono = resample_poly(mono, int(rate), sample_rate)
    return to_int16(mono)


def _check_audio_header(name: str, rate: int, frames: int, channels: int, max_seconds: float,
                        declared: tuple[int, int] | None) -> None:
    """Everything the header tells, before a sample is decoded."""
    if not MIN_AUDIO_RATE <= rate <= MAX_AUDIO_RATE:
        raise RejectedSample(
            f"audio '{name}' has sample rate {rate} Hz, which cannot be converted "
            f"(supported: {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz)"
        )
    if declared is not None and declared[0] > declared[1]:
        raise RejectedSample(
            f"audio '{name}' is truncated: its WAV header promises {declared[0]:,} bytes of samples, the file "
            f"holds {declared[1]:,} ({100 * declared[1] / declared[0]:.0f}%); copy the whole file again"
        )
    if channels < 1 or frames == 0:
        raise RejectedSample(f"audio '{name}' is empty ({frames} samples, {channels} channels)")
    _check_seconds("audio", name, frames / rate, max_seconds, "max_audio_seconds",
                   "read from its header; long clips are rejected, not cut, so the text still matches the audio")


_UNKNOWN_RIFF_SIZE = 0xFFFFFFFF  # streaming writers put this where they could not know the size


def _wav_data_chunk(f: BinaryIO) -> tuple[int, int] | None:
    """(bytes the RIFF WAVE header gives its ``data`` chunk, bytes the file holds from that chunk's
    start), or None for a file that is not RIFF WAVE or whose data size was left unknown.

    Needed because libsndfile clamps a truncated WAV's frame count to what the file holds.
    """
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
        return None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        size = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            start = f.tell()
            return None if size == _UNKNOWN_RIFF_SIZE else (size, f.seek(0, io.SEEK_END) - start)
        f.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to an even size


def to_int16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> little-endian int16, scaled by 32768 (int16 input at the target rate
    round-trips exactly)."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
