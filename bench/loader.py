"""Loader throughput: ``ArrowDataLoader`` vs a raw pyarrow memory-mapped scan and vs webdataset tars.

The same synthetic corpus (``xoron synth`` + ``xoron prep``, tiny preset tokenizer; images 224 px,
video 8 frames x 64 px, audio up to 10 s) is built once into a temp folder, then read three ways:

    ours        ArrowDataLoader: blend draw, seeded permutation, row lookup in the mapped shards,
                token layout, best-fit packing (look-ahead 16), collate into PackedBatch
                (seq_len 2048 x micro-batch 4), with 0 / 1 / 2 DataLoader workers (the batch
                crosses the process boundary in shared memory). Samples = sample ids in the
                batches (a long text's pieces counted once); tokens = non-padding positions.
    scan        the limit: every shard opened with ``pa.memory_map`` + ``pa.ipc.open_file``,
                every record batch read, per row the id, the token lists as numpy (summed) and
                the medium touched (one byte per medium: the headline peer), or copied
                out whole (every media byte read once, as the loader must). No shuffle, no
                packing, one process.
    webdataset  the same prepared samples written as webdataset tars (8 shards; tokens and the
                already-decoded media as .npy, so the comparison is about the container, not
                PNG decoding) read with ``webdataset.WebDataset(...).decode().batched(128)``
                through a torch DataLoader (``batch_size=None``, an identity ``collate_fn``: the
                arrays cross processes pickled, faster here than one shared-memory tensor each),
                0 / 1 / 2 workers, no shuffle (its best case); the consumer sums the tokens and
                touches each medium.

Each variant runs ``--samples`` samples (and at least ``--min-seconds``) after a warm-up that
covers worker start-up and the prefetch queue, in ``--rounds`` rounds in rotating order; the
median round counts (about 80 s in all on 2 cores). Token rates of the scan and webdataset are
samples/s x the corpus' mean tokens per sample as the loader lays samples out (placeholders and
markers included), so they compare with ours.

Also measured: ours at the smoke run's batch shape (seq_len 256 x 4, 16 image/video tokens,
8 audio tokens/s, 1 worker), against what the smoke model trains per second (``runs/smoke/
metrics.jsonl`` when present, else the tiny@128x8 number of ``bench/out/llm_step.json``).

Where the in-process time goes is timed stage by stage (``stage_breakdown``, always run);
``--profile`` adds a cProfile listing, whose per-call overhead inflates the small hot calls
(``len`` in the packer) several-fold: read it for call counts, the stage timings for costs.

    python -m bench.loader [--samples 20000] [--min-seconds 1] [--rounds 3] [--profile]

Writes bench/out/loader.json. Headline: ours (best of 1 / 2 workers) samples/s over the scan's.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset as wds
from torch.utils.data import DataLoader

from bench.common import machine, write_result
from xoron_dist.config import load_config
from xoron_dist.data.loader import DEFAULT_LOOKAHEAD, ArrowDataLoader
from xoron_dist.data.packing import SequencePacker, TokenLayout, collate
from xoron_dist.data.schema import Manifest, media_of
from xoron_dist.data.shards import PreparedData
from xoron_dist.tokenizer import XoronTokenizer

OVERRIDES = [
    "preset=tiny",
    "data.prep.image_size=224", "data.prep.video_frames=8", "data.prep.video_size=64",
    "data.prep.max_audio_seconds=10",
    "data.synth.seed=0", "data.synth.text=2000", "data.synth.image_caption=400", "data.synth.video_caption=60",
    "data.synth.audio_transcript=200", "data.synth.text_to_image=200", "data.synth.text_to_video=40",
    "data.synth.text_to_speech=100",
]
SMOKE_SHAPE = ["data.image_tokens=16", "data.video_tokens=16", "data.audio_tokens_per_second=8.0"]
SEQ_LEN, MICRO_BATCH = 2048, 4
SMOKE_SEQ_LEN, SMOKE_WORKERS = 256, 1
WDS_SHARDS, WDS_BATCH = 8, 128
GOAL = 0.7
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- data


def build(cfg, folder: Path) -> tuple[Path, float]:
    """synth + prep into ``folder``; the prepared folder and the seconds it took."""
    from data_prep import prepare
    from xoron_dist.synth import synthesize

    start = time.perf_counter()
    inputs = synthesize(cfg.data.synth, folder / "raw", progress=False)
    prepare(inputs, folder / "prep", cfg, workers=2, progress=False)
    return folder / "prep", time.perf_counter() - start


def corpus_stats(root: Path, data_cfg, tokenizer) -> dict:
    """Samples, bytes and the mean tokens per sample as the loader lays samples out."""
    layout = TokenLayout.from_config(data_cfg, tokenizer.special_ids, SEQ_LEN)
    data = PreparedData(root, verify_checksums=False)
    samples = tokens = 0
    for dataset in data.datasets.values():
        for row in range(len(dataset)):
            tokens += sum(len(doc) for doc in layout.documents(dataset.sample(row)))
            samples += 1
    return {"samples": samples, "tokens_per_sample": tokens / samples,
            "shard_bytes": sum(d.bytes for d in data.manifest.datasets.values()),
            "rows": {name: d.rows for name, d in data.manifest.datasets.items()}}


def write_tars(root: Path, out: Path) -> list[str]:
    """The prepared samples as webdataset tars (.npy tokens + decoded media), mixed over WDS_SHARDS shards."""
    data = PreparedData(root, verify_checksums=False)
    refs = [(name, row) for name, ds in data.datasets.items() for row in range(len(ds))]
    order = np.random.default_rng(0).permutation(len(refs))
    out.mkdir(parents=True, exist_ok=True)
    urls = [str(out / f"shard-{i:03d}.tar") for i in range(WDS_SHARDS)]
    writers = [wds.TarWriter(url) for url in urls]
    for index, ref in enumerate(order):
        name, row = refs[ref]
        sample = data.datasets[name].sample(row)
        media = sample.media if sample.media is not None else np.zeros(0, np.uint8)
        writers[index % WDS_SHARDS].write({
            "__key__": f"{index:07d}",
            "json": {"id": sample.id, "kind": sample.kind, "sample_rate": sample.sample_rate, "fps": sample.fps},
            "prompt.npy": np.ascontiguousarray(sample.prompt_tokens),
            "text.npy": np.ascontiguousarray(sample.text_tokens),
            "media.npy": np.ascontiguousarray(media),  # every sample has the same keys (batched needs it)
        })
    for writer in writers:
        writer.close()
    return urls


# --------------------------------------------------------------------------- readers
# Each reader is a generator factory: it yields (samples, tokens) per unit it produced (tokens may be
# None: then samples x the corpus' mean tokens per sample is used).


def ours(root: Path, data_cfg, tokenizer, workers: int, seq_len: int = SEQ_LEN) -> Iterator[tuple[int, int]]:
    loader = ArrowDataLoader(root, dataclasses.replace(data_cfg, num_workers=workers), tokenizer, seq_len=seq_len,
                             micro_batch_size=MICRO_BATCH, dp_rank=0, dp_size=1, seed=0)
    try:
        while True:
            batch = loader.next_batch()
            samples = sum(1 for row in batch.sample_ids for sid in row if "#" not in sid or sid.endswith("#0"))
            yield samples, int((batch.document_ids >= 0).sum())
    finally:
        loader.close()


def _list_views(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    return column.offsets.to_numpy(), column.values.to_numpy()


def scan(root: Path, copy_media: bool) -> Iterator[tuple[int, None]]:
    """Endless passes over every shard in manifest order: the raw read cost (see the module docstring)."""
    manifest = Manifest.read(root)
    sink = 0
    while True:
        for info in manifest.datasets.values():
            medium = media_of(info.kind)
            for shard in info.shards:
                reader = pa.ipc.open_file(pa.memory_map(str(root / shard.path), "r"))
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)
                    ids = batch.column("id").to_pylist()
                    p_off, p_val = _list_views(batch.column("prompt_tokens"))
                    t_off, t_val = _list_views(batch.column("text_tokens"))
                    if medium is not None:
                        column = batch.column(medium)
                        m_off = np.frombuffer(column.buffers()[1], np.int32)[column.offset:]
                        m_val = np.frombuffer(column.buffers()[2], np.uint8)
                    for i in range(len(ids)):
                        sink += int(p_val[p_off[i]:p_off[i + 1]].sum()) + int(t_val[t_off[i]:t_off[i + 1]].sum())
                        if medium is not None:
                            raw = m_val[m_off[i]:m_off[i + 1]]
                            sink += int(raw.copy()[-1]) if copy_media else int(raw[-1])
                    yield len(ids), None


def _keep(batch):
    return batch


def webdataset_reader(urls: list[str], workers: int) -> Iterator[tuple[int, None]]:
    collate = partial(wds.filters.default_collation_fn, combine_tensors=False)  # media shapes differ
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
               .decode().batched(WDS_BATCH, collation_fn=collate).repeat())  # endless, each worker its shards
    # collate_fn=_keep: the numpy arrays cross the process boundary pickled. The default (tensors in
    # shared memory, one file descriptor each) was 1.5-3x slower here with ~400 arrays per batch.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep,
                        prefetch_factor=2 if workers > 0 else None)
    sink = 0
    for batch in loader:
        for prompt, text, media in zip(batch["prompt.npy"], batch["text.npy"], batch["media.npy"], strict=True):
            sink += int(prompt.sum()) + int(text.sum())
            if media.size:
                sink += int(media.reshape(-1)[-1])
        yield len(batch["__key__"]), None


# --------------------------------------------------------------------------- timing


def measure(make: Callable[[], Iterator[tuple[int, int | None]]], samples: int, min_seconds: float,
            warmup_units: int, tokens_per_sample: float) -> dict[str, float]:
    """Samples/s and tokens/s over at least ``samples`` samples and ``min_seconds``, after
    ``warmup_units`` units (batches) untimed: start-up and the prefetch queue stay out of the count."""
    stream = make()
    try:
        for _ in range(warmup_units):
            next(stream)
        count, tokens = 0, 0.0
        start = time.perf_counter()
        while count < samples or time.perf_counter() - start < min_seconds:
            n, t = next(stream)
            count += n
            tokens += t if t is not None else n * tokens_per_sample
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    return {"samples_per_s": count / seconds, "tokens_per_s": tokens / seconds}


def stage_breakdown(root: Path, data_cfg, tokenizer, repeats: int = 4) -> dict[str, float]:
    """Microseconds per sample of each in-process stage of ours, timed apart (no profiler overhead):
    row lookup (``ArrowDataset.sample``), token layout (``TokenLayout.documents``), best-fit packing
    (``SequencePacker``), ``collate`` (incl. the media copy); and the scan's whole per-row cost.
    The garbage collector is off meanwhile: the stages' outputs are all kept, which a running loader never does."""
    gc.disable()
    try:
        return _stage_breakdown(root, data_cfg, tokenizer, repeats)
    finally:
        gc.enable()


