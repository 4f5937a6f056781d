"""Decode, check and normalise media: images and video frames to fixed-size RGB, audio to mono int16.

Every function takes a ``Blob`` (a file on disk from a JSONL manifest, or a member's bytes from a
webdataset tar) and gives the same array for the same bytes, whichever it was. Anything that
cannot be decoded or converted raises ``RejectedSample`` with the reason.

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

Video: ``frames`` frames at ``floor((i + 0.5) * n / frames)``, i.e. evenly over the clip. A clip
with fewer than ``frames`` frames is *stretched*: the same rule repeats frames (nearest-frame
sampling), and the recorded fps (``frames`` / clip duration) says how fast the sampled frames
play. MP4 (any container FFmpeg reads) through PyAV; frame folders through PIL, frames sorted by
file name, all of one size, at the sample's ``fps`` field or ``DEFAULT_FRAME_FPS``.

Audio (soundfile: WAV, FLAC, ...): channels averaged to mono, resampled with
``data_prep.resample.resample_poly``, stored as int16. A clip longer than ``max_audio_seconds``
is rejected, not cut: its transcript would no longer match the audio.
"""

from __future__ import annotations

import io
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

    ``name`` is what the input called it (the JSONL's relative path, or the tar member name),
    for messages; ``ext`` is its lower-case extension without the dot.
    """

    name: str
    ext: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def open(self, what: str) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise RejectedSample(f"{what} file '{self.name}' not found (looked for {self.path})") from None
        except IsADirectoryError:
            raise RejectedSample(f"{what} '{self.name}' is a folder, expected a file ({self.path})") from None
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
    raise ValueError(f"unknown resize policy {policy!r}; expected crop, pad, squash or max_side")


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
    return image.resize(target_size(w, h, size, policy, patch_multiple), RESAMPLING)


def load_image(blob: Blob, what: str = "image") -> Image.Image:
    """Decode to an upright RGB image (EXIF orientation applied, alpha over white)."""
    with blob.open(what) as f:
        try:
            image = Image.open(f)
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise RejectedSample(f"cannot decode {what} '{blob.name}': {err}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode_image(blob: Blob, size: int, policy: str, patch_multiple: int) -> np.ndarray:
    """uint8 (height, width, 3)."""
    return np.asarray(resize_image(load_image(blob), size, policy, patch_multiple), dtype=np.uint8)


# --------------------------------------------------------------------------- video


def frame_indices(clip_frames: int, frames: int) -> list[int]:
    """``frames`` indices evenly over a clip of ``clip_frames``: floor((i + 0.5) * n / frames).

    Distinct when the clip is long enough; repeated (each frame held) when it is shorter.
    """
    return [(2 * i + 1) * clip_frames // (2 * frames) for i in range(frames)]


def decode_video(
    media: Blob | FrameList, frames: int, size: int, policy: str, patch_multiple: int, fps: float | None
) -> tuple[np.ndarray, float]:
    """uint8 (frames, height, width, 3) and the fps of the sampled frames.

    ``media``: a frame folder (a Blob whose path is a directory), a FrameList, or a video file.
    ``fps`` is the source rate of a frame folder/list (None: ``DEFAULT_FRAME_FPS``); a video
    file's own rate is used for it.
    """
    if isinstance(media, Blob) and media.path is not None and media.path.is_dir():
        frames_found = _folder_frames(media)
        if not frames_found:
            raise RejectedSample(f"video frame folder '{media.name}' holds no png/jpg/jpeg frames")
        media = FrameList(frames_found)
    if isinstance(media, FrameList):
        return _decode_frame_list(media, frames, size, policy, patch_multiple, fps or DEFAULT_FRAME_FPS)
    return _decode_video_file(media, frames, size, policy, patch_multiple)


def _folder_frames(folder: Blob) -> tuple[Blob, ...]:
    assert folder.path is not None
    found = sorted(
        p.name for p in folder.path.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    return tuple(Blob(f"{folder.name}/{name}", Path(name).suffix.lower().lstrip("."), folder.path / name)
                 for name in found)


def _stack(images: list[Image.Image], size: int, policy: str, patch_multiple: int, name: str) -> np.ndarray:
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise RejectedSample(f"video '{name}': frames differ in size ({sorted(sizes)})")
    return np.stack([np.asarray(resize_image(im, size, policy, patch_multiple), dtype=np.uint8) for im in images])


def _decode_frame_list(
    media: FrameList, frames: int, size: int, policy: str, patch_multiple: int, fps: float
) -> tuple[np.ndarray, float]:
    if not media.frames:
        raise RejectedSample("the video has no frames")
    name = media.frames[0].name.rsplit("/", 1)[0]
    loaded: dict[int, Image.Image] = {}  # a short clip repeats frames: decode each once
    images = []
    for index in frame_indices(len(media.frames), frames):
        if index not in loaded:
            loaded[index] = load_image(media.frames[index], "video frame")
        images.append(loaded[index])
    return _stack(images, size, policy, patch_multiple, name), frames * fps / len(media.frames)


def _decode_video_file(
    blob: Blob, frames: int, size: int, policy: str, patch_multiple: int
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
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                clip = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if not clip:
            raise RejectedSample(f"video '{blob.name}' has no frames")
        images, decoded = _decode_picked(blob, open_stream, frame_indices(clip, frames))
        if images is None:  # the header promised more frames than the stream holds
            clip = decoded
            if not clip:
                raise RejectedSample(f"video '{blob.name}' has no decodable frames")
            images, _ = _decode_picked(blob, open_stream, frame_indices(clip, frames))
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise RejectedSample(f"cannot decode video '{blob.name}': {err}") from None
    if not rate:
        raise RejectedSample(f"video '{blob.name}' has no frame rate in its header")
    return _stack(images, size, policy, patch_multiple, blob.name), frames * float(rate) / clip


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
        try:
            data, rate = soundfile.read(f, dtype="float64", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            detail = getattr(err, "error_string", None) or str(err)  # libsndfile's words, without the file object
            raise RejectedSample(f"cannot decode audio '{blob.name}': {detail}") from None
    if not MIN_AUDIO_RATE <= rate <= MAX_AUDIO_RATE:
        raise RejectedSample(
            f"audio '{blob.name}' has sample rate {rate} Hz, which cannot be converted "
            f"(supported: {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz)"
        )
    if data.shape[1] < 1 or data.shape[0] == 0:
        raise RejectedSample(f"audio '{blob.name}' is empty ({data.shape[0]} samples, {data.shape[1]} channels)")
    seconds = data.shape[0] / rate
    if seconds > max_seconds:
        raise RejectedSample(
            f"audio '{blob.name}' is {seconds:.2f} s long, more than max_audio_seconds={max_seconds:g} "
            "(long clips are rejected, not cut, so the text still matches the audio)"
        )
    if not np.isfinite(data).all():
        raise RejectedSample(f"audio '{blob.name}' holds NaN or infinite samples")
    mono = data.mean(axis=1)
    if rate != sample_rate:
        mono = resample_poly(mono, int(rate), sample_rate)
    return to_int16(mono)


def to_int16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> little-endian int16, scaled by 32768 (int16 input at the target rate
    round-trips exactly)."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
