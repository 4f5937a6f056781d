"""Deterministic media writers: PNG/JPEG (PIL), frame folders and MP4 (PyAV), WAV (soundfile).

Same pixels or samples in, same bytes out, on a given install:

* PNG and JPEG: PIL writes no timestamps; fixed compression and quality settings.
* MP4: libx264 from the ffmpeg bundled with PyAV at constant quality (``crf=18``), no creation
  time, ``threads=1`` (x264's frame threading makes the bitstream depend on the core count) and
  ``mbtree=0`` (with macroblock-tree rate control, clips of 32x32 pixels sometimes encoded to other
  bytes from one call to the next, as if it read uninitialised memory at tiny sizes; without it,
  hundreds of repeated encodes at 16-128 px were identical). The bytes hold for the same PyAV
  build; another x264 may encode differently (it writes its version into the stream), so
  compare decoded frames across installs.
* WAV: integer PCM is plain; for float WAVs libsndfile writes a PEAK chunk stamped with the wall
  clock, which ``write_wav`` zeroes.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

MP4_CODEC = "libx264"
MP4_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
JPEG_QUALITY = 90


def write_image(image: Image.Image, path: Path) -> None:
    """PNG or JPEG, by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, format="PNG", compress_level=6)
    elif path.suffix in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        raise ValueError(f"{path}: write_image writes .png, .jpg or .jpeg files")


def frame_name(index: int, frames: int) -> str:
    """``frame000.png``; wider when a clip has more than 1000 frames, so names still sort in order."""
    return f"frame{index:0{max(3, len(str(frames - 1)))}d}.png"


def write_frame_folder(frames: list[Image.Image], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(folder / frame_name(i, len(frames)), format="PNG", compress_level=6)


def write_mp4(frames: list[Image.Image], path: Path, fps: int) -> None:
    """H.264 in MP4, yuv420p, exactly ``len(frames)`` frames at ``fps`` (even width and height needed)."""
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even frame sides, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(MP4_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(MP4_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds (B-frames, lookahead)


def write_wav(samples: np.ndarray, path: Path, rate: int, subtype: str) -> None:
    """``samples``: float in [-1, 1], (samples,) or (samples, channels); ``subtype``: PCM_16 | FLOAT | ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, subtype=subtype, format="WAV")
    if subtype in ("FLOAT", "DOUBLE"):
        _zero_peak_timestamp(path)


def _zero_peak_timestamp(path: Path) -> None:
    """Zero the time stamp of the PEAK chunk (id, size, version, *timestamp*, ...) that libsndfile
    adds to float WAVs, so that the file depends on the samples only."""
    data = bytearray(path.read_bytes())
    offset = 12  # after "RIFF", size, "WAVE"
    while offset + 8 <= len(data):
        chunk, size = bytes(data[offset:offset + 4]), int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"PEAK":
            data[offset + 12:offset + 16] = bytes(4)
            path.write_bytes(bytes(data))
            return
        if chunk == b"data":
            return
        offset += 8 + size + (size & 1)
