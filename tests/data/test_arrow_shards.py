import pickle

import numpy as np
import pytest

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.data.schema import CorruptShardError, Manifest
from xoron_dist.data.shards import PreparedData, TokenizerMismatchError


@pytest.fixture()
def folder(tmp_path, arrow_tokenizer):
    rows = {
        "text": make_rows("text", 37, seed=1),
        "image_caption": make_rows("image_caption", 23, seed=2),
        "video_caption": make_rows("video_caption", 9, seed=3),
        "audio_transcript": make_rows("audio_transcript", 11, seed=4),
    }
    write_prepared(tmp_path, rows, arrow_tokenizer, rows_per_shard=8, rows_per_batch=3)
    return tmp_path, rows


def test_random_access_across_shards_and_record_batches(folder):
    root, rows = folder
    data = PreparedData(root)
    for name, written in rows.items():
        dataset = data.datasets[name]
        assert len(dataset) == len(written)
        for row in [*range(len(written))][::-1]:  # backwards: each shard and batch reached out of order
            sample, expected = dataset.sample(row), written[row]
            assert sample.id == expected["id"] and sample.kind == name
            assert sample.prompt_tokens.tolist() == expected["prompt_tokens"]
            assert sample.text_tokens.tolist() == expected["text_tokens"]
            if name == "image_caption":
                assert sample.media.shape == (expected["image_height"], expected["image_width"], 3)
                assert sample.media.tobytes() == expected["image"]
            elif name == "video_caption":
                assert sample.media.shape == (expected["video_frames"], 3, 4, 3) and sample.fps == 4.0
            elif name == "audio_transcript":
                assert sample.media.dtype == np.int16 and (sample.media == row).all()
                assert sample.sample_rate == 16_000
        with pytest.raises(IndexError, match=name):
            dataset.sample(len(written))


def test_rows_are_read_only_views_of_the_mapping(folder):
    root, _ = folder
    data = PreparedData(root)
    sample = data.datasets["image_caption"].sample(5)
    # zero-copy: numpy views over the memory-mapped Arrow buffers, not owned copies
    assert not sample.media.flags.writeable and not sample.media.flags.owndata
    assert not sample.text_tokens.flags.writeable and not sample.text_tokens.flags.owndata
    # a dataset with open mappings still pickles (spawned workers) and reopens on use
    clone = pickle.loads(pickle.dumps(data.datasets["image_caption"]))
    assert clone.sample(5).id == sample.id


def _shard_path(root, name, index=0):
    return root / Manifest.read(root).datasets[name].shards[index].path


def test_truncated_shard_is_named(folder, arrow_tokenizer):
    root, _ = folder
    path = _shard_path(root, "image_caption", 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptShardError, match="part-001.arrow") as err:
        ArrowDataLoader(root, data_config(root, verify_checksums=False), arrow_tokenizer, seq_len=64,
                        micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    assert "truncated" in str(err.value)
    # a stage that does not read the dataset is not stopped by it
    ArrowDataLoader(root, data_config(root), arrow_tokenizer, seq_len=64, micro_batch_size=1, dp_rank=0,
                    dp_size=1, seed=0, kinds=["text"])


def test_flipped_byte_is_caught_by_the_checksum(folder, arrow_tokenizer):
    root, _ = folder
    path = _shard_path(root, "text", 2)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="part-002.arrow.*sha256"):
        ArrowDataLoader(root, data_config(root, verify_checksums=True), arrow_tokenizer, seq_len=64,
                        micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    # without checksums the size matches and the loader starts
    ArrowDataLoader(root, data_config(root, verify_checksums=False), arrow_tokenizer, seq_len=64,
                    micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_lazy_open_checks_size_and_row_count(folder):
    root, _ = folder
    data = PreparedData(root, verify_checksums=False)
    path = _shard_path(root, "text", 0)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptShardError, match="part-000.arrow"):
        data.datasets["text"].sample(0)


def test_tokenizer_mismatch_is_refused(folder, arrow_tokenizer):
    root, _ = folder
    PreparedData(root).check_tokenizer(arrow_tokenizer)
    manifest = Manifest.read(root)
    manifest.tokenizer["sha256"] = "0" * 64
    manifest.write(root)
    with pytest.raises(TokenizerMismatchError, match="another tokenizer|sha256"):
        ArrowDataLoader(root, data_config(root), arrow_tokenizer, seq_len=64, micro_batch_size=1, dp_rank=0,
                        dp_size=1, seed=0)
    manifest.tokenizer["vocab_size"] = 5000
    manifest.write(root)
    with pytest.raises(TokenizerMismatchError, match="5000 ids"):
        PreparedData(root).check_tokenizer(arrow_tokenizer)
    # explicitly not asked: the loader starts
    ArrowDataLoader(root, data_config(root), arrow_tokenizer, seq_len=64, micro_batch_size=1, dp_rank=0,
                    dp_size=1, seed=0, check_tokenizer=False)
