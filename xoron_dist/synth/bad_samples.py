"""Deliberately broken samples for ``xoron prep``'s tests: ``bad.jsonl`` and the media it points at.

One line per defect, each otherwise well formed, so a reader must reject exactly that line and
keep going. The clean ``<kind>.jsonl`` files never point at these; the media live in ``bad/``
sub-folders of the media folders.

``BAD_CASES`` names each defect by the id of its line; the one line that is not valid JSON
(cut off inside a string) sits in the middle of the file, so a reader must carry on past it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from xoron_dist.synth.encoders import write_image, write_wav

BAD_FILE = "bad.jsonl"
BAD_CASES = {
    "bad-truncated-png": "image_caption whose PNG stops half way",
    "bad-missing-image": "image_caption whose image file does not exist",
    "bad-garbage-wav": "audio_transcript whose WAV header is overwritten with random bytes",
    "bad-empty-video-folder": "video_caption whose frame folder holds no frames",
    "bad-corrupt-mp4": "video_caption whose .mp4 is random bytes",
    "bad-missing-text": 'image_caption (valid image) without the required "text"',
    "bad-unknown-kind": "a sample of a kind that does not exist",
}
MALFORMED_LINE = '{"id": "bad-malformed-json", "kind": "text", "text": "this line stops in the middle'


def write_bad_samples(out: Path) -> Path:
    """Write the broken media and ``out/bad.jsonl`` (same bytes every time); return its path."""
    rng = random.Random("xoron-synth/bad")
    image = Image.new("RGB", (64, 48), (40, 80, 220))
    write_image(image, out / "images/bad/valid.png")
    write_image(image, out / "images/bad/truncated.png")
    truncated = out / "images/bad/truncated.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    garbage = out / "audio/bad/garbage_header.wav"
    write_wav(np.zeros(1600), garbage, 16_000, "PCM_16")
    data = bytearray(garbage.read_bytes())
    data[:44] = rng.randbytes(44)
    garbage.write_bytes(bytes(data))

    (out / "videos/bad/empty").mkdir(parents=True, exist_ok=True)
    (out / "videos/bad/corrupt.mp4").write_bytes(rng.randbytes(4096))

    caption = "A blue rectangle fills the image."
    lines = [
        {"id": "bad-truncated-png", "kind": "image_caption", "text": caption, "image": "images/bad/truncated.png"},
        {"id": "bad-missing-image", "kind": "image_caption", "text": caption, "image": "images/bad/missing.png"},
        {"id": "bad-garbage-wav", "kind": "audio_transcript", "text": "Silence.",
         "audio": "audio/bad/garbage_header.wav"},
        {"id": "bad-empty-video-folder", "kind": "video_caption", "text": "Nothing moves.",
         "video": "videos/bad/empty"},
        {"id": "bad-corrupt-mp4", "kind": "video_caption", "text": "Nothing moves.",
         "video": "videos/bad/corrupt.mp4"},
        {"id": "bad-missing-text", "kind": "image_caption", "prompt": "Describe the image.",
         "image": "images/bad/valid.png"},
        {"id": "bad-unknown-kind", "kind": "smell_caption", "text": "It smells of rain."},
    ]
    path = out / BAD_FILE
    text = [json.dumps(line) for line in lines]
    text.insert(4, MALFORMED_LINE)  # in the middle, so a reader must carry on past it
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path
