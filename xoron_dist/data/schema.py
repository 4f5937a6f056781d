"""The contract between raw data, ``xoron prep`` and the loader: sample kinds, Arrow schemas, manifests.

Raw input (what ``xoron synth`` writes and ``xoron prep`` reads): JSONL manifests, one sample per
line, media paths relative to the JSONL file's folder::

    {"id": "img-000001", "kind": "image_caption", "prompt": "Describe the image.",
     "text": "two red circles above a blue square", "image": "images/000001.png"}

    field    kinds                                   meaning
    id       all (required, unique per source)       stable sample id; rejects and resume refer to it
    kind     all (required)                          one of KINDS
    text     all but chat kinds (required)           caption / answer / transcript / generation prompt
    prompt   optional, understanding kinds           instruction before the media (no loss on it)
    turns    conversation, tool_use (instead of      [{"role", "content", "tool_calls"?, "name"?}, ...]:
             prompt/text)                            the chat template of ``xoron_dist.data.chat``
    tools    optional, tool_use                      the available tools [{"name", ...}, ...]
    image    image_caption, text_to_image            PNG/JPEG path
    video    video_caption, text_to_video            MP4 path, or a folder of frame images (sorted by name)
    fps      optional, with video                    frame rate of a frame folder (MP4s carry their own)
    audio    audio_transcript, text_to_speech        WAV/FLAC path (any rate/channels; prep converts)

Webdataset ``.tar`` input carries the same samples: per key a ``json`` member with the fields
above minus the media paths, plus the media as ``png``/``jpg``/``jpeg``, ``wav``/``flac``,
``mp4``, or frames ``frame000.png``, ``frame001.png``, ... .

Prepared output (``xoron prep``): per kind, Arrow IPC *file* shards (memory-mappable) with the
schema ``schema_for(kind)``, pixels and samples already decoded, resized and resampled, so the
loader never decodes media. ``manifest.json`` beside them (``Manifest``) lists every shard with
rows, bytes and sha256; the loader checks size always and sha256 on request, and names the
shard when one is corrupt or truncated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "xoron-arrow-v1"
REJECTS_FILE = "rejects.jsonl"

# Sample kinds and the media each carries. Understanding kinds put the media first and train on
# the text after it; generation kinds condition on the text and produce the media.
KINDS: dict[str, str | None] = {
    "text": None,
    "image_caption": "image",
    "video_caption": "video",
    "audio_transcript": "audio",
    "text_to_image": "image",
    "text_to_video": "video",
    "text_to_speech": "audio",
    "conversation": None,
    "tool_use": None,
}
GENERATION_KINDS = frozenset({"text_to_image", "text_to_video", "text_to_speech"})
# Multi-turn kinds (``xoron_dist.data.chat``): raw samples carry ``turns`` (+ ``tools``) instead of
# prompt/text; rows hold the rendered conversation in ``text_tokens`` and its target runs.
CHAT_KINDS = frozenset({"conversation", "tool_use"})

_COMMON = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # stem of the input file (JSONL or tar) it came from
    pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),  # tokenized "prompt" (may be empty)
    pa.field("text_tokens", pa.list_(pa.int32()), nullable=False),  # tokenized "text"
]
_MEDIA = {
    # uint8 (height, width, 3) RGB, row-major
    "image": [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_height", pa.int32(), nullable=False),
        pa.field("image_width", pa.int32(), nullable=False),
    ],
    # uint8 (frames, height, width, 3) RGB
    "video": [
        pa.field("video", pa.binary(), nullable=False),
        pa.field("video_frames", pa.int32(), nullable=False),
        pa.field("video_height", pa.int32(), nullable=False),
        pa.field("video_width", pa.int32(), nullable=False),
        pa.field("video_fps", pa.float32(), nullable=False),  # of the sampled frames
    ],
    # int16 PCM, mono, at sample_rate (the preprocessing's rate, 16 kHz by default)
    "audio": [
        pa.field("audio", pa.binary(), nullable=False),
        pa.field("audio_samples", pa.int32(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
    ],
}


def media_of(kind: str) -> str | None:
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind '{kind}'; known kinds: {', '.join(KINDS)}")
    return KINDS[kind]


# chat kinds: [start, end, start, end ...) offsets into text_tokens of the tokens that are trained on
_TARGET_RUNS = pa.field("target_runs", pa.list_(pa.int32()), nullable=False)


def schema_for(kind: str) -> pa.Schema:
    media = media_of(kind)
    extra = [_TARGET_RUNS] if kind in CHAT_KINDS else []
    return pa.schema(_COMMON + (_MEDIA[media] if media else []) + extra, metadata={"xoron_kind": kind})


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    rows: int
    bytes: int
    sha256: str


@dataclass
class DatasetInfo:
    """All shards of one kind. ``stats``: counts per modality (text_tokens, prompt_tokens, images,
    image_pixels, video_frames, audio_seconds ...) summed over the shards."""

    kind: str
    shards: list[ShardInfo] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass
class Manifest:
    """``manifest.json`` of a prepared dataset. Deterministic: the same inputs and settings give the
    same manifest (no times or host names), however many processes or MPI ranks converted it."""

    datasets: dict[str, DatasetInfo]
    tokenizer: dict[str, Any]  # {"kind": "bpe"|"pretrained", "sha256": ..., "vocab_size": ...}
    preprocessing: dict[str, Any]  # image size/policy, video frames/size, audio rate, ...
    sources: list[str]  # input files, relative to where prep was run, in processing order
    rejects: int = 0
    format: str = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: prepare the data first (xoron prep ... --out {directory})")
        raw = json.loads(path.read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        datasets = {
            name: DatasetInfo(kind=d["kind"], shards=[ShardInfo(**s) for s in d["shards"]], stats=d["stats"])
            for name, d in raw["datasets"].items()
        }
        return cls(datasets=datasets, tokenizer=raw["tokenizer"], preprocessing=raw["preprocessing"],
                   sources=raw["sources"], rejects=raw["rejects"], format=raw["format"])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class CorruptShardError(RuntimeError):
    """A prepared shard does not match its manifest entry (missing, truncated, or altered)."""


def verify_shard(root: Path, shard: ShardInfo, *, checksum: bool) -> Path:
    """Check one shard against the manifest (size always, sha256 if ``checksum``); return its path."""
    path = Path(root) / shard.path
    if not path.is_file():
        raise CorruptShardError(f"shard {path} listed in {Path(root) / MANIFEST_FILE} is missing")
    size = path.stat().st_size
    if size != shard.bytes:
        raise CorruptShardError(
            f"shard {path} is {size} bytes, the manifest says {shard.bytes}: truncated or replaced; "
            f"re-run xoron prep (it redoes only damaged shards)"
        )
    if checksum and sha256_file(path) != shard.sha256:
        raise CorruptShardError(
            f"shard {path} does not match its sha256 in the manifest: altered or corrupt; re-run xoron prep"
        )
    return path
