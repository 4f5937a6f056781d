"""Packing: samples -> token documents -> rows of ``seq_len`` tokens -> ``PackedBatch``.

**Token layout** of one sample (``<|x_...|>`` are the tokenizer's special tokens, x = a medium of
the modality table, ``xoron_dist.model.modalities``: image / video / audio; n = the row's ``span``
setting, ``data.image_tokens``, ``data.video_tokens``, or for a per-second one
``ceil(seconds * data.audio_tokens_per_second)``)::

    text                 prompt + text + <eos>                                      loss: text, <eos>
    image_caption, ...   <|x_start|> <|x_pad|>*n <|x_end|> prompt + text + <eos>    loss: text, <eos>
    text_to_image, ...   prompt + text <|gen_x|> <|x_start|> <|x_pad|>*n <|x_end|> <eos>
                                                                                    loss: <|gen_x|>
    conversation,        the chat template's turns (``chat.py``) + <eos>            loss: each assistant turn's
    tool_use                                                                        content, calls, <|im_end|>

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

from bisect import bisect_right, insort
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from xoron_dist.data.batch import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    Allocate,
    BatchBlock,
    BlockLayout,
    FileKey,
    PackedBatch,
    allocate_local,
    view,
)
from xoron_dist.data.schema import GENERATION_KINDS, media_of
from xoron_dist.data.shards import ArrowSample
from xoron_dist.model.modalities import BY_NAME, MODALITIES, per_second_tokens
from xoron_dist.utils.host_syncs import host_values
from xoron_dist.utils.typed_config import field_error

GENERATION_TOKEN = {row.name: row.generation_token for row in MODALITIES}
_INT64, _BOOL = np.dtype(np.int64), np.dtype(np.bool_)


class SampleTooLongError(ValueError):
    """A multimodal sample whose medium and text together exceed ``seq_len``."""


@dataclass(slots=True)
class MediaSpan:
    medium: str  # "image" | "video" | "audio"
    start: int  # first placeholder, as an offset into the document
    length: int  # placeholders
    data: np.ndarray  # the medium as read from the shard (read-only view)
    is_target: bool  # True: the generator's target (generation kinds); False: encoder input
    source: tuple[FileKey, int] | None = None  # ``data``'s shard file and byte offset (None: not the shard's bytes)


class Document:
    """One packable unit: a whole sample or a piece of a long text.

    Its tokens are not assembled here: ``parts`` are the arrays whose concatenation they are
    (views of the shard's token lists and small constant arrays of special ids), so packing works on
    ``length`` alone and ``collate`` writes every row with one concatenation. Its targets are one
    run, positions ``[target_start, target_end)`` (true for every kind and every piece).
    ``ref`` = (dataset index, stream position, piece) locates it again after a resume.
    """

    __slots__ = ("sample_id", "length", "parts", "target_start", "target_end", "media", "ref", "runs")

    def __init__(self, sample_id: str, length: int, parts: tuple[np.ndarray, ...], target_start: int,
                 target_end: int, media: MediaSpan | None = None, ref: tuple[int, int, int] = (0, 0, 0),
                 runs: tuple[tuple[int, int], ...] | None = None) -> None:
        self.sample_id, self.length, self.parts = sample_id, length, parts
        self.target_start, self.target_end = target_start, target_end
        self.media, self.ref = media, ref
        self.runs = runs  # chat kinds: several target runs (in [target_start, target_end)); None: one

    @property
    def target_runs(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` runs of target positions, in order."""
        return self.runs if self.runs is not None else ((self.target_start, self.target_end),)

    def __len__(self) -> int:
        return self.length

    @property
    def tokens(self) -> np.ndarray:
        """(length,) int64"""
        return np.concatenate(self.parts, dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        """(length,) bool: token t is predicted from token t-1"""
        targets = np.zeros(self.length, bool)
        for start, end in self.target_runs:
            targets[start:end] = True
        return targets


class TokenLayout:
    """Lays samples out as documents with the tokenizer's special ids (see the module docstring)."""

    def __init__(self, special_ids: Mapping[str, int], *, seq_len: int, **spans: float) -> None:
        """``spans``: each medium's ``span`` setting by its DataConfig name (``image_tokens=64``, ...)."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 to hold a token and its target, got {seq_len}")
        expected = {row.span for row in MODALITIES}
        if set(spans) != expected:
            raise TypeError(f"TokenLayout needs the span settings {sorted(expected)}; got {sorted(spans)}")
        self.ids = dict(special_ids)
        self.seq_len = seq_len
        # per medium: a fixed count, or the decimal value of a per-second rate (so 12.5 tokens/s over
        # 0.08 s is exactly 1, not 1.0000000001)
        self.span_sizes: dict[str, int | Fraction] = {
            row.name: Fraction(str(spans[row.span])) if row.per_second else int(spans[row.span])
            for row in MODALITIES}
        self._eos = np.array([self.ids["endoftext"]], np.int64)
        self._spans: dict[tuple[str, int, bool], np.ndarray] = {}

    @classmethod
    def from_config(cls, data_cfg, special_ids: Mapping[str, int], seq_len: int) -> TokenLayout:
        return cls(special_ids, seq_len=seq_len, **{row.span: getattr(data_cfg, row.span) for row in MODALITIES})

    def placeholders(self, sample: ArrowSample) -> int:
        size = self.span_sizes[sample.medium]
        if not BY_NAME[sample.medium].per_second:
            return size
        return per_second_tokens(len(sample.media), sample.sample_rate, size)

    @staticmethod
    def fixed_tokens(kind: str, placeholders: int) -> int:
        """Tokens a sample of ``kind`` takes besides its prompt and text."""
        if media_of(kind) is None:
            return 1  # <eos>
        return placeholders + (4 if kind in GENERATION_KINDS else 3)

    def check_fits(self, kinds: Sequence[str], *, seq_len_field: str = "train.seq_len") -> None:
        """Refuse a ``seq_len`` that no sample of ``kinds`` with a fixed-size medium can fit (one text
        token included)."""
        for kind in kinds:
            medium = media_of(kind)
            if medium is None or BY_NAME[medium].per_second:
                continue
            n, setting = self.span_sizes[medium], f"data.{BY_NAME[medium].span}"
            need = self.fixed_tokens(kind, n) + 1
            if need > self.seq_len:
                raise field_error(
                    seq_len_field, self.seq_len,
                    f"a {kind} sample needs at least {need} tokens ({n} placeholders from {setting}, "
                    f"markers, <eos> and one text token); raise the sequence length or lower {setting}",
                )

    def _span(self, medium: str, n: int, generation: bool) -> np.ndarray:
        """The special tokens around a medium: ``<|x_start|> <|x_pad|>*n <|x_end|>``, for generation
        preceded by ``<|gen_x|>`` and followed by <eos> (built once per medium and length)."""
        key = (medium, n, generation)
        if key not in self._spans:
            start, end, pad = (self.ids[f"{medium}_{part}"] for part in ("start", "end", "pad"))
            span = [start, *[pad] * n, end]
            if generation:
                span = [self.ids[GENERATION_TOKEN[medium]], *span, self.ids["endoftext"]]
            self._spans[key] = np.array(span, np.int64)
        return self._spans[key]

    def documents(self, sample: ArrowSample, dataset: int = 0, position: int = 0) -> list[Document]:
        """The documents of ``sample``: one, or several pieces for a long text. They carry the
        reference ``(dataset, position, piece)`` (the sample's place in a ``SlotStream``)."""
        prompt, text = sample.prompt_tokens, sample.text_tokens
        p, t = len(prompt), len(text)
        medium = sample.medium
        if sample.target_runs is not None:
            return self._chat_documents(sample, dataset, position)
        if medium is None:
            if p + t + 1 > self.seq_len:
                tokens = np.concatenate((prompt, text, self._eos), dtype=np.int64)
                return self._split(sample.id, tokens, p, dataset, position)
            return [Document(sample.id, p + t + 1, (prompt, text, self._eos), p, p + t + 1, None,
                             (dataset, position, 0))]
        n = self.placeholders(sample)
        if sample.kind in GENERATION_KINDS:
            # prompt + text <|gen_x|> <|x_start|> pads <|x_end|> <eos>: the one target is <|gen_x|>
            length = p + t + n + 4
            doc = Document(sample.id, length, (prompt, text, self._span(medium, n, True)), p + t, p + t + 1,
                           MediaSpan(medium, p + t + 2, n, sample.media, True, sample.media_ref),
                           (dataset, position, 0))
        else:
            # <|x_start|> pads <|x_end|> prompt + text <eos>: targets are the text and <eos>
            length = n + p + t + 3
            doc = Document(sample.id, length, (self._span(medium, n, False), prompt, text, self._eos), n + 2 + p,
                           length, MediaSpan(medium, 1, n, sample.media, False, sample.media_ref),
                           (dataset, position, 0))
        if length > self.seq_len:
            raise SampleTooLongError(
                f"sample '{sample.id}' of dataset '{sample.dataset}' ({sample.kind}) needs {length} tokens "
                f"({n} {medium} placeholders, {p} prompt and {t} text tokens, "
                f"{self.fixed_tokens(sample.kind, n) - n} markers/eos) but seq_len is {self.seq_len}"
            )
        return [doc]

    def _chat_documents(self, sample: ArrowSample, dataset: int, position: int) -> list[Document]:
        """A conversation (``xoron_dist.data.chat``): its rendered tokens + <eos>, trained on the
        assistant runs only (<eos> is context: the last <|im_end|> already ends the reply). Longer
        than ``seq_len``: pieces as for long text, each with the runs that fall in it."""
        text, flat = sample.text_tokens, sample.target_runs
        runs = tuple((int(a), int(b)) for a, b in zip(flat[::2], flat[1::2], strict=True) if b > a)
        if not runs or runs[-1][1] > len(text) or any(a < 0 for a, _ in runs):
            raise SampleTooLongError(f"sample '{sample.id}' of dataset '{sample.dataset}' ({sample.kind}) has "
                                     f"target runs {flat.tolist()} outside its {len(text)} tokens")
        length = len(text) + 1
        if length <= self.seq_len:
            return [Document(sample.id, length, (text, self._eos), runs[0][0], runs[-1][1], None,
                             (dataset, position, 0), runs)]
        tokens = np.concatenate((text, self._eos), dtype=np.int64)
        stride, pieces = self.seq_len - 1, []
        for k, begin in enumerate(range(0, length - 1, stride)):
            end = min(begin + self.seq_len, length)
            inside = tuple((max(a, begin) - begin, min(b, end) - begin) for a, b in runs
                           if max(a, begin + 1) < min(b, end))  # a target at the piece's first token has no label
            if inside:
                pieces.append(Document(f"{sample.id}#{k}", end - begin, (tokens[begin:end],), inside[0][0],
                                       inside[-1][1], None, (dataset, position, len(pieces)), inside))
        return pieces

    def _split(self, sample_id: str, tokens: np.ndarray, prompt: int, dataset: int, position: int) -> list[Document]:
        """Pieces of a long text whose targets start at ``prompt`` (see the module docstring)."""
        stride, total = self.seq_len - 1, len(tokens)
        pieces = []
        for k, begin in enumerate(range(0, total - 1, stride)):
            end = min(begin + self.seq_len, total)
            if max(prompt, begin + 1) < end:  # else no label in the piece: drop it
                pieces.append(Document(f"{sample_id}#{k}", end - begin, (tokens[begin:end],),
                                       max(prompt - begin, 0), end - begin, None, (dataset, position, len(pieces))))
        return pieces


class SequencePacker:
    """Best-fit packing over a look-ahead window of documents drawn from ``source``.

    Beside the window (arrival order) it keeps the lengths in arrival order and sorted: the best
    fit is a bisect in the sorted lengths, its oldest holder a C-level ``list.index`` (a Python
    scan of the window per take cost ~1 us a document).
    """

    def __init__(self, seq_len: int, lookahead: int, source: Callable[[], Document]) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.seq_len, self.lookahead, self.source = seq_len, lookahead, source
        self.window = []

    @property
    def window(self) -> list[Document]:
        """The documents drawn but not yet packed, oldest first."""
        return self._window

    @window.setter
    def window(self, docs: Sequence[Document]) -> None:
        self._window = list(docs)
        self._lengths = [doc.length for doc in self._window]
        self._sorted = sorted(self._lengths)

    def _fill(self) -> None:
        window, lengths = self._window, self._lengths
        while len(window) < self.lookahead:
            doc = self.source()
            window.append(doc)
            lengths.append(doc.length)
            insort(self._sorted, doc.length)

    def next_row(self) -> list[Document]:
        window, lengths, ordered = self._window, self._lengths, self._sorted
        self._fill()
        row = [window.pop(0)]
        ordered.remove(lengths.pop(0))
        space = self.seq_len - row[0].length
        while space > 0:
            self._fill()
            fits = bisect_right(ordered, space)  # lengths <= space: ordered[:fits]
            if fits == 0:
                break
            best = ordered.pop(fits - 1)  # the longest that fits ...
            i = lengths.index(best)  # ... the oldest among equals
            del lengths[i]
            row.append(window.pop(i))
            space -= best
        return row


def collate(rows: Sequence[Sequence[Document]], seq_len: int, pad_id: int) -> PackedBatch:
    """Rows of documents -> ``PackedBatch`` (batch = len(rows)); media read as is from a shard are views of
    the shard file (copy-on-write, ``batch.mapped_file``), other media are copied into the batch."""
    return collate_block(rows, seq_len, pad_id, allocate_local, map_media=True).to_batch()


def collate_block(rows: Sequence[Sequence[Document]], seq_len: int, pad_id: int, allocate: Allocate,
                  map_media: bool = False) -> BatchBlock:
    """``collate`` into one buffer from ``allocate`` (see ``batch.BatchBlock``).

    One pass over the documents gathers their token parts (each row closed by padding), and per
    segment (document or padding) its length and document id, and each document's label run; then
    whole-batch numpy operations fill the four token tensors, and each medium is copied once, from
    the mapped shard into its place in the buffer. ``map_media``: a medium read as is from a shard
    (``MediaSpan.source``) is not copied at all: the block names its file and offset, and
    ``BatchBlock.to_batch`` views it in that file's mapping (zero-copy, in any process).
    """
    batch, total = len(rows), len(rows) * seq_len
    padding = np.full(seq_len, pad_id, np.int64)
    parts: list[np.ndarray] = []
    seg_lengths: list[int] = []  # per segment, in order: rows of (documents..., padding)
    seg_ids: list[int] = []  # document index within its row, PAD_DOCUMENT for padding
    label_starts: list[int] = []  # flat position runs [start, end) whose label is the next token
    label_ends: list[int] = []
    media: dict[str, list[tuple[int, int, MediaSpan]]] = {m.name: [] for m in MODALITIES}  # (row, offset, span)
    pads: list[int] = []  # flat position where each row's padding starts
    sample_ids = []
    for b, row in enumerate(rows):
        base = offset = b * seq_len
        for d, doc in enumerate(row):
            parts.extend(doc.parts)
            seg_lengths.append(doc.length)
            seg_ids.append(d)
            # token t is a target -> label at t - 1 (not before the document's first token)
            for target_start, target_end in doc.target_runs:
                start, end = offset + max(target_start, 1) - 1, offset + target_end - 1
                if start < end:
                    label_starts.append(start)
                    label_ends.append(end)
            if doc.media is not None:
                media[doc.media.medium].append((b, offset - base, doc.media))
            offset += doc.length
        used = offset - base
        if used > seq_len:
            raise ValueError(f"documents of row {b} take more than seq_len = {seq_len} tokens")
        parts.append(padding[: seq_len - used])
        seg_lengths.append(seq_len - used)
        seg_ids.append(PAD_DOCUMENT)
        pads.append(offset)
        sample_ids.append([doc.sample_id for doc in row])

    layout = BlockLayout()
    for name in ("input_ids", "labels", "position_ids", "document_ids"):
        layout.add(name, _INT64, (batch, seq_len))
    media_runs = [_lay_out_medium(layout, medium, found, map_media) for medium, found in media.items()]
    buffer, pool_id = allocate(layout.nbytes)
    with host_values():  # the loader's own buffer: host memory in every run
        data = buffer.numpy()
    tokens = [view(data, dtype, (total,), offset) for _, dtype, _, offset in layout.entries[:4]]
    _fill_tokens(*tokens, parts, seg_lengths, seg_ids, pads, label_starts, label_ends, seq_len)
    for media_run in media_runs:
        _write_medium(data, *media_run)
    num_labels = sum(label_ends) - sum(label_starts)
    return BatchBlock(buffer, layout.entries, sample_ids, num_labels, layout.nbytes, pool_id)


def _fill_tokens(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, document_ids: np.ndarray,
                 parts: list[np.ndarray], seg_lengths: list[int], seg_ids: list[int], pads: list[int],
                 label_starts: list[int], label_ends: list[int], seq_len: int) -> None:
    """``collate_block``'s whole-batch numpy pass: the four flat token tensors from the gathered parts,
    segment lengths and ids, each row's padding start and the label runs."""
    total = input_ids.shape[0]
    if parts:  # else an empty batch (no rows)
        np.concatenate(parts, out=input_ids)
    lengths = np.array(seg_lengths, np.int64)
    document_ids[:] = np.repeat(np.array(seg_ids, np.int64), lengths)
    seg_starts = np.cumsum(lengths) - lengths
    np.subtract(np.arange(total), np.repeat(seg_starts, lengths), out=position_ids)
    for b, start in enumerate(pads):
        position_ids[start : (b + 1) * seq_len] = 0
    runs = np.zeros(total + 1, np.int32)  # +1 at a run's start, -1 at its end: the cumsum is 1 inside runs
    runs[label_starts] = 1
    runs[label_ends] -= 1
    has_label = np.cumsum(runs[:-1], dtype=np.int32).astype(bool)
    labels.fill(IGNORE_INDEX)
    np.copyto(labels[:-1], input_ids[1:], where=has_label[:-1])


def _lay_out_medium(layout: BlockLayout, medium: str, found: list[tuple[int, int, MediaSpan]],
                    map_media: bool) -> tuple:
    """Reserve a medium's spans, flags and data in the block; returns what ``_write_medium`` needs.
    ``map_media``: the media with a shard ``source`` take no room (their entry names the source)."""
    spans = layout.add(f"{medium}_spans", _INT64, (len(found), 3))
    flags = layout.add(f"{medium}_is_target", _BOOL, (len(found),))
    arrays = [span.data for _, _, span in found]
    dtype = arrays[0].dtype if arrays else np.dtype(np.uint8)
    sources = [span.source for _, _, span in found] if map_media else None
    run = layout.add_run(f"{medium}s", dtype, [array.shape for array in arrays], sources)
    if sources is not None:  # only the others are copied
        arrays = [array for array, source in zip(arrays, sources, strict=True) if source is None]
    return found, spans, flags, arrays, dtype, run


def _write_medium(data: np.ndarray, found, spans: int, flags: int, arrays, dtype, run: int) -> None:
    """Fill a medium's spans (row, start, length), flags and data (found: (row, offset, MediaSpan);
    arrays: the media to copy into the block)."""
    if not found:
        return
    view(data, _INT64, (len(found), 3), spans)[:] = [(b, offset + span.start, span.length) for b, offset, span in found]
    view(data, _BOOL, (len(found),), flags)[:] = [span.is_target for _, _, span in found]
    if not arrays:
        return
    # the one copy of the media out of the mapped shards, all of a medium in one call
    flat = [array.reshape(-1) for array in arrays]
    np.concatenate(flat, out=view(data, dtype, (sum(len(f) for f in flat),), run))
