"""``PackedBatch``: one micro-batch of packed rows, the unit the Arrow loader hands the trainer.

Each row holds several documents (samples, or pieces of a long text) back to back, then padding.
Documents never see each other: ``document_ids`` separates them (the model masks attention by it)
and ``position_ids`` restart at 0 in each one. Media sit outside the token tensors: every image,
video and audio clip occupies a run of ``<|x_pad|>`` placeholders in ``input_ids`` whose place is
given by its span ``(row, start, length)``; the encoder's output replaces those positions
(understanding), or the generator is trained to produce the medium (``*_is_target``).

Padding: ``input_ids`` = the tokenizer's pad id, ``labels`` = -100, ``position_ids`` = 0,
``document_ids`` = -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from xoron_dist.model.llm import IGNORE_INDEX  # -100: the label of positions without loss

PAD_DOCUMENT = -1  # document id of padding

_TENSORS = ("input_ids", "labels", "position_ids", "document_ids", "image_spans", "image_is_target",
            "video_spans", "video_is_target", "audio_spans", "audio_is_target")
_TENSOR_LISTS = ("images", "videos", "audios")


def _empty_spans() -> torch.Tensor:
    return torch.zeros((0, 3), dtype=torch.long)


def _empty_flags() -> torch.Tensor:
    return torch.zeros((0,), dtype=torch.bool)


@dataclass
class PackedBatch:
    """Rows of ``seq_len`` tokens, each packed with whole documents; shapes in the field comments.

    ``labels[b, t]`` is the target for the token after position t (``input_ids[b, t + 1]``) when
    that token is trained on and lies in the same document, else -100. ``sample_ids[b]`` lists the
    documents of row b in order (a piece of a split text is ``"<id>#<piece>"``).
    """

    input_ids: torch.Tensor  # (batch, seq) int64
    labels: torch.Tensor  # (batch, seq) int64, -100 = no loss
    position_ids: torch.Tensor  # (batch, seq) int64, 0 at each document start
    document_ids: torch.Tensor  # (batch, seq) int64, distinct per document within a row, -1 = padding
    sample_ids: list[list[str]]  # per row
    num_label_tokens: int  # positions with a language-model target (labels != -100), counted on the CPU
    images: list[torch.Tensor] = field(default_factory=list)  # each (height, width, 3) uint8 RGB
    image_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_images, 3): row, start, length
    image_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_images,) True = to generate
    videos: list[torch.Tensor] = field(default_factory=list)  # each (frames, height, width, 3) uint8
    video_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_videos, 3)
    video_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_videos,)
    audios: list[torch.Tensor] = field(default_factory=list)  # each (samples,) int16 PCM, mono
    audio_spans: torch.Tensor = field(default_factory=_empty_spans)  # (num_audios, 3)
    audio_is_target: torch.Tensor = field(default_factory=_empty_flags)  # (num_audios,)

    def _map(self, fn) -> PackedBatch:
        changes = {name: fn(getattr(self, name)) for name in _TENSORS}
        changes.update({name: [fn(t) for t in getattr(self, name)] for name in _TENSOR_LISTS})
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Page-locked copies (``torch.utils.data.DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())


__all__ = ["IGNORE_INDEX", "PAD_DOCUMENT", "PackedBatch"]
