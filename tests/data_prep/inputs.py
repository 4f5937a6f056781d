"""Small raw inputs for the ``xoron prep`` tests: media files, a JSONL of every kind, the same as a tar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from xoron_dist.config import PrepConfig, XoronConfig

IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE, AUDIO_RATE = 32, 4, 16, 16_000


def tiny_config(**prep: object) -> XoronConfig:
    """The tiny preset with small media sizes and tiny shards/units, so every path is exercised."""
    cfg = XoronConfig.preset("tiny")
    settings = dict(image_size=IMAGE_SIZE, video_frames=VIDEO_FRAMES, video_size=VIDEO_SIZE,
                    audio_sample_rate=AUDIO_RATE, max_audio_seconds=2.0, max_text_tokens=64,
                    shard_bytes=8192, samples_per_unit=3, patch_multiple=8)
    settings.update(prep)
    cfg.data.prep = PrepConfig(**settings)
    return cfg


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth RGB content (resizing it is well conditioned) with a seed-dependent tint."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    np.full_like(x, (37 * seed) % 256)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def write_mp4(path: Path, frames: int, width: int = 32, height: int = 24, fps: int = 12) -> None:
    """An H.264 clip whose frame i is a flat grey of level 20 * i + 10 (order is checkable after lossy coding)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i + 10, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_media(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    gradient_image(40, 24, 1).save(root / "images" / "wide.png")
    tall = gradient_image(24, 40, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    tall.save(root / "images" / "tall.jpg", quality=95, exif=exif)
    rgba = gradient_image(30, 30, 3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "images" / "alpha.png")
    (root / "audio").mkdir()
    soundfile.write(root / "audio" / "stereo44k.wav", np.stack([sine(1000, 44_100, 0.5)] * 2, axis=1),
                    44_100, subtype="FLOAT")
    soundfile.write(root / "audio" / "mono8k.wav", sine(440, 8000, 0.5), 8000, subtype="PCM_16")
    soundfile.write(root / "audio" / "mono16k.flac", sine(300, 16_000, 0.25), 16_000, subtype="PCM_16")
    frames = root / "video" / "frames"
    frames.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 20, 3), 40 * i, np.uint8)).save(frames / f"{i:03d}.png")
    write_mp4(root / "video" / "clip.mp4", 12)
    write_mp4(root / "video" / "short.mp4", 2)


def good_samples() -> list[dict]:
    """One or more samples of every kind, all valid, with media paths relative to the input folder."""
    return [
        {"id": "t-0", "kind": "text", "text": "the quick brown fox jumps over the lazy dog"},
        {"id": "ic-0", "kind": "image_caption", "prompt": "Describe the image.", "text": "a wide gradient",
         "image": "images/wide.png"},
        {"id": "ic-1", "kind": "image_caption", "text": "a tall gradient, turned", "image": "images/tall.jpg"},
        {"id": "ti-0", "kind": "text_to_image", "text": "half transparent square", "image": "images/alpha.png"},
        {"id": "vc-0", "kind": "video_caption", "prompt": "What happens?", "text": "it gets brighter",
         "video": "video/clip.mp4"},
        {"id": "tv-0", "kind": "text_to_video", "text": "six grey frames", "video": "video/frames", "fps": 6},
        {"id": "tv-1", "kind": "text_to_video", "text": "a two frame clip", "video": "video/short.mp4"},
        {"id": "at-0", "kind": "audio_transcript", "text": "a one kilohertz tone", "audio": "audio/stereo44k.wav"},
        {"id": "ts-0", "kind": "text_to_speech", "text": "a low hum", "audio": "audio/mono8k.wav"},
        {"id": "ts-1", "kind": "text_to_speech", "text": "a short hum", "audio": "audio/mono16k.flac"},
        {"id": "t-1", "kind": "text", "prompt": "Say it:", "text": "hello again, world"},
    ]


def write_jsonl(path: Path, samples: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples) + "".join(line + "\n" for line in extra_lines))
    return path


def write_tar(path: Path, samples: list[dict], media_root: Path) -> Path:
    """The same samples as a webdataset tar: json + media members per key (key = id)."""
    import webdataset

    with webdataset.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            fields = {k: v for k, v in sample.items() if k not in ("image", "video", "audio")}
            member = {"__key__": sample["id"], "json": json.dumps(fields).encode()}
            for medium in ("image", "video", "audio"):
                if medium not in sample:
                    continue
                media = media_root / sample[medium]
                if media.is_dir():
                    for i, frame in enumerate(sorted(media.iterdir())):
                        member[f"frame{i:03d}{frame.suffix}"] = frame.read_bytes()
                else:
                    member[media.suffix.lstrip(".")] = media.read_bytes()
            sink.write(member)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of ``width x height`` that is small on disk (zeros compress ~1000x) and
    written without ever holding the image: what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_wav(path: Path, seconds: float = 1.0, rate: int = 16_000, keep: float = 0.5) -> Path:
    """A PCM-16 WAV cut after ``keep`` of its bytes: the header still promises the whole clip."""
    soundfile.write(path, sine(440, rate, seconds), rate, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
