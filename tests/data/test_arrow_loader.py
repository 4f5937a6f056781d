import json

import pytest
import torch

from tests.data.arrow_fixtures import data_config, make_rows, write_prepared
from xoron_dist.config import ConfigError
from xoron_dist.data.loader import ArrowDataLoader, LoaderStateError

SEQ = 64
MIX = {"text": 0.5, "image_caption": 0.3, "audio_transcript": 0.2}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, arrow_tokenizer):
    """Three datasets of different sizes; the small ones wrap through several epochs in the tests."""
    root = tmp_path_factory.mktemp("mixed")
    write_prepared(root, {"text": make_rows("text", 40, seed=1, text_len=(3, 90)),
                          "image_caption": make_rows("image_caption", 15, seed=2),
                          "audio_transcript": make_rows("audio_transcript", 10, seed=3)}, arrow_tokenizer)
    return root


def _loader(root, tok, *, workers=2, dp_rank=0, dp_size=1, seed=0, mbs=2, seq_len=SEQ, **kwargs):
    return ArrowDataLoader(root, data_config(root, num_workers=workers), tok, seq_len=seq_len,
                           micro_batch_size=mbs, dp_rank=dp_rank, dp_size=dp_size, seed=seed, **kwargs)


def _take(loader, n):
    batches = [loader.next_batch() for _ in range(n)]
    loader.close()
    return batches


def _same(a, b):
    return (a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.labels, b.labels) and torch.equal(a.document_ids, b.document_ids)
            and torch.equal(a.image_spans, b.image_spans) and torch.equal(a.audio_spans, b.audio_spans)
            and all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))
            and all(torch.equal(x, y) for x, y in zip(a.audios, b.audios, strict=True)))


def test_ranks_and_workers_cover_one_epoch_disjointly(tmp_path, arrow_tokenizer):
    # Each sample fills a row exactly (31 text tokens + eos), so a worker emits its share in order:
    # 48 rows over 2 ranks x 2 workers = 12 per worker = 6 batches of 2 per worker, 12 per rank.
    write_prepared(tmp_path, {"text": make_rows("text", 48, text_len=(31, 31), prompt_len=(0, 0))}, arrow_tokenizer)
    per_rank = []
    for rank in range(2):
        batches = _take(_loader(tmp_path, arrow_tokenizer, dp_rank=rank, dp_size=2, seq_len=32), 12)
        per_rank.append([s for b in batches for row in b.sample_ids for s in row])
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)) == 48
    assert set(union) == {f"text-{i}" for i in range(48)}
    # the next epoch starts over: each rank's 13th batch repeats a row of epoch 0
    nxt = _take(_loader(tmp_path, arrow_tokenizer, dp_rank=0, dp_size=2, seq_len=32), 13)[-1]
    assert set(s for row in nxt.sample_ids for s in row) <= set(union)


def test_tensor_parallel_peers_get_identical_batches(mixed, arrow_tokenizer):
    a = _take(_loader(mixed, arrow_tokenizer, dp_rank=1, dp_size=2, mix=MIX), 6)
    b = _take(_loader(mixed, arrow_tokenizer, dp_rank=1, dp_size=2, mix=MIX), 6)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    other = _take(_loader(mixed, arrow_tokenizer, dp_rank=0, dp_size=2, mix=MIX), 6)
    assert not any(x.sample_ids == y.sample_ids for x, y in zip(a, other, strict=True))


def test_same_seed_same_batches_other_seed_other_batches(mixed, arrow_tokenizer):
    a = _take(_loader(mixed, arrow_tokenizer, seed=3), 5)
    b = _take(_loader(mixed, arrow_tokenizer, seed=3), 5)
    c = _take(_loader(mixed, arrow_tokenizer, seed=4), 5)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert [x.sample_ids for x in a] != [x.sample_ids for x in c]


@pytest.mark.parametrize("stop", [5, 12])
def test_exact_resume_with_workers_and_blending(mixed, arrow_tokenizer, stop):
    total = 20
    reference = _take(_loader(mixed, arrow_tokenizer, dp_rank=1, dp_size=2, mix=MIX), total)

    first = _loader(mixed, arrow_tokenizer, dp_rank=1, dp_size=2, mix=MIX)
    head = [first.next_batch() for _ in range(stop)]  # the workers have prefetched beyond this
    state = json.loads(json.dumps(first.state_dict()))  # travels through a checkpoint as JSON
    epochs = first.epochs()
    first.close()
    assert len(json.dumps(state)) < 4096
    assert state["next_worker"] == stop % 2 and state["consumed"] == stop

    resumed = _loader(mixed, arrow_tokenizer, dp_rank=1, dp_size=2, mix=MIX)
    resumed.load_state_dict(state)
    tail = _take(resumed, total - stop)
    assert all(_same(x, y) for x, y in zip(head + tail, reference, strict=True))
    if stop == 12:  # the small datasets are past their first epoch here, mid-epoch of a later one
        assert epochs["audio_transcript"] >= 1 and epochs["image_caption"] >= 1
        assert resumed.epochs()["audio_transcript"] > epochs["audio_transcript"]


