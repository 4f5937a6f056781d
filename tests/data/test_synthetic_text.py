import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

from xoron_dist.config import XoronConfig
from xoron_dist.data.synthetic_text import SyntheticTextDataset, generate_documents, write_tokenizer_corpus
from xoron_dist.tokenizer import TOKENIZER_CORPUS_PATH, XoronTokenizer, build_tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer() -> XoronTokenizer:
    return build_tokenizer(XoronConfig.preset("tiny"))


@pytest.fixture(scope="module")
def dataset(tokenizer) -> SyntheticTextDataset:
    return SyntheticTextDataset(tokenizer, num_documents=200, seed=7, seq_len=SEQ_LEN)


def _digest(documents: list[str]) -> str:
    return hashlib.sha256("\x00".join(documents).encode()).hexdigest()


def test_documents_are_deterministic_within_and_across_processes():
    documents = generate_documents(300, seed=3)
    assert documents == generate_documents(300, seed=3)
    assert generate_documents(100, seed=3) == documents[:100]  # document i depends on (seed, i) only
    assert generate_documents(300, seed=4) != documents
    script = (
        "import hashlib; from xoron_dist.data.synthetic_text import generate_documents; "
        "print(hashlib.sha256('\\x00'.join(generate_documents(300, seed=3)).encode()).hexdigest())"
    )
    # A fresh interpreter has another hash seed; the text must not depend on it.
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert other == _digest(documents)


def test_documents_are_varied_and_their_arithmetic_is_right():
    documents = generate_documents(2000, seed=0)
    assert all(documents)
    assert len(set(documents)) > 0.95 * len(documents)
    for marker in ("Caption:", "Count", "Sort", "Shopping list:", "legs", "opposite", " = ", "more", "even or odd"):
        assert any(marker in document for document in documents), marker
    equations = [m for document in documents for m in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", document)]
    assert len(equations) > 500
    for a, op, b, result in equations:
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
    for document in documents:
        for sorted_words in re.findall(r"^Sorted: (.*)\.$", document, flags=re.M):
            words = sorted_words.split(", ")
            assert words == sorted(words)


def test_shipped_tokenizer_corpus_is_what_the_generator_writes(tmp_path):
    fresh = write_tokenizer_corpus(tmp_path / "corpus.txt").read_bytes()
    assert fresh == TOKENIZER_CORPUS_PATH.read_bytes(), (
        "xoron_dist/assets/tokenizer_corpus.txt is stale; regenerate it with xoron_dist.data.synthetic_text."
        "write_tokenizer_corpus()"
    )
    assert len(fresh) < 400_000


def test_stream_is_documents_separated_by_eos(dataset, tokenizer):
    tokens = dataset.tokens.tolist()
    assert tokens.count(tokenizer.eos_id) == len(dataset.documents) == 200
    first_eos = tokens.index(tokenizer.eos_id)
    assert tokenizer.decode(tokens[:first_eos]) == dataset.documents[0]
    assert len(dataset) == (len(tokens) - 1) // SEQ_LEN


def test_batch_shape_determinism_and_resume(dataset, tokenizer):
    batch = dataset.batch(step=5, micro_step=0, dp_rank=0, dp_size=1, micro_batch_size=4)
    assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == torch.long
    assert torch.equal(batch, dataset.batch(5, 0, 0, 1, 4))
    # A "resumed" run builds its dataset anew and asks for step 5 directly.
    resumed = SyntheticTextDataset(tokenizer, num_documents=200, seed=7, seq_len=SEQ_LEN)
    assert torch.equal(resumed.batch(5, 0, 0, 1, 4), batch)
    assert not torch.equal(dataset.batch(6, 0, 0, 1, 4), batch)


def test_rows_are_stream_windows_so_labels_are_inputs_shifted_by_one(dataset):
    batch = dataset.batch(2, 0, 0, 1, 8)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    windows = dataset.tokens.unfold(0, SEQ_LEN + 1, SEQ_LEN)  # (num_samples, seq_len + 1)
    for row, label in zip(batch, labels, strict=True):
        (match,) = torch.nonzero((windows == row).all(dim=1)).flatten().tolist()
        start = match * SEQ_LEN
        assert torch.equal(label, dataset.tokens[start + 1 : start + SEQ_LEN + 1])
    assert torch.equal(inputs[:, 1:], labels[:, :-1])


@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_dp_shards_concatenate_to_the_single_rank_global_batch(dataset, dp_size):
    mbs = 3
    for step in (0, 1, 17):
        for micro_step in (0, 1):
            shards = [
                dataset.batch(step, micro_step, rank, dp_size, mbs, grad_accum_steps=2) for rank in range(dp_size)
            ]
            single = dataset.batch(step, micro_step, 0, 1, mbs * dp_size, grad_accum_steps=2)
            assert torch.equal(torch.cat(shards), single)
            for rank in range(dp_size):
                assert torch.equal(shards[rank], single[rank * mbs : (rank + 1) * mbs])


def test_grad_accumulation_walks_the_stream_in_order(dataset):
    # Micro step m of step s with A micro steps reads what step s*A + m reads without accumulation.
    for step in range(3):
        for micro_step in range(4):
            assert torch.equal(
                dataset.batch(step, micro_step, 1, 2, 2, grad_accum_steps=4),
                dataset.batch(step * 4 + micro_step, 0, 1, 2, 2),
            )
    with pytest.raises(ValueError, match="grad_accum_steps"):
        dataset.batch(0, 1, 0, 1, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        dataset.batch(0, 0, 2, 2, 2)


def test_every_epoch_visits_every_sample_once_in_a_new_order(dataset):
    n = len(dataset)
    windows = dataset.tokens.unfold(0, SEQ_LEN + 1, SEQ_LEN)  # (num_samples, seq_len + 1)
    assert len({tuple(window.tolist()) for window in windows}) == n  # so a row names its sample

    def epoch_order(epoch: int) -> list[int]:
        rows = torch.cat([dataset.batch(epoch * n + i, 0, 0, 1, 1) for i in range(n)])
        return [int(torch.nonzero((windows == row).all(dim=1))) for row in rows]

    first, second = epoch_order(0), epoch_order(1)
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second
