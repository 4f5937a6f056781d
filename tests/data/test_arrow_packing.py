import numpy as np
import pytest
import torch

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.config import ConfigError
from xoron_dist.data.batch import IGNORE_INDEX, PackedBatch
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.data.packing import SampleTooLongError, SequencePacker, TokenLayout, collate
from xoron_dist.data.schema import CHAT_KINDS, GENERATION_KINDS, KINDS
from xoron_dist.data.shards import ArrowSample
from xoron_dist.data.stream import MAX_CONSECUTIVE_SKIPS, TooManySkipsError

SEQ = 64


def _layout(tok, seq_len=SEQ, image_tokens=6):
    return TokenLayout(tok.special_ids, seq_len=seq_len, image_tokens=image_tokens, video_tokens=5,
                       audio_tokens_per_second=12.5)


def _sample(kind, prompt, text, media=None, **extra):
    return ArrowSample("d", kind, "s1", np.array(prompt, np.int32), np.array(text, np.int32),
                       KINDS[kind], media, **extra)


def test_token_layout_of_each_kind(arrow_tokenizer):
    ids, eos = arrow_tokenizer.special_ids, arrow_tokenizer.eos_id
    layout = _layout(arrow_tokenizer)
    (doc,) = layout.documents(_sample("text", [7, 8], [1, 2, 3]))
    assert doc.tokens.tolist() == [7, 8, 1, 2, 3, eos]
    assert doc.targets.tolist() == [False, False, True, True, True, True]

    image = np.zeros((4, 5, 3), np.uint8)
    (doc,) = layout.documents(_sample("image_caption", [7], [1, 2], image))
    pad = ids["image_pad"]
    assert doc.tokens.tolist() == [ids["image_start"], *[pad] * 6, ids["image_end"], 7, 1, 2, eos]
    assert doc.targets.tolist() == [False] * 9 + [True] * 3
    assert (doc.media.start, doc.media.length, doc.media.is_target) == (1, 6, False)

    audio = np.zeros(16_000 * 2 + 1, np.int16)  # 2.0000625 s at 12.5/s -> ceil(25.0008) = 26 placeholders
    (doc,) = layout.documents(_sample("text_to_speech", [], [1, 2], audio, sample_rate=16_000))
    apad = ids["audio_pad"]
    assert doc.tokens.tolist() == [1, 2, ids["gen_speech"], ids["audio_start"], *[apad] * 26, ids["audio_end"], eos]
    assert doc.targets.nonzero()[0].tolist() == [2]  # only <|gen_speech|>
    assert (doc.media.start, doc.media.length, doc.media.is_target) == (4, 26, True)
    # exactly 2 s is 25 placeholders, not 26 from float error
    exact = _sample("audio_transcript", [], [1], np.zeros(32_000, np.int16), sample_rate=16_000)
    assert layout.placeholders(exact) == 25


