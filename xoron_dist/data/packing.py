"""Packing: samples -> token documents -> rows of ``seq_len`` tokens -> ``PackedBatch``.

**Token layout** of one sample (``<|x_...|>`` are the tokenizer's special tokens, x = image /
video / audio; n = ``data.image_tokens``, ``data.video_tokens`` or
``ceil(seconds * data.audio_tokens_per_second)``)::

    text                 prompt + text + <eos>                                      loss: text, <eos>
    image_caption, ...   <|x_start|> <|x_pad|>*n <|x_end|> prompt + text + <eos>    loss: text, <eos>
    text_to_image, ...   prompt + text <|gen_x|> <|x_start|> <|x_pad|>*n <|x_end|> <eos>
                                                                                    loss: <|gen_x|>

"loss on token t" means t is a *target*: the label at position t-1 (same document) is t's id.
Prompts, media markers and placeholders are never targets. In generation samples the medium
itself is the generator's target (``*_is_target`` in the batch), and the language model only
learns to ask for it (``<|gen_x|>``; text_to_speech uses ``<|gen_speech|>``).

**Long text.** A text document longer than ``seq_len`` is cut into pieces of ``seq_len`` tokens
that overlap by one token (stride ``seq_len - 1``); each piece is its own document (positions
restart, attention stops at its edge). The overlap means no target is lost at a cut: the last
token of piece k, which has no label in piece k (its successor is not in the piece), is the first
token of piece k+1, where it predicts its successor. Pieces without any target (all prompt) are
dropped. A piece is named ``"<id>#<k>"``.

**Too long multimodal samples.** If the fixed part of an image/video sample (markers,
placeholders, <eos>, and <|gen_x|> for generation) cannot fit in ``seq_len``, no sample of that
kind ever can: the loader refuses to start (``check_fits``, naming the config fields). Otherwise a
sample whose medium + text exceeds ``seq_len`` (a long caption, a long audio clip) raises
``SampleTooLongError``, which the stream turns into *skip and count* (``stream.py``).

**Packing.** ``SequencePacker`` keeps a look-ahead window of the next ``lookahead`` documents of
the stream. A row starts with the oldest document in the window (so nothing waits more than
``lookahead`` rows), then repeatedly takes the longest document that still fits (best fit; the
oldest among equals), refilling the window after every take, until none fits; the rest is padding.
Everything is deterministic given the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from xoron_dist.data.batch import IGNORE_INDEX, PAD_DOCUMENT, PackedBatch
from xoron_dist.data.schema import GENERATION_KINDS, media_of
from xoron_dist.data.shards import ArrowSample
from xoron_dist.utils.typed_config import field_error

GENERATION_TOKEN = {"image": "gen_image", "video": "gen_video", "audio": "gen_speech"}


class SampleTooLongError(ValueError):
    """A multimodal sample whose medium and text together exceed ``seq_len``."""


@dataclass
class MediaSpan:
    medium: str  # "image" | "video" | "audio"
    start: int  # first placeholder, as an offset into the document
    length: int  # placeholders
    data: np.ndarray  # the medium as read from the shard (read-only view)
    is_target: bool  # True: the generator's target (generation kinds); False: encoder input


@dataclass
class Document:
    """One packable unit: a whole sample or a piece of a long text.

    ``ref`` = (dataset index, stream position, piece) locates it again after a resume.
    """

    sample_id: str
    tokens: np.ndarray  # (length,) int64
    targets: np.ndarray  # (length,) bool: token t is predicted from token t-1
    media: MediaSpan | None = None
    ref: tuple[int, int, int] = (0, 0, 0)

    def __len__(self) -> int:
        return len(self.tokens)


class TokenLayout:
    """Lays samples out as documents with the tokenizer's special ids (see the module docstring)."""

    def __init__(self, special_ids: Mapping[str, int], *, seq_len: int, image_tokens: int, video_tokens: int,
                 audio_tokens_per_second: float) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 to hold a token and its target, got {seq_len}")
        self.ids = dict(special_ids)
        self.seq_len = seq_len
        self.image_tokens, self.video_tokens = image_tokens, video_tokens
        # decimal value of the setting, so 12.5 tokens/s over 0.08 s is exactly 1, not 1.0000000001
        self.audio_rate = Fraction(str(audio_tokens_per_second))

    @classmethod
    def from_config(cls, data_cfg, special_ids: Mapping[str, int], seq_len: int) -> TokenLayout:
        return cls(special_ids, seq_len=seq_len, image_tokens=data_cfg.image_tokens,
                   video_tokens=data_cfg.video_tokens, audio_tokens_per_second=data_cfg.audio_tokens_per_second)

    def placeholders(self, sample: ArrowSample) -> int:
        if sample.medium == "image":
            return self.image_tokens
        if sample.medium == "video":
            return self.video_tokens
        seconds = Fraction(len(sample.media), sample.sample_rate)
        return max(1, math.ceil(seconds * self.audio_rate))

    @staticmethod
    def fixed_tokens(kind: str, placeholders: int) -> int:
        """Tokens a sample of ``kind`` takes besides its prompt and text."""
        if media_of(kind) is None:
            return 1  # <eos>
        return placeholders + (4 if kind in GENERATION_KINDS else 3)

    def check_fits(self, kinds: Sequence[str], *, seq_len_field: str = "train.seq_len") -> None:
        """Refuse a ``seq_len`` that no image/video sample of ``kinds`` can fit (one text token included)."""
        for kind in kinds:
            medium = media_of(kind)
            if medium not in ("image", "video"):
                continue
            n = self.image_tokens if medium == "image" else self.video_tokens
            need = self.fixed_tokens(kind, n) + 1
            if need > self.seq_len:
                raise field_error(
                    seq_len_field, self.seq_len,
                    f"a {kind} sample needs at least {need} tokens ({n} placeholders from data.{medium}_tokens, "
                    f"markers, <eos> and one text token); raise the sequence length or lower data.{medium}_tokens",
                )

    def documents(self, sample: ArrowSample) -> list[Document]:
        """The documents of ``sample``: one, or several pieces for a long text."""
        prompt = sample.prompt_tokens.astype(np.int64)
        text = sample.text_tokens.astype(np.int64)
        eos = self.ids["endoftext"]
        if sample.medium is None:
            tokens = np.concatenate([prompt, text, [eos]])
            targets = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(text) + 1, bool)])
            return self._split(sample.id, tokens, targets)
        n = self.placeholders(sample)
        medium = sample.medium
        start, end, pad = (self.ids[f"{medium}_{part}"] for part in ("start", "end", "pad"))
        span = np.concatenate([[start], np.full(n, pad), [end]])
        if sample.kind in GENERATION_KINDS:
            gen = self.ids[GENERATION_TOKEN[medium]]
            head = np.concatenate([prompt, text, [gen]])
            tokens = np.concatenate([head, span, [eos]])
            targets = np.zeros(len(tokens), bool)
            targets[len(head) - 1] = True
            media = MediaSpan(medium, len(head) + 1, n, sample.media, True)
        else:
            tokens = np.concatenate([span, prompt, text, [eos]])
            targets = np.zeros(len(tokens), bool)
            targets[len(span) + len(prompt):] = True
            media = MediaSpan(medium, 1, n, sample.media, False)
        if len(tokens) > self.seq_len:
            raise SampleTooLongError(
                f"sample '{sample.id}' of dataset '{sample.dataset}' ({sample.kind}) needs {len(tokens)} tokens "
                f"({n} {medium} placeholders, {len(prompt)} prompt and {len(text)} text tokens, "
                f"{self.fixed_tokens(sample.kind, n) - n} markers/eos) but seq_len is {self.seq_len}"
            )
        return [Document(sample.id, tokens, targets, media)]

    def _split(self, sample_id: str, tokens: np.ndarray, targets: np.ndarray) -> list[Document]:
        if len(tokens) <= self.seq_len:
            return [Document(sample_id, tokens, targets)]
        stride = self.seq_len - 1
        pieces = []
        for k, begin in enumerate(range(0, len(tokens) - 1, stride)):
            piece = slice(begin, begin + self.seq_len)
            if targets[piece][1:].any():  # else no label in the piece: drop it
                pieces.append(Document(f"{sample_id}#{k}", tokens[piece], targets[piece]))
        return pieces


