"""The conversion driver: plan units, convert them in processes and MPI ranks, resume, write the manifest.

Output folder::

    DIR/manifest.json            Manifest (written last: its presence means the conversion finished)
    DIR/rejects.jsonl            {source, line | key, id, reason} per rejected sample, in input order
    DIR/tokenizer/               the tokenizer the tokens were made with (tokenizer.json + ids)
    DIR/<kind>/<source>-u<unit>-<n>.arrow   Arrow IPC file shards, schema_for(kind)
    DIR/units/<source>-u<unit>.json         one record per finished unit: its shards, stats, rejects
    DIR/prep_state.json          the settings, tokenizer and inputs this folder is being built from

Each unit (``samples_per_unit`` consecutive samples of one source) writes its own shards and then
its record, so units run anywhere in any order: in ``workers`` processes (spawned) on one machine,
and round-robin over MPI ranks (rank r takes units r, r + size, ...; the output folder must be
shared). Rank 0 plans, gathers the unit records and writes the manifest from them in input order,
so the manifest is the same for any number of processes or ranks.

Resume: a folder with ``prep_state.json`` but no manifest is a conversion that stopped; running
again with the same settings and inputs reuses every unit whose record and shards check out (size
and sha256) and redoes the rest. A finished folder is only reopened with ``resume=True`` (the same
check, then the manifest again). Different settings or changed inputs are an error, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from data_prep.errors import PrepError, RejectedSample, describe_reject
from data_prep.ranks import Ranks
from data_prep.rows import RowBuilder
from data_prep.sources import SourceFile, SourcePlan, Unit, discover_sources, plan_source, read_unit
from data_prep.writer import ArrowShardWriter
from xoron_dist.config import PrepConfig, XoronConfig
from xoron_dist.data.schema import (
    KINDS,
    MANIFEST_FILE,
    REJECTS_FILE,
    CorruptShardError,
    DatasetInfo,
    Manifest,
    ShardInfo,
    sha256_file,
    verify_shard,
)
from xoron_dist.tokenizer import TOKENIZER_FILE, XoronTokenizer, build_tokenizer

log = logging.getLogger("xoron.prep")

STATE_FILE = "prep_state.json"
STATE_FORMAT = "xoron-prep-state-v1"
UNITS_DIR = "units"
TOKENIZER_DIR = "tokenizer"
PROGRESS_LOG_SECONDS = 30.0  # without a terminal: one progress line at most this often

T = TypeVar("T")


@dataclass
class UnitResult:
    """What one unit produced; saved as ``units/<unit>.json``."""

    unit: str
    fingerprint: str
    samples: int
    shards: dict[str, list[ShardInfo]]
    stats: dict[str, dict[str, int]]
    rejects: list[dict[str, Any]]
    reused: bool = field(default=False, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("reused")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        raw = json.loads(text)
        shards = {kind: [ShardInfo(**s) for s in infos] for kind, infos in raw["shards"].items()}
        return cls(raw["unit"], raw["fingerprint"], raw["samples"], shards, raw["stats"], raw["rejects"])


@dataclass(frozen=True)
class UnitJob:
    """Everything a process needs to convert units (picklable: sent to spawned workers)."""

    out: Path
    prep: PrepConfig
    settings_sha256: str
    strict: bool
    max_consecutive_rejects: int
    data_root: Path | None = None  # where JSONL media must lead (None: each JSONL's folder), absolute
    allow_outside_root: bool = False


@dataclass
class _Setup:
    sources: list[SourceFile]
    plans: list[SourcePlan]
    job: UnitJob
    tokenizer_info: dict[str, Any]


# --------------------------------------------------------------------------- public API


def prepare(
    inputs: list[Path],
    out: Path,
    cfg: XoronConfig,
    *,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    resume: bool = False,
    max_consecutive_rejects: int = 0,
    ranks: Ranks | None = None,
    data_root: Path | None = None,
    allow_outside_root: bool = False,
    dataset_format: str | None = None,
) -> Manifest:
    """Convert ``inputs`` (JSONL, JSON, Parquet, webdataset tars, folders of them) into ``out``; return the manifest.

    ``workers``: processes on this machine. ``strict``: the first rejected sample stops the run
    (``PrepError`` with the reject's message). ``resume``: reopen a finished folder (a partial one
    is resumed without it). ``max_consecutive_rejects`` (0: no bound): that many rejects in a row
    within a unit stop the run, a sign of a systematic problem (a wrong media folder) rather than
    a few bad files. ``ranks``: the MPI ranks sharing the work (``ranks.detect_ranks()``; default
    this process alone). ``data_root``: the folder JSONL media paths must stay inside (default: each
    JSONL's own folder); ``allow_outside_root``: also read absolute paths and paths leading out of it
    (see ``sources``). ``dataset_format``: convert every JSONL/JSON/Parquet record with this format of
    ``data_prep.datasets.REGISTRY`` instead of detecting each one's. Every rank returns the manifest;
    only rank 0 writes it.
    """
    ranks = ranks or Ranks()
    out = Path(out)
    if workers < 1:
        raise PrepError(f"--workers must be >= 1, got {workers}")
    if max_consecutive_rejects < 0:
        raise PrepError(f"--max-consecutive-rejects must be >= 0 (0: no bound), got {max_consecutive_rejects}")
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise PrepError(f"--data-root {data_root} is not a folder; name the folder that holds the media")
        data_root = Path(data_root).resolve()
    setup = _rank0_first(ranks, lambda: _setup(inputs, out, cfg, strict, resume, max_consecutive_rejects,
                                               data_root, allow_outside_root, dataset_format))
    units = [unit for plan in setup.plans for unit in plan.units]
    mine = units[ranks.rank :: ranks.size]
    show = progress and ranks.rank == 0
    try:
        tokenizer = XoronTokenizer.load(out / TOKENIZER_DIR)
        results = _run_units(mine, setup.job, tokenizer, workers, _Progress(len(mine), show))
        report: tuple[list[UnitResult] | None, str | None] = (results, None)
    except Exception as err:
        if ranks.size == 1:
            raise
        report = (None, f"rank {ranks.rank}: {err}")
    gathered = ranks.gather(report)
    return _rank0_first(ranks, lambda: _finish(setup, gathered))


# --------------------------------------------------------------------------- set-up (rank 0)


def _setup(inputs: list[Path], out: Path, cfg: XoronConfig, strict: bool, resume: bool,
           max_consecutive_rejects: int, data_root: Path | None, allow_outside_root: bool,
           dataset_format: str | None = None) -> _Setup:
    prep = cfg.data.prep
    for medium in ("image", "video"):
        size = getattr(prep, f"{medium}_size")
        if getattr(prep, f"{medium}_resize") == "max_side" and size < prep.patch_multiple:
            raise PrepError(
                f"data.prep.{medium}_size = {size} with {medium}_resize = max_side: sides are rounded down to "
                f"multiples of data.prep.patch_multiple ({prep.patch_multiple}), so the size must be at least that"
            )
    sources = discover_sources([Path(p) for p in inputs], dataset_format=dataset_format)
    _check_output_folder(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg, out / TOKENIZER_DIR)
    tokenizer_info = {
        "kind": "pretrained" if cfg.tokenizer.path else "bpe",
        "path": TOKENIZER_DIR,
        "sha256": sha256_file(out / TOKENIZER_DIR / TOKENIZER_FILE),
        "vocab_size": tokenizer.vocab_size,
        "regular_vocab_size": tokenizer.regular_vocab_size,
    }
    state = {
        "format": STATE_FORMAT,
        "preprocessing": asdict(prep),
        "tokenizer": tokenizer_info,
        "sources": [{"name": s.name, "bytes": s.path.stat().st_size, "mtime_ns": s.path.stat().st_mtime_ns}
                    for s in sources],
        # which media paths are read decides which samples are rejected
        "media_paths": {"data_root": None if data_root is None else Path(os.path.relpath(data_root)).as_posix(),
                        "allow_outside_root": allow_outside_root},
        "dataset_format": dataset_format,  # a forced record format converts other samples
    }
    _check_or_write_state(out, state)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the folder is a conversion in progress
    plans = [plan_source(source, prep.samples_per_unit) for source in sources]
    for plan in plans:
        if strict and plan.rejects:
            raise PrepError(f"--strict: {describe_reject(plan.rejects[0])}")
    settings = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    job = UnitJob(out, prep, settings, strict, max_consecutive_rejects, data_root, allow_outside_root)
    log.info("%d sources, %d samples, %d units", len(sources), sum(p.samples for p in plans),
             sum(len(p.units) for p in plans))
    return _Setup(sources, plans, job, tokenizer_info)


def _check_output_folder(out: Path, resume: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise PrepError(f"--out {out} exists and is not a folder")
    if (out / STATE_FILE).is_file():
        if (out / MANIFEST_FILE).is_file() and not resume:
            raise PrepError(
                f"{out} already holds a finished conversion ({MANIFEST_FILE}); pass --resume to check its "
                "shards and redo damaged ones, or choose another --out"
            )
        return
    if {p.name for p in out.iterdir()} - {TOKENIZER_DIR}:
        raise PrepError(f"--out {out} is not empty and holds no xoron prep state ({STATE_FILE}); "
                        "give an empty or new folder")


def _check_or_write_state(out: Path, state: dict[str, Any]) -> None:
    path = out / STATE_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = [key for key in state if recorded.get(key) != state[key]]
        if differ:
            raise PrepError(
                f"{out} holds a conversion made with different {' and '.join(differ)} (see {path}); "
                "delete the folder or choose another --out"
            )
        log.info("resuming the conversion in %s", out)
        return
    _write_atomic(path, json.dumps(state, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- units


def unit_fingerprint(job: UnitJob, unit: Unit) -> str:
    described = [job.settings_sha256, unit.source.name, unit.index, unit.offset, unit.first, unit.count,
                 unit.first_line, list(unit.duplicates)]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def convert_unit(unit: Unit, job: UnitJob, builder: RowBuilder) -> UnitResult:
    """Convert one unit, or reuse its earlier result when its record and shards check out."""
    fingerprint = unit_fingerprint(job, unit)
    earlier = _finished_unit(unit, job.out, fingerprint)
    if earlier is not None:
        return earlier
    _remove_unit_files(job.out, unit)
    writers: dict[str, ArrowShardWriter] = {}
    stats: dict[str, dict[str, int]] = {}
    rejects: list[dict[str, Any]] = []
    in_a_row = 0
    try:
        for sample in read_unit(unit, job.data_root, job.allow_outside_root):
            try:
                row = builder.build(sample)
            except RejectedSample as rejected:
                record = sample.reject_record(rejected.reason)
                if job.strict:
                    raise PrepError(f"--strict: {describe_reject(record)}") from None
                rejects.append(record)
                in_a_row += 1
                if job.max_consecutive_rejects and in_a_row >= job.max_consecutive_rejects:
                    raise PrepError(
                        f"{in_a_row} samples in a row rejected in unit {unit.name} (the last: "
                        f"{describe_reject(record)}); stopping, as this looks systematic "
                        "(--max-consecutive-rejects)"
                    ) from None
                continue
            in_a_row = 0
            writer = writers.get(row.kind)
            if writer is None:
                writer = writers[row.kind] = ArrowShardWriter(job.out, row.kind, unit.name, job.prep.shard_bytes)
            writer.write(row.values, row.nbytes)
            totals = stats.setdefault(row.kind, {})
            for key, value in row.stats.items():
                totals[key] = totals.get(key, 0) + value
        shards = {kind: writers[kind].close() for kind in sorted(writers)}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    result = UnitResult(unit.name, fingerprint, unit.count, shards, stats, rejects)
    _write_atomic(job.out / UNITS_DIR / f"{unit.name}.json", result.to_json())
    return result


def _finished_unit(unit: Unit, out: Path, fingerprint: str) -> UnitResult | None:
    path = out / UNITS_DIR / f"{unit.name}.json"
    if not path.is_file():
        return None
    try:
        result = UnitResult.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        log.warning("unit %s: unreadable record %s (%s); converting it again", unit.name, path, err)
        return None
    if result.fingerprint != fingerprint:
        log.warning("unit %s: its record is from another plan; converting it again", unit.name)
        return None
    try:
        for infos in result.shards.values():
            for info in infos:
                verify_shard(out, info, checksum=True)
    except CorruptShardError as err:
        log.warning("unit %s: %s; converting it again", unit.name, err)
        return None
    result.reused = True
    return result


def _remove_unit_files(out: Path, unit: Unit) -> None:
    """Shards (finished or .tmp) left by an earlier, interrupted attempt at this unit."""
    (out / UNITS_DIR / f"{unit.name}.json").unlink(missing_ok=True)
    for kind in KINDS:
        folder = out / kind
        if folder.is_dir():
            for path in folder.glob(f"{unit.name}-*.arrow*"):
                path.unlink()


# --------------------------------------------------------------------------- running units

_worker: tuple[UnitJob, RowBuilder] | None = None


def _init_worker(job: UnitJob) -> None:
    global _worker
    _worker = (job, RowBuilder(job.prep, XoronTokenizer.load(job.out / TOKENIZER_DIR)))


def _convert_in_worker(unit: Unit) -> UnitResult:
    assert _worker is not None, "worker process not initialised"
    return convert_unit(unit, *_worker)


def _run_units(units: list[Unit], job: UnitJob, tokenizer: XoronTokenizer, workers: int,
               progress: _Progress) -> list[UnitResult]:
    results: list[UnitResult] = []
    if workers == 1 or len(units) <= 1:
        builder = RowBuilder(job.prep, tokenizer)
        for unit in units:
            results.append(convert_unit(unit, job, builder))
            progress.update(results[-1])
    else:
        # spawn: a fresh interpreter per worker (no forked MPI or thread state).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(units)), mp_context=context, initializer=_init_worker,
                                 initargs=(job,)) as pool:
            futures = [pool.submit(_convert_in_worker, unit) for unit in units]
            try:
                for future in as_completed(futures):
                    results.append(future.result())
                    progress.update(results[-1])
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    progress.close()
    return results


class _Progress:
    """A tqdm bar over units on a terminal; otherwise a log line every PROGRESS_LOG_SECONDS."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.samples = self.rejects = self.reused = 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="unit", desc="prep", dynamic_ncols=True)

    def update(self, result: UnitResult) -> None:
        self.done += 1
        self.samples += result.samples
        self.rejects += len(result.rejects)
        self.reused += result.reused
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(samples=self.samples, rejects=self.rejects, refresh=False)
        elif self.enabled and time.monotonic() - self.last_log >= PROGRESS_LOG_SECONDS:
            self.last_log = time.monotonic()
            self._log()

    def _log(self) -> None:
        log.info("%d/%d units (%d reused), %d samples, %d rejects, %.0f s", self.done, self.total, self.reused,
                 self.samples, self.rejects, time.monotonic() - self.start)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self._log()


# --------------------------------------------------------------------------- manifest (rank 0)


def _finish(setup: _Setup, gathered: list[Any] | None) -> Manifest:
    assert gathered is not None
    for _, error in gathered:
        if error is not None:
            raise PrepError(error)
    by_name = {result.unit: result for results, _ in gathered for result in results}
    datasets: dict[str, DatasetInfo] = {}
    rejects: list[dict[str, Any]] = []
    prep = setup.job.prep
    for plan in setup.plans:
        for unit in plan.units:
            result = by_name[unit.name]
            rejects.extend(result.rejects)
            for kind, shards in result.shards.items():
                dataset = datasets.setdefault(kind, DatasetInfo(kind))
                dataset.shards.extend(shards)
                for key, value in result.stats[kind].items():
                    dataset.stats[key] = dataset.stats.get(key, 0) + value
        rejects.extend(plan.rejects)
    for dataset in datasets.values():
        if "audio_samples" in dataset.stats:
            dataset.stats["audio_seconds"] = dataset.stats["audio_samples"] / prep.audio_sample_rate
    out = setup.job.out
    _write_atomic(out / REJECTS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    manifest = Manifest(
        datasets=dict(sorted(datasets.items())),
        tokenizer=setup.tokenizer_info,
        preprocessing=asdict(prep),
        sources=[source.name for source in setup.sources],
        rejects=len(rejects),
    )
    manifest.write(out)
    return manifest


# --------------------------------------------------------------------------- helpers


def _rank0_first(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 and hand its result (or its failure) to every rank."""
    if ranks.size == 1:
        return work()
    outcome: tuple[Any, str | None] = (None, None)
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            outcome = (work(), None)
        except Exception as err:
            failure = err
            outcome = (None, str(err))
    value, error = ranks.bcast(outcome)
    if failure is not None:
        raise failure
    if error is not None:
        raise PrepError(error)
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