def _check_batch(batch: PackedBatch, tok, seq_len, rows_by_id, layout):
    ids, eos, pad = tok.special_ids, tok.eos_id, tok.pad_id
    B, S = batch.input_ids.shape
    assert S == seq_len and batch.labels.shape == batch.position_ids.shape == batch.document_ids.shape == (B, S)
    assert all(t.dtype == torch.int64 for t in (batch.input_ids, batch.labels, batch.position_ids,
                                                batch.document_ids))
    assert batch.num_label_tokens == int((batch.labels != IGNORE_INDEX).sum())
    spans = {m: getattr(batch, f"{m}_spans").tolist() for m in ("image", "video", "audio")}
    media_index = {m: 0 for m in spans}
    for b in range(B):
        inp, lab, pos, doc = (t[b].tolist() for t in (batch.input_ids, batch.labels, batch.position_ids,
                                                      batch.document_ids))
        # no label points across a document boundary, and each label is the next input token
        for t in range(S):
            if lab[t] != IGNORE_INDEX:
                assert t + 1 < S and doc[t + 1] == doc[t] != -1 and lab[t] == inp[t + 1]
        used = [t for t in range(S) if doc[t] != -1]
        assert used == list(range(len(used)))  # documents first, padding at the end
        assert all(inp[t] == pad and lab[t] == IGNORE_INDEX and doc[t] == -1 for t in range(len(used), S))
        starts = [t for t in used if t == 0 or doc[t] != doc[t - 1]]
        assert [doc[t] for t in starts] == list(range(len(starts)))  # distinct id per document
        assert len(starts) == len(batch.sample_ids[b])
        for k, (start, sid) in enumerate(zip(starts, batch.sample_ids[b], strict=True)):
            end = starts[k + 1] if k + 1 < len(starts) else len(used)
            assert pos[start:end] == list(range(end - start))  # positions restart per document
            assert lab[end - 1] == IGNORE_INDEX
            labelled = [lab[t] for t in range(start, end) if lab[t] != IGNORE_INDEX]
            if "#" in sid:
                continue
            row = rows_by_id[sid]
            kind, text = row["kind"], row["text_tokens"]
            if kind in GENERATION_KINDS:
                medium = KINDS[kind]
                assert labelled == [ids[{"image": "gen_image", "video": "gen_video", "audio": "gen_speech"}[medium]]]
            elif kind in CHAT_KINDS:  # the tokens of the target runs, none at the document's first position
                runs = row["target_runs"]
                pairs = zip(runs[::2], runs[1::2], strict=True)
                assert labelled == [text[t] for a, b in pairs for t in range(max(a, 1), b)]
            elif kind == "text" and not row["prompt_tokens"]:
                assert labelled == text[1:] + [eos]  # the first token has nothing before it
            else:
                assert labelled == text + [eos]  # never prompt, marker or placeholder
            medium = KINDS[kind]
            if medium is None:
                continue
            index = media_index[medium]
            media_index[medium] += 1
            r, s, n = spans[medium][index]
            assert r == b and start < s and s + n < end
            assert inp[s - 1] == ids[f"{medium}_start"] and inp[s + n] == ids[f"{medium}_end"]
            assert set(inp[s : s + n]) == {ids[f"{medium}_pad"]}
            tensor = getattr(batch, f"{medium}s")[index]
            assert bool(getattr(batch, f"{medium}_is_target")[index]) == (kind in GENERATION_KINDS)
            if medium == "image":
                assert n == layout.span_sizes["image"] and tensor.dtype == torch.uint8
                assert tuple(tensor.shape) == (row["image_height"], row["image_width"], 3)
                assert tensor.numpy().tobytes() == row["image"]
            elif medium == "video":
                assert n == layout.span_sizes["video"] and tensor.dtype == torch.uint8
                assert tuple(tensor.shape) == (row["video_frames"], row["video_height"], row["video_width"], 3)
                assert tensor.numpy().tobytes() == row["video"]
            else:
                assert tensor.dtype == torch.int16 and tuple(tensor.shape) == (row["audio_samples"],)
                assert (tensor == int(sid.rsplit("-", 1)[1])).all()
                assert n == int(np.ceil(row["audio_samples"] / row["sample_rate"] * 12.5))
    for medium, count in media_index.items():
        assert count == len(spans[medium]) == len(getattr(batch, f"{medium}s"))


@pytest.mark.parametrize("workers", [0, 2])  # 2: batches cross the process boundary (shared_blocks.py)
def test_packed_batches_of_every_kind(tmp_path, arrow_tokenizer, workers):
    rows = {kind: make_rows(kind, 12, seed=i) for i, kind in enumerate(KINDS)}
    write_prepared(tmp_path, rows, arrow_tokenizer)
    rows_by_id = {row["id"]: row for kind_rows in rows.values() for row in kind_rows}
    loader = ArrowDataLoader(tmp_path, data_config(tmp_path, num_workers=workers), arrow_tokenizer, seq_len=SEQ,
                             micro_batch_size=3, dp_rank=0, dp_size=1, seed=0)
    seen = set()
    for _ in range(15):
        batch = loader.next_batch()
        _check_batch(batch, arrow_tokenizer, SEQ, rows_by_id, loader.layout)
        seen |= {rows_by_id[s]["kind"] for row in batch.sample_ids for s in row}
    assert seen == set(KINDS)
    loader.close()


def test_long_text_is_split_into_overlapping_pieces(arrow_tokenizer):
    layout = _layout(arrow_tokenizer, seq_len=16)
    text = list(range(100, 150))  # 50 text tokens + eos = 51 tokens, no prompt
    docs = layout.documents(_sample("text", [], text))
    assert [d.sample_id for d in docs] == ["s1#0", "s1#1", "s1#2", "s1#3"]
    assert [len(d) for d in docs] == [16, 16, 16, 6]
    for a, b in zip(docs, docs[1:], strict=False):
        assert a.tokens[-1] == b.tokens[0]  # one token of overlap: it predicts the next piece's first target
    batch = collate([[d] for d in docs], 16, arrow_tokenizer.pad_id)
    labelled = [t for t in batch.labels.flatten().tolist() if t != IGNORE_INDEX]
    assert labelled == text[1:] + [arrow_tokenizer.eos_id]  # every target exactly once, none lost at a cut
    # a piece made only of prompt has no target and is dropped
    docs = layout.documents(_sample("text", list(range(20)), [1, 2]))
    assert [d.sample_id for d in docs] == ["s1#1"]