def test_resume_in_a_running_loader_and_in_process_workers(mixed, arrow_tokenizer):
    in_process = _loader(mixed, arrow_tokenizer, workers=0)
    one_worker = _take(_loader(mixed, arrow_tokenizer, workers=1), 8)
    batches = [in_process.next_batch() for _ in range(4)]
    state = in_process.state_dict()
    batches += [in_process.next_batch() for _ in range(2)]
    in_process.load_state_dict(state)  # rewind a loader that is running
    batches = batches[:4] + [in_process.next_batch() for _ in range(4)]
    assert all(_same(x, y) for x, y in zip(batches, one_worker, strict=True))  # 0 workers read like 1
    worker = _loader(mixed, arrow_tokenizer, workers=1)
    worker.load_state_dict(state)
    assert _same(worker.next_batch(), one_worker[4])
    worker.close()


def test_state_of_another_order_is_refused(mixed, arrow_tokenizer):
    loader = _loader(mixed, arrow_tokenizer, workers=0, dp_rank=0, dp_size=2)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(LoaderStateError, match="workers = 1, this run has 2"):
        _loader(mixed, arrow_tokenizer, workers=2, dp_rank=0, dp_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="dp rank 0"):
        _loader(mixed, arrow_tokenizer, workers=0, dp_rank=1, dp_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="datasets"):
        _loader(mixed, arrow_tokenizer, workers=0, dp_rank=0, dp_size=2, mix=MIX).load_state_dict(state)


def test_describe_and_config_errors(mixed, arrow_tokenizer):
    loader = _loader(mixed, arrow_tokenizer, workers=0, mix=MIX)
    loader.next_batch()
    text = loader.describe()
    for piece in ("image_caption (image_caption, 15 rows, weight 0.300, epoch 0)", "text (text, 40 rows",
                  "1 batches consumed"):
        assert piece in text
    with pytest.raises(ConfigError, match=r"data.mix.speech"):
        _loader(mixed, arrow_tokenizer, mix={"speech": 1.0})
    with pytest.raises(ConfigError, match=r"stages\[1\].kinds.*matches no dataset"):
        _loader(mixed, arrow_tokenizer, kinds=["text_to_video"], kinds_field="stages[1].kinds")
    empty = mixed.parent / "empty"
    write_prepared(empty, {}, arrow_tokenizer)
    with pytest.raises(ValueError, match="no datasets"):
        _loader(empty, arrow_tokenizer)


def test_exact_resume_inside_a_long_text_being_split(tmp_path, arrow_tokenizer):
    # texts of 100-300 tokens at seq_len 32: many pieces each, so a save often falls between the
    # pieces of one text (state "pending") and inside the look-ahead window
    write_prepared(tmp_path, {"text": make_rows("text", 12, text_len=(100, 300))}, arrow_tokenizer)
    options = {"workers": 0, "seq_len": 32, "mbs": 1, "lookahead": 4}
    reference = _take(_loader(tmp_path, arrow_tokenizer, **options), 40)
    loader = _loader(tmp_path, arrow_tokenizer, **options)
    pending_seen = 0
    for stop in range(1, 37, 3):
        while loader.state_dict()["consumed"] < stop:
            loader.next_batch()
        state = loader.state_dict()
        pending_seen += state["slots"][0]["pending"] is not None
        resumed = _loader(tmp_path, arrow_tokenizer, **options)
        resumed.load_state_dict(state)
        assert all(_same(x, y) for x, y in zip(_take(resumed, 3), reference[stop : stop + 3], strict=True))
    assert pending_seen > 0
    assert any("#" in s for b in reference for row in b.sample_ids for s in row)


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_workers_survive_stop_signals_that_are_not_the_trainers(mixed, arrow_tokenizer, sig):
    """SLURM (or ``kill`` of the process group) signals the workers too; they keep producing batches,
    the same ones as without the signal, and the trainer decides when to stop. With torch's thread count
    set (as a trainer that shares the cores between its ranks does), a forked worker starts a thread
    before its ``worker_init_fn``; that thread must not take the SIGTERM either."""
    import multiprocessing
    import subprocess
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _take(_loader(mixed, arrow_tokenizer, mix=MIX), 10)
        before = set(multiprocessing.active_children())
        loader = _loader(mixed, arrow_tokenizer, mix=MIX)
        got = [loader.next_batch() for _ in range(2)]
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
        for worker in workers:  # from another process, as SLURM's would be
            subprocess.run(["kill", "-s", sig, str(worker.pid)], check=True)
        time.sleep(0.5)
        got += [loader.next_batch() for _ in range(8)]
        assert all(worker.is_alive() for worker in workers)
        loader.close()
        assert all(_same(a, b) for a, b in zip(got, expected, strict=True))
    finally:
        torch.set_num_threads(threads)


def test_a_trainer_that_crashes_with_live_workers_still_exits(mixed, tmp_path):
    """torch ends leftover workers at exit with SIGTERM from the trainer's process: that one still works
    (a worker ignoring every SIGTERM would leave the crashed trainer waiting for it forever)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "crash.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.data.arrow_fixtures import data_config
from xoron_dist.config import XoronConfig
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.tokenizer import build_tokenizer

tokenizer = build_tokenizer(XoronConfig.preset("tiny"))
root = {str(mixed)!r}
loader = ArrowDataLoader(root, data_config(root, num_workers=2), tokenizer, seq_len=64, micro_batch_size=2,
                         dp_rank=0, dp_size=1, seed=0, mix={MIX!r})
loader.next_batch()
raise RuntimeError("crash with the loader alive")
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    # (torch may add its own note on the workers it terminated at exit; what matters is that it exits)
    assert result.returncode == 1 and "RuntimeError: crash with the loader alive" in result.stderr, result.stderr