def _stage_breakdown(root: Path, data_cfg, tokenizer, repeats: int) -> dict[str, float]:
    layout = TokenLayout.from_config(data_cfg, tokenizer.special_ids, SEQ_LEN)
    data = PreparedData(root, verify_checksums=False)
    refs = [(ds, row) for ds in data.datasets.values() for row in range(len(ds))]
    refs = [refs[i] for i in np.random.default_rng(0).permutation(len(refs))] * repeats
    for ds, row in refs[: len(refs) // repeats]:  # open and map every shard first
        ds.sample(row)
    start = time.perf_counter()
    samples = [ds.sample(row) for ds, row in refs]
    t_sample = time.perf_counter() - start
    start = time.perf_counter()
    docs = [doc for sample in samples for doc in layout.documents(sample)]
    t_docs = time.perf_counter() - start
    source = iter(docs)
    packer = SequencePacker(SEQ_LEN, DEFAULT_LOOKAHEAD, lambda: next(source))
    start = time.perf_counter()
    rows = [packer.next_row() for _ in range(len(docs) // 200)]  # stops well before the documents run out
    t_pack = time.perf_counter() - start
    packed = sum(len(row) for row in rows)
    for i in range(0, 40 * MICRO_BATCH, MICRO_BATCH):  # warm the allocator (the loader's is warm)
        collate(rows[i : i + MICRO_BATCH], SEQ_LEN, tokenizer.pad_id)
    start = time.perf_counter()
    for i in range(0, len(rows) - MICRO_BATCH + 1, MICRO_BATCH):
        collate(rows[i : i + MICRO_BATCH], SEQ_LEN, tokenizer.pad_id)
    t_collate = time.perf_counter() - start
    stream = scan(root, copy_media=False)
    start, count = time.perf_counter(), 0
    while count < len(refs):
        count += next(stream)[0]
    t_scan = time.perf_counter() - start
    stream.close()
    us = 1e6
    return {"sample": us * t_sample / len(refs), "documents": us * t_docs / len(docs),
            "pack": us * t_pack / packed, "collate": us * t_collate / packed, "scan_total": us * t_scan / count}


def smoke_consumption() -> tuple[float | None, str]:
    """Tokens/s the smoke model trains on this machine, and where the number came from."""
    metrics = ROOT / "runs" / "smoke" / "metrics.jsonl"
    if metrics.is_file():
        rates = [r["tokens_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("tokens_per_s")]
        if rates:
            return statistics.median(rates), (f"median tokens_per_s of {len(rates)} steps in runs/smoke/metrics.jsonl "
                                              "(the smoke run, seq_len 256 x 4, padded positions)")
    llm = ROOT / "bench" / "out" / "llm_step.json"
    if llm.is_file():
        result = json.loads(llm.read_text())
        return result["cases"]["tiny@128x8"]["tokens_per_s"]["ours"], \
            "bench/out/llm_step.json tiny@128x8 (LLM backbone step alone; no smoke run found)"
    return None, "no runs/smoke/metrics.jsonl nor bench/out/llm_step.json"


def profile_in_process(root: Path, data_cfg, tokenizer, samples: int) -> str:
    profiler = cProfile.Profile()
    stream = ours(root, data_cfg, tokenizer, 0)
    next(stream)
    profiler.enable()
    count = 0
    while count < samples:
        count += next(stream)[0]
    profiler.disable()
    stream.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="timed samples per variant and round")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="... and at least this long")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also cProfile ours in-process and print the top")
    args = parser.parse_args()
    cfg = load_config(None, OVERRIDES)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xoron-bench-loader-") as tmp:
        root, build_s = build(cfg, Path(tmp))
        tokenizer = XoronTokenizer.load(root / "tokenizer")
        stats = corpus_stats(root, cfg.data, tokenizer)
        urls = write_tars(root, Path(tmp) / "wds")
        smoke_cfg = load_config(None, OVERRIDES + SMOKE_SHAPE).data
        print(f"corpus: {stats['samples']} samples, {stats['shard_bytes'] / 2**20:.0f} MiB of shards, "
              f"{stats['tokens_per_sample']:.1f} tokens/sample; built in {build_s:.1f} s")
        variants: dict[str, tuple[Callable[[], Iterator], int]] = {}
        for w in (0, 1, 2):
            variants[f"ours/{w}"] = (partial(ours, root, cfg.data, tokenizer, w), 4 * max(1, w) + 4)
        variants["scan/touch"] = (partial(scan, root, False), 4)
        variants["scan/copy"] = (partial(scan, root, True), 4)
        for w in (0, 1, 2):
            variants[f"webdataset/{w}"] = (partial(webdataset_reader, urls, w), 4 * max(1, w) + 2)
        variants["ours-smoke/1"] = (partial(ours, root, smoke_cfg, tokenizer, SMOKE_WORKERS, SMOKE_SEQ_LEN), 12)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                make, warmup = variants[name]
                rounds[name].append(measure(make, args.samples, args.min_seconds, warmup, stats["tokens_per_sample"]))
        stages = stage_breakdown(root, cfg.data, tokenizer)
        profile = profile_in_process(root, cfg.data, tokenizer, args.samples) if args.profile else None
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    spread = {name: (max(r["samples_per_s"] for r in runs) - min(r["samples_per_s"] for r in runs))
              / results[name]["samples_per_s"] for name, runs in rounds.items()}
    limit = results["scan/touch"]["samples_per_s"]
    best = max(("ours/1", "ours/2"), key=lambda n: results[n]["samples_per_s"])
    smoke_tps, smoke_source = smoke_consumption()
    smoke_loader = results["ours-smoke/1"]
    smoke_positions = smoke_loader["tokens_per_s"]  # non-padding; the smoke metric counts padded positions

    print(f"\nloader throughput, {args.samples} samples per variant, median of {args.rounds} rounds "
          f"(seq_len {SEQ_LEN} x {MICRO_BATCH} for ours)")
    print(f"  {'variant':<16}{'workers':>8}{'samples/s':>12}{'tokens/s':>12}{'/ scan':>8}{'spread':>8}")
    for name, res in results.items():
        kind, workers = name.split("/")
        print(f"  {kind:<16}{workers:>8}{res['samples_per_s']:>12,.0f}{res['tokens_per_s']:>12,.0f}"
              f"{res['samples_per_s'] / limit:>8.3f}{spread[name]:>8.1%}")
    ratio = results[best]["samples_per_s"] / limit
    print(f"  headline: {best} / scan/touch = {ratio:.3f} (goal {GOAL})")
    if smoke_tps:
        print(f"  smoke model consumes {smoke_tps:,.0f} tokens/s ({smoke_source}); ours at the smoke shape gives "
              f"{smoke_positions:,.0f} non-padding tokens/s = {smoke_positions / smoke_tps:.0f}x that")
    per_sample = 1e6 / results["ours/0"]["samples_per_s"]
    print("\n  in-process cost per sample, stages timed apart (us): "
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; ours/0 end to end {per_sample:.1f}")
    if profile:
        print("\ncProfile of ours, 0 workers (in-process), by own time:\n" + profile)

    smoke_shape = f"seq_len {SMOKE_SEQ_LEN} x {MICRO_BATCH}, {SMOKE_WORKERS} worker, " + ", ".join(SMOKE_SHAPE)

    def rounded(res: dict[str, float]) -> dict[str, float]:
        return {key: round(value, 1) for key, value in res.items()}

    result = {
        "metric": f"loader samples/s, ArrowDataLoader (best of 1/2 workers: {best}, seq_len {SEQ_LEN} x "
                  f"{MICRO_BATCH}, decode + pack + collate + IPC) / raw pyarrow mmap scan, higher is better",
        "unit": "samples/s",
        "ours": round(results[best]["samples_per_s"], 1),
        "peer": round(limit, 1),
        "peer_name": f"plain pyarrow {pa.__version__} memory-mapped scan of the same shards (every row's id and "
                     "token lists as numpy, one byte per medium; no shuffle, no packing, one process)",
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "machine": machine(),
        "details": {
            "variants": {name: rounded(res) | {"vs_scan": round(res["samples_per_s"] / limit, 3),
                                               "spread": round(spread[name], 3)}
                         for name, res in results.items()},
            "ratio_vs_scan_copy": round(results[best]["samples_per_s"] / results["scan/copy"]["samples_per_s"], 3),
            "ratio_vs_best_webdataset": round(results[best]["samples_per_s"] / max(
                results[f"webdataset/{w}"]["samples_per_s"] for w in (0, 1, 2)), 3),
            "ratio_vs_webdataset_same_workers": {
                str(w): round(results[f"ours/{w}"]["samples_per_s"] / results[f"webdataset/{w}"]["samples_per_s"], 3)
                for w in (0, 1, 2)},
            "smoke": {
                "model_tokens_per_s": round(smoke_tps, 1) if smoke_tps else None,
                "source": smoke_source,
                "loader_at_smoke_shape": rounded(smoke_loader) | {"shape": smoke_shape},
                "margin": round(smoke_positions / smoke_tps, 1) if smoke_tps else None,
            },
            "corpus": {**stats, "tokens_per_sample": round(stats["tokens_per_sample"], 2), "build_s": round(build_s, 1),
                       "overrides": OVERRIDES},
            "in_process_us_per_sample": {k: round(v, 2) for k, v in stages.items()}
            | {"ours_0_end_to_end": round(per_sample, 2)},
            "samples_per_round": args.samples,
            "min_seconds_per_round": args.min_seconds,
            "rounds": args.rounds,
            "webdataset": f"webdataset {wds.__version__}, {WDS_SHARDS} tar shards, .decode().batched({WDS_BATCH}), "
                          "torch DataLoader batch_size=None with an identity collate_fn (numpy arrays cross "
                          "processes pickled), no shuffle",
            "wall_s": round(time.perf_counter() - wall, 1),
        },
    }
    print(f"\n-> {write_result('loader', result)}")


if __name__ == "__main__":
    main()