def test_multimodal_sample_that_cannot_fit(tmp_path, arrow_tokenizer):
    layout = _layout(arrow_tokenizer, seq_len=8, image_tokens=6)
    with pytest.raises(ConfigError, match=r"stages\[2\].seq_len.*needs at least 10 tokens.*data.image_tokens"):
        layout.check_fits(["text", "image_caption"], seq_len_field="stages[2].seq_len")
    layout = _layout(arrow_tokenizer, seq_len=16, image_tokens=6)
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(SampleTooLongError, match=r"'s1'.*needs 21 tokens.*6 image placeholders.*seq_len is 16"):
        layout.documents(_sample("image_caption", [], list(range(12)), image))
    # the loader refuses at start when no image sample can fit
    write_prepared(tmp_path, {"image_caption": make_rows("image_caption", 4)}, arrow_tokenizer)
    with pytest.raises(ConfigError, match="train.seq_len"):
        ArrowDataLoader(tmp_path, data_config(tmp_path, image_tokens=60), arrow_tokenizer, seq_len=32,
                        micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_too_long_samples_are_skipped_counted_and_bounded(tmp_path, arrow_tokenizer):
    rows = make_rows("audio_transcript", 30, text_len=(2, 5))
    long_ids = set()
    for i, row in enumerate(rows):
        if i % 3 == 0:  # 10 s at 12.5 tokens/s = 125 placeholders > seq_len
            row |= {"audio": np.zeros(160_000, np.int16).tobytes(), "audio_samples": 160_000}
            long_ids.add(row["id"])
    write_prepared(tmp_path / "some", {"audio_transcript": rows}, arrow_tokenizer)
    loader = ArrowDataLoader(tmp_path / "some", data_config(tmp_path / "some"), arrow_tokenizer, seq_len=SEQ,
                             micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    ids = [s for _ in range(10) for row in loader.next_batch().sample_ids for s in row]
    assert not long_ids & set(ids)
    skipped = loader.skipped()["audio_transcript"]["too_long"]
    assert skipped > 0 and f"{skipped} skipped" in loader.describe()
    # every sample too long: a setting, not a stray sample -> stop with the reason
    for row in rows:
        row |= {"audio": np.zeros(160_000, np.int16).tobytes(), "audio_samples": 160_000}
    write_prepared(tmp_path / "all", {"audio_transcript": rows}, arrow_tokenizer)
    loader = ArrowDataLoader(tmp_path / "all", data_config(tmp_path / "all"), arrow_tokenizer, seq_len=SEQ,
                             micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(TooManySkipsError, match=f"{MAX_CONSECUTIVE_SKIPS} samples in a row.*seq_len is {SEQ}"):
        loader.next_batch()


def test_malformed_media_is_skipped(tmp_path, arrow_tokenizer):
    rows = make_rows("image_caption", 10)
    rows[3]["image_height"] += 1  # bytes no longer match the dimensions
    write_prepared(tmp_path, {"image_caption": rows}, arrow_tokenizer)
    loader = ArrowDataLoader(tmp_path, data_config(tmp_path), arrow_tokenizer, seq_len=SEQ, micro_batch_size=2,
                             dp_rank=0, dp_size=1, seed=0)
    ids = [s for _ in range(12) for row in loader.next_batch().sample_ids for s in row]
    assert "image_caption-3" not in ids and len(set(ids)) == 9
    assert loader.skipped()["image_caption"]["malformed"] >= 1


def test_look_ahead_reduces_padding(arrow_tokenizer):
    layout = _layout(arrow_tokenizer, seq_len=128)
    rng = np.random.default_rng(0)
    docs = [layout.documents(_sample("text", [], rng.integers(0, 900, rng.integers(5, 100)).tolist()))[0]
            for _ in range(3000)]

    def padding(lookahead):
        source = iter(docs)
        packer = SequencePacker(128, lookahead, lambda: next(source))
        rows = [packer.next_row() for _ in range(600)]
        return 1 - sum(len(d) for row in rows for d in row) / (128 * len(rows))

    greedy, windowed = padding(1), padding(16)
    assert windowed < 0.05 < greedy and windowed < greedy / 3


def test_batch_moves_with_its_media(arrow_tokenizer):
    layout = _layout(arrow_tokenizer)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    docs = layout.documents(_sample("image_caption", [], [1, 2], image))
    batch = collate([docs, []], SEQ, arrow_tokenizer.pad_id)
    assert batch.sample_ids == [["s1"], []] and batch.num_label_tokens == 3
    assert (batch.document_ids[1] == -1).all() and (batch.input_ids[1] == arrow_tokenizer.pad_id).all()
    empty = collate([], SEQ, arrow_tokenizer.pad_id)
    assert empty.input_ids.shape == (0, SEQ) and empty.sample_ids == [] and empty.num_label_tokens == 0
    moved = batch.to("cpu")
    assert torch.equal(moved.images[0], torch.from_numpy(image)) and moved.image_spans.tolist() == [[0, 1, 6]]
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.input_ids.is_pinned() and pinned.images[0].is_pinned()