class SequencePacker:
    """Best-fit packing over a look-ahead window of documents drawn from ``source``."""

    def __init__(self, seq_len: int, lookahead: int, source: Callable[[], Document]) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.seq_len, self.lookahead, self.source = seq_len, lookahead, source
        self.window: list[Document] = []

    def _fill(self) -> None:
        while len(self.window) < self.lookahead:
            self.window.append(self.source())

    def next_row(self) -> list[Document]:
        self._fill()
        row = [self.window.pop(0)]
        space = self.seq_len - len(row[0])
        while space > 0:
            self._fill()
            best = -1
            for i, doc in enumerate(self.window):
                if len(doc) <= space and (best < 0 or len(doc) > len(self.window[best])):
                    best = i
            if best < 0:
                break
            row.append(self.window.pop(best))
            space -= len(row[-1])
        return row


def collate(rows: Sequence[Sequence[Document]], seq_len: int, pad_id: int) -> PackedBatch:
    """Rows of documents -> ``PackedBatch`` (batch = len(rows)); media are copied out of the shards."""
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, np.int64)
    labels = np.full(shape, IGNORE_INDEX, np.int64)
    position_ids = np.zeros(shape, np.int64)
    document_ids = np.full(shape, PAD_DOCUMENT, np.int64)
    media: dict[str, tuple[list, list, list]] = {m: ([], [], []) for m in ("image", "video", "audio")}
    sample_ids = []
    for b, row in enumerate(rows):
        offset = 0
        for d, doc in enumerate(row):
            n = len(doc)
            end = offset + n
            if end > seq_len:
                raise ValueError(f"documents of row {b} take more than seq_len = {seq_len} tokens")
            input_ids[b, offset:end] = doc.tokens
            labels[b, offset : end - 1] = np.where(doc.targets[1:], doc.tokens[1:], IGNORE_INDEX)
            position_ids[b, offset:end] = np.arange(n)
            document_ids[b, offset:end] = d
            if doc.media is not None:
                tensors, spans, flags = media[doc.media.medium]
                tensors.append(torch.from_numpy(np.array(doc.media.data)))  # copy out of the mapped shard
                spans.append((b, offset + doc.media.start, doc.media.length))
                flags.append(doc.media.is_target)
            offset = end
        sample_ids.append([doc.sample_id for doc in row])
    fields = {}
    for medium, (tensors, spans, flags) in media.items():
        fields[f"{medium}s"] = tensors
        fields[f"{medium}_spans"] = torch.tensor(spans, dtype=torch.long).reshape(-1, 3)
        fields[f"{medium}_is_target"] = torch.tensor(flags, dtype=torch.bool)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        document_ids=torch.from_numpy(document_ids),
        sample_ids=sample_ids,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        **fields,
    )
