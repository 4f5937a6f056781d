"""Golden digests of the loader's output: any change to the batches it produces (ids, every tensor,
every medium, in order) or to the states it saves fails here. Speed work on the loader must keep
these; a deliberate change of the data order updates them and says why.

The fixture mixes every kind with weights, splits long texts, and has one malformed image and
three too-long audio clips (skipped and counted), read as DP rank 1 of 2 with 0 and 2 workers.
"""

import hashlib
import json

import numpy as np
import pytest

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.data.batch import PackedBatch
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.data.schema import CHAT_KINDS, KINDS

SEQ, MBS, BATCHES = 64, 3, 32
MIX = {"text": 0.4, "image_caption": 0.15, "video_caption": 0.1, "audio_transcript": 0.1,
       "text_to_image": 0.1, "text_to_video": 0.05, "text_to_speech": 0.1}

# Recorded with the loader before its speed work (commit c38a4da).
GOLDEN = {
    0: "4f898abcf61051c48fc1b402a1c2f441f9897aa5c3ff50bd112c4335dec7d484",
    2: "f30c5279f07dacb54e894f0931593e71012d0c5d0f8898d3a4e0b666b9ae5500",
}


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory, arrow_tokenizer):
    root = tmp_path_factory.mktemp("golden")
    # the kinds the golden digests were recorded with (the chat kinds have their own tests)
    rows = {kind: make_rows(kind, 14, seed=10 + i) for i, kind in enumerate(KINDS) if kind not in CHAT_KINDS}
    rows["text"] = make_rows("text", 30, seed=9, text_len=(3, 150))  # some longer than SEQ: split
    rows["image_caption"][4]["image_height"] += 1  # bytes no longer match: malformed
    for i in (1, 5, 9, 12):  # 5 s at 12.5 tokens/s: 63 placeholders + markers > SEQ, skipped as too long
        rows["audio_transcript"][i] |= {"audio": np.zeros(80_000, np.int16).tobytes(), "audio_samples": 80_000}
    write_prepared(root, rows, arrow_tokenizer, rows_per_shard=6, rows_per_batch=4)
    return root


def _update(digest, batch: PackedBatch) -> None:
    digest.update(json.dumps([batch.sample_ids, batch.num_label_tokens]).encode())
    tensors = [batch.input_ids, batch.labels, batch.position_ids, batch.document_ids]
    for medium in ("image", "video", "audio"):
        tensors += [getattr(batch, f"{medium}_spans"), getattr(batch, f"{medium}_is_target")]
        tensors += getattr(batch, f"{medium}s")
    for tensor in tensors:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())


def _loader(root, tokenizer, workers: int) -> ArrowDataLoader:
    return ArrowDataLoader(root, data_config(root, num_workers=workers), tokenizer, seq_len=SEQ,
                           micro_batch_size=MBS, dp_rank=1, dp_size=2, seed=5, mix=MIX, lookahead=6)


def _batch_digest(batch: PackedBatch) -> str:
    digest = hashlib.sha256()
    _update(digest, batch)
    return digest.hexdigest()


def loader_digest(root, tokenizer, workers: int) -> str:
    loader = _loader(root, tokenizer, workers)
    digest = hashlib.sha256()
    try:
        for _ in range(BATCHES):
            _update(digest, loader.next_batch())
            digest.update(json.dumps(loader.state_dict(), sort_keys=True).encode())
    finally:
        loader.close()
    return digest.hexdigest()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_and_states_match_the_golden_digest(golden_data, arrow_tokenizer, workers):
    assert loader_digest(golden_data, arrow_tokenizer, workers) == GOLDEN[workers]


def test_resume_anywhere_matches_the_uninterrupted_run(golden_data, arrow_tokenizer):
    # every stop point of the golden run, in process: window and pending pieces restored from refs
    loader = _loader(golden_data, arrow_tokenizer, 0)
    reference, states = [], []
    for _ in range(BATCHES):
        reference.append(_batch_digest(loader.next_batch()))
        states.append(json.loads(json.dumps(loader.state_dict())))
    for stop in range(BATCHES - 2):
        loader.load_state_dict(states[stop])
        assert [_batch_digest(loader.next_batch()) for _ in range(2)] == reference[stop + 1 : stop + 3]
