"""One raw sample -> one Arrow row of ``schema_for(kind)``, or a ``RejectedSample`` saying why not.

Checks, in order (the first that fails is the reject reason): what the reader found (malformed
JSON, unreadable member), the JSON is an object, ``id`` / ``kind`` / ``text`` present and well
typed, a known kind, an id not seen before in the source, exactly the medium the kind carries,
``text`` not blank, prompt + text within ``max_text_tokens`` tokens, then the media decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_prep.datasets import to_native
from data_prep.errors import RejectedSample
from data_prep.formats import FormatError
from data_prep.media import decode_audio, decode_image, decode_video
from data_prep.sources import MEDIA_FIELDS, RawSample
from xoron_dist.config import PrepConfig
from xoron_dist.data.chat import ChatFormatError, conversation_from_json, tokenize
from xoron_dist.data.schema import CHAT_KINDS, KINDS
from xoron_dist.tokenizer import XoronTokenizer

_MEDIA_HINT = {
    "image": "an 'image' path (JSONL) or a png/jpg/jpeg member (tar)",
    "video": "a 'video' path to an MP4 or a frame folder (JSONL), or an mp4 or frameNNN.png members (tar)",
    "audio": "an 'audio' path (JSONL) or a wav/flac member (tar)",
}


@dataclass
class Row:
    kind: str
    values: dict[str, Any]  # column -> value, the columns of schema_for(kind)
    stats: dict[str, int]  # what this row adds to its dataset's stats
    nbytes: int  # rough size in an Arrow batch, for batching and shard rolling


class RowBuilder:
    """Turns raw samples into rows with one tokenizer and one ``PrepConfig``."""

    def __init__(self, prep: PrepConfig, tokenizer: XoronTokenizer) -> None:
        self.prep = prep
        self.tokenizer = tokenizer

    def build(self, sample: RawSample) -> Row:
        if sample.error is not None:
            raise RejectedSample(sample.error)
        fields = sample.fields
        if not isinstance(fields, dict):
            raise RejectedSample(f"a sample must be a JSON object, got {type(fields).__name__}")
        place = sample.where.get("line", sample.where.get("key"))
        try:
            fields = to_native(fields, f"{sample.source.source}-{place}")
        except FormatError as err:
            raise RejectedSample(str(err)) from None
        sample_id = _required_str(fields, "id")
        kind = _required_str(fields, "kind")
        if kind not in KINDS:
            raise RejectedSample(f"unknown kind '{kind}'; known kinds: {', '.join(KINDS)}")
        if kind in CHAT_KINDS:
            return self._chat_row(sample, fields, sample_id, kind)
        text = fields.get("text")
        if text is None:
            raise RejectedSample("missing required field 'text'")
        if not isinstance(text, str):
            raise RejectedSample(f"field 'text' must be a string, got {type(text).__name__}")
        prompt = fields.get("prompt", "")
        if not isinstance(prompt, str):
            raise RejectedSample(f"field 'prompt' must be a string, got {type(prompt).__name__}")
        if sample.duplicate_of is not None:
            raise RejectedSample(f"duplicate id '{sample_id}' (first seen at {sample.duplicate_of})")
        medium = KINDS[kind]
        extra = [name for name in MEDIA_FIELDS if name in sample.media and name != medium]
        if extra:
            carries = f"carries {medium}" if medium else "carries no media"
            raise RejectedSample(f"kind '{kind}' {carries}, but the sample has {' and '.join(extra)}")
        if medium is not None and medium not in sample.media:
            raise RejectedSample(f"missing {medium} for kind '{kind}': give {_MEDIA_HINT[medium]}")
        fps = fields.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise RejectedSample(f"field 'fps' must be a number > 0, got {fps!r}")
        if not text.strip():
            raise RejectedSample("field 'text' is empty")

        prompt_tokens = self.tokenizer.encode(prompt) if prompt else []
        text_tokens = self.tokenizer.encode(text)
        total = len(prompt_tokens) + len(text_tokens)
        if total > self.prep.max_text_tokens:
            raise RejectedSample(
                f"{total} tokens (prompt {len(prompt_tokens)} + text {len(text_tokens)}) exceed "
                f"max_text_tokens={self.prep.max_text_tokens}"
            )
        values: dict[str, Any] = {"id": sample_id, "kind": kind, "source": sample.source.source,
                                  "prompt_tokens": prompt_tokens, "text_tokens": text_tokens}
        stats = {"samples": 1, "prompt_tokens": len(prompt_tokens), "text_tokens": len(text_tokens)}
        nbytes = 4 * total + len(sample_id) + len(kind) + len(sample.source.source) + 64
        if medium is not None:
            nbytes += self._add_media(medium, sample.media[medium], fps, values, stats)
        return Row(kind, values, stats, nbytes)

    def _chat_row(self, sample: RawSample, fields: dict, sample_id: str, kind: str) -> Row:
        """A conversation / tool_use sample: the chat template's tokens and the runs of assistant tokens."""
        if sample.duplicate_of is not None:
            raise RejectedSample(f"duplicate id '{sample_id}' (first seen at {sample.duplicate_of})")
        if sample.media:
            raise RejectedSample(f"kind '{kind}' carries no media, but the sample has {' and '.join(sample.media)}")
        try:
            tokens, runs = tokenize(self.tokenizer.encode, conversation_from_json(fields))
        except ChatFormatError as err:
            raise RejectedSample(str(err)) from None
        if len(tokens) > self.prep.max_text_tokens:
            raise RejectedSample(f"{len(tokens)} tokens of conversation exceed "
                                 f"max_text_tokens={self.prep.max_text_tokens}")
        values = {"id": sample_id, "kind": kind, "source": sample.source.source, "prompt_tokens": [],
                  "text_tokens": tokens, "target_runs": runs}
        targets = sum(end - start for start, end in zip(runs[::2], runs[1::2], strict=True))
        stats = {"samples": 1, "prompt_tokens": 0, "text_tokens": len(tokens), "target_tokens": targets}
        return Row(kind, values, stats, 4 * (len(tokens) + len(runs)) + len(sample_id) + 64)

    def _add_media(self, medium: str, media: Any, fps: float | None, values: dict, stats: dict) -> int:
        p = self.prep
        if medium == "image":
            pixels = decode_image(media, p.image_size, p.image_resize, p.patch_multiple, max_pixels=p.max_image_pixels)
            h, w = pixels.shape[:2]
            values.update(image=pixels.tobytes(), image_height=h, image_width=w)
            stats.update(images=1, image_pixels=h * w)
            return pixels.nbytes
        if medium == "video":
            clip, clip_fps = decode_video(media, p.video_frames, p.video_size, p.video_resize, p.patch_multiple, fps,
                                          max_pixels=p.max_image_pixels, max_seconds=p.max_video_seconds)
            f, h, w = clip.shape[:3]
            values.update(video=clip.tobytes(), video_frames=f, video_height=h, video_width=w, video_fps=clip_fps)
            stats.update(videos=1, video_frames=f)
            return clip.nbytes
        pcm = decode_audio(media, p.audio_sample_rate, p.max_audio_seconds)
        values.update(audio=pcm.tobytes(), audio_samples=pcm.size, sample_rate=p.audio_sample_rate)
        stats.update(audio_clips=1, audio_samples=pcm.size)
        return pcm.nbytes


def _required_str(fields: dict, name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise RejectedSample(f"missing required field '{name}'")
    if not isinstance(value, str) or not value:
        raise RejectedSample(f"field '{name}' must be a non-empty string, got {value!r}")
    return value
