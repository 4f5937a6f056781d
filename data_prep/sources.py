"""Input files -> units of work -> raw samples, alike for JSONL manifests, JSON arrays, Parquet and webdataset tars.

A *source* is one input file. Its name in the prepared data (the ``source`` column, the shard
file names, the unit names) is the file's stem: ``data/captions.jsonl`` and ``data/captions.tar``
are both ``captions``, so the same samples in either format give byte-identical shards. Two
inputs with the same stem in one run are an error.

A source is cut into *units* of ``samples_per_unit`` consecutive samples. ``plan_source`` reads
the file once (JSONL lines; tar headers and the small ``json`` members, not the media) to count
samples, find where each unit starts (byte offset) and flag repeated ids; ``read_unit`` then
reads one unit from its offset, so units can run in any process in any order.

JSONL: one JSON object per non-blank line; media paths relative to the file's folder. Blank lines
are skipped; every other line is a sample (a malformed one becomes a reject naming its line).
Media paths are contained: each must resolve (``..`` and symbolic links followed) inside the data
root, the JSONL's own folder unless ``--data-root`` names another, and absolute paths are refused;
``--allow-outside-root`` lifts both for manifests the user trusts. A refused path is a rejected
sample, and messages name media relative to the data root, never by an absolute path.

Parquet: one sample per row (Hugging Face dataset repositories publish their splits this way), read
in batches of ``PARQUET_BATCH_ROWS`` rows from the row group holding a unit's first row, never the
whole file; a unit's offset is its first row's index. Planning reads only the footer and an ``id``
column. A cell holding a Hugging Face ``Image()``/``Audio()`` struct (``{"bytes", "path"}``) becomes
a ``Blob`` of its bytes (its path, relative to the file's folder, when the bytes are null). Rejects
name ``{"row": n}`` (from 1). JSON: a ``.json`` file holding an array is read element by element
(the file is memory-mapped; a scan for strings and brackets finds where each element ends, so a unit
starts at an element's byte offset and parses only its own elements; a malformed element is a reject
like a malformed JSONL line); a ``.json`` file that is not an array is read as JSON Lines (many
repositories publish JSON Lines under ``.json``).
JSONL, JSON and Parquet records pass through ``data_prep.datasets.to_native`` (the dataset registry
of ``data_prep.datasets``, or the one format ``--format`` names) before their ``image``/``video``/
``audio`` fields become media, so a dataset's own media column names map onto ours.

Tar (webdataset layout): members are grouped into samples by key, the name up to the first dot
of the file name (webdataset's ``base_plus_ext``), consecutive members sharing it;
suffixes are lower-cased. Per sample: ``json`` (the fields), and the media: ``png``/``jpg``/
``jpeg`` (image), ``wav``/``flac`` (audio), ``mp4`` (video) or ``frameNNN.png|jpg|jpeg``
(video frames, in name order: zero-pad the numbers). Media path fields inside the json are
ignored; any other member suffix rejects the sample. Non-file members and webdataset meta
members (``__name__``) are skipped. A damaged tar keeps the samples before the damage and
reports the rest as one reject.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_prep.datasets import to_native
from data_prep.errors import PrepError
from data_prep.formats import FormatError
from data_prep.media import IMAGE_EXTENSIONS, Blob, FrameList

logger = logging.getLogger(__name__)

MEDIA_FIELDS = ("image", "video", "audio")
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".tar")
PARQUET_BATCH_ROWS = 64  # rows decoded at a time: media columns make rows large
# webdataset.tariterators.base_plus_ext's rule (key = path up to the first dot of the file name),
# written out because importing webdataset imports torch: ~0.8 s in every worker, for one regex.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_FRAME_MEMBER = re.compile(r"frame\d+\.(png|jpe?g)")


@dataclass(frozen=True)
class SourceFile:
    """``path``: absolute; ``name``: as recorded in ``Manifest.sources`` (relative to the working
    folder); ``source``: the stem, used in rows and file names."""

    path: Path
    name: str
    source: str
    format: Literal["jsonl", "tar", "parquet", "json"]
    dataset_format: str | None = None  # a registered record format forced on every record (--format)


@dataclass(frozen=True)
class Unit:
    """``count`` consecutive samples of one source, starting at byte ``offset`` (the sample
    ``first`` of the source; for JSONL on line ``first_line``). ``duplicates``: (sample number
    in the source, where its id was first seen) for samples whose id repeats an earlier one."""

    source: SourceFile
    index: int
    offset: int
    first: int
    count: int
    first_line: int = 0
    duplicates: tuple[tuple[int, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.source.source}-u{self.index:05d}"


@dataclass
class SourcePlan:
    units: list[Unit]
    samples: int
    rejects: list[dict[str, Any]] = field(default_factory=list)  # problems with the file itself


@dataclass
class RawSample:
    """One sample as read, before any check. ``where``: ``{"line": n}`` or ``{"key": k}``.
    ``error``: a problem the reader already found (malformed JSON, unreadable member)."""

    source: SourceFile
    where: dict[str, Any]
    fields: Any = None
    media: dict[str, Blob | FrameList] = field(default_factory=dict)
    error: str | None = None
    duplicate_of: str | None = None

    @property
    def id(self) -> str | None:
        value = self.fields.get("id") if isinstance(self.fields, dict) else None
        return value if isinstance(value, str) else None

    def reject_record(self, reason: str) -> dict[str, Any]:
        return {"source": self.source.name, **self.where, "id": self.id, "reason": reason}


# --------------------------------------------------------------------------- inputs


def discover_sources(inputs: list[Path], cwd: Path | None = None,
                     dataset_format: str | None = None) -> list[SourceFile]:
    """Input arguments (JSONL, JSON, Parquet and tar files, folders of them) -> sources in processing order.

    A folder contributes its ``*.jsonl``, ``*.json`` (not metadata files: ``_is_metadata_json``),
    ``*.parquet`` and ``*.tar``, sorted by name. ``dataset_format``: a name in
    ``data_prep.datasets.REGISTRY`` to convert every record with.
    """
    if dataset_format is not None:
        from data_prep.datasets import resolve

        try:
            resolve(dataset_format)
        except ValueError as err:
            raise PrepError(f"--format: {err}") from None
    cwd = Path(cwd or os.getcwd())
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES
                           and not _is_metadata_json(p))
            if not found:
                raise PrepError(f"input folder {path} holds no *.jsonl or *.tar, *.json or *.parquet files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise PrepError(f"input {path}: expected a .jsonl manifest, a .json array, a .parquet file, "
                                "a webdataset .tar or a folder of them")
            files.append(path)
        else:
            raise PrepError(f"input {path} does not exist")
    sources: list[SourceFile] = []
    seen: dict[str, Path] = {}
    for path in files:
        stem = path.stem
        if stem in seen:
            raise PrepError(
                f"inputs {seen[stem]} and {path} share the source name '{stem}' (the file stem names the "
                "shards and the rows' source); rename one"
            )
        seen[stem] = path
        absolute = path.resolve()
        name = Path(os.path.relpath(absolute, cwd)).as_posix()
        sources.append(SourceFile(absolute, name, stem, _file_format(absolute), dataset_format))
    if not sources:
        raise PrepError("no inputs given: pass JSONL, JSON, Parquet or webdataset .tar files or folders of them")
    return sources


def _is_metadata_json(path: Path) -> bool:
    """A folder's ``.json`` that describes the data rather than holding it (``synth.json``,
    ``dataset_info.json``, ...): neither an array nor JSON Lines, i.e. its first line is not a whole JSON
    value (a pretty-printed object). Skipped when a folder is scanned; a file named on the command line is
    read whatever it holds."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        first = f.readline(1 << 20).strip()
    if not first or first.startswith(b"["):
        return False
    try:
        json.loads(first)
    except ValueError:
        logger.info("input folder: %s is not an array or JSON Lines (metadata?); skipped", path)
        return True
    return False


def _file_format(path: Path) -> Literal["jsonl", "tar", "parquet", "json"]:
    """By suffix; a ``.json`` file is a JSON array when its first non-blank byte is ``[``, else JSON Lines
    (many dataset repositories publish JSON Lines under ``.json``)."""
    if path.suffix != ".json":
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "tar")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


# --------------------------------------------------------------------------- planning


class _UnitCutter:
    """Collects sample starts and ids while a source is scanned, and cuts them into units."""

    def __init__(self, source: SourceFile, samples_per_unit: int) -> None:
        self.source, self.per_unit = source, samples_per_unit
        self.units: list[Unit] = []
        self.samples = 0
        self.first_seen: dict[str, str] = {}
        self.duplicates: list[tuple[int, str]] = []
        self._start: tuple[int, int] | None = None  # offset, line of the current unit's first sample

    def sample(self, offset: int, line: int, sample_id: Any, where: str) -> None:
        if self.samples % self.per_unit == 0:
            self._close()
            self._start = (offset, line)
        if isinstance(sample_id, str):
            if sample_id in self.first_seen:
                self.duplicates.append((self.samples, self.first_seen[sample_id]))
            else:
                self.first_seen[sample_id] = where
        self.samples += 1

    def _close(self) -> None:
        if self._start is None:
            return
        index = len(self.units)
        first = index * self.per_unit
        count = self.samples - first
        dups = tuple(d for d in self.duplicates if first <= d[0] < first + count)
        self.units.append(Unit(self.source, index, self._start[0], first, count, self._start[1], dups))
        self._start = None

    def finish(self, rejects: list[dict[str, Any]]) -> SourcePlan:
        self._close()
        return SourcePlan(self.units, self.samples, rejects)


def plan_source(source: SourceFile, samples_per_unit: int) -> SourcePlan:
    """Scan one source and cut it into units (see the module docstring)."""
    cutter = _UnitCutter(source, samples_per_unit)
    if source.format == "jsonl":
        with open(source.path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    cutter.sample(offset, number, _json_id(line), f"line {number}")
                offset += len(line)
        return cutter.finish([])
    if source.format == "parquet":
        return _plan_parquet(source, cutter)
    if source.format == "json":
        with open(source.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            first = m.find(b"[") + 1  # _file_format saw "[" as the first non-blank byte
            for number, (begin, end) in enumerate(_json_array_spans(m, first), start=1):
                cutter.sample(begin, number, _json_id(m[begin:end]), f"row {number}")
        return cutter.finish([])
    rejects: list[dict[str, Any]] = []
    groups = _tar_groups(source.path, 0, read=lambda suffix: suffix == "json")
    try:
        for key, offset, members in groups:
            cutter.sample(offset, 0, _json_id(members.get("json", b"")), f"key {key}")
    except (tarfile.TarError, OSError, EOFError) as err:
        rejects.append({"source": source.name, "key": None, "id": None,
                        "reason": f"the tar is damaged after {cutter.samples} samples ({err}); "
                                  "the members from there on were skipped"})
    return cutter.finish(rejects)


def _plan_parquet(source: SourceFile, cutter: _UnitCutter) -> SourcePlan:
    """Rows are counted from the footer; only an ``id`` column is read (in batches) to flag repeats."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        return cutter.finish([{"source": source.name, "row": None, "id": None,
                               "reason": f"not a readable Parquet file ({err})"}])
    row = 0
    if "id" in parquet.schema_arrow.names:
        for batch in parquet.iter_batches(batch_size=4096, columns=["id"]):
            for value in batch.column(0).to_pylist():
                cutter.sample(row, row + 1, value, f"row {row + 1}")
                row += 1
    else:
        for _ in range(parquet.metadata.num_rows):
            cutter.sample(row, row + 1, None, f"row {row + 1}")
            row += 1
    return cutter.finish([])


# A JSON string (escapes included) or one structural byte: enough to find where array elements end.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


def _json_array_spans(m: mmap.mmap, pos: int) -> Iterator[tuple[int, int]]:
    """(begin, end) byte spans of the elements of a JSON array, from ``pos`` (just after ``[`` or at an
    element) to the closing ``]``, found without parsing them or holding the file (``m`` is mapped). A
    malformed element still gets a span (its parse then fails and it is rejected); a file cut short ends
    with a span running to its end."""
    size = len(m)
    while True:
        while pos < size and m[pos:pos + 1].isspace():
            pos += 1
        if pos >= size or m[pos:pos + 1] == b"]":
            return
        begin, depth, end = pos, 0, size
        for token in _JSON_TOKEN.finditer(m, pos):
            char = m[token.start():token.start() + 1]
            if char in (b"[", b"{"):
                depth += 1
            elif char in (b"]", b"}"):
                depth -= 1
                if depth < 0:  # the array's own "]"
                    end = token.start()
                    break
            elif char == b"," and depth == 0:
                end = token.start()
                break
        yield begin, end
        if end >= size or m[end:end + 1] == b"]":
            return
        pos = end + 1


def _json_id(raw: bytes) -> Any:
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return fields.get("id") if isinstance(fields, dict) else None


# --------------------------------------------------------------------------- reading


def read_unit(unit: Unit, data_root: Path | None = None, allow_outside_root: bool = False) -> Iterator[RawSample]:
    """The unit's samples, in order, each with its reader-level problems recorded (never raises
    for a bad sample; an input that vanished or shrank since planning raises ``PrepError``).

    ``data_root``: where JSONL media paths must lead (None: the JSONL's folder);
    ``allow_outside_root``: accept absolute paths and paths leading out of it."""
    duplicates = dict(unit.duplicates)
    folder = unit.source.path.parent
    root = data_root or folder
    forced = None
    if unit.source.dataset_format is not None:
        from data_prep.datasets import resolve

        forced = resolve(unit.source.dataset_format)
    if unit.source.format == "tar":
        samples = _read_tar(unit)
    else:
        reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "json": _read_json_array}[unit.source.format]
        samples = (_native_sample(sample, forced, folder, root, allow_outside_root) for sample in reader(unit))
    count = 0
    for sample in samples:
        sample.duplicate_of = duplicates.get(unit.first + count)
        yield sample
        count += 1
        if count == unit.count:
            return
    raise PrepError(f"{unit.source.name} ended after {count} of the {unit.count} samples of unit {unit.name}: "
                    "the input changed while it was being converted")


def _read_jsonl(unit: Unit) -> Iterator[RawSample]:
    with open(unit.source.path, "rb") as f:
        f.seek(unit.offset)
        for number, line in enumerate(f, start=unit.first_line):
            if not line.strip():
                continue
            sample = RawSample(unit.source, {"line": number})
            try:
                sample.fields = json.loads(line)
            except UnicodeDecodeError:
                sample.error = "the line is not valid UTF-8"
            except ValueError as err:
                sample.error = f"malformed JSON: {err}"
            yield sample


def _read_parquet(unit: Unit) -> Iterator[RawSample]:
    """Row batches from the row group that holds the unit's first row; HF media structs become Blobs."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(unit.source.path)
        group, start = 0, 0
        while start + parquet.metadata.row_group(group).num_rows <= unit.offset:
            start += parquet.metadata.row_group(group).num_rows
            group += 1
        row = start
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                       row_groups=range(group, parquet.metadata.num_row_groups))
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                if row <= unit.offset:
                    continue
                yield RawSample(unit.source, {"row": row},
                                _media_structs(record, f"{unit.source.path.name}:row {row}"))
    except (OSError, ValueError, IndexError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise PrepError(f"{unit.source.name}: the Parquet file cannot be read in unit {unit.name} ({err}); "
                        "it changed or is damaged after planning") from err


def _media_structs(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Hugging Face ``Image()``/``Audio()`` cells (``{"bytes", "path"}``) -> a Blob of the bytes, or the
    path (relative to the file's folder) when the bytes are absent."""
    for column, value in record.items():
        if isinstance(value, dict) and "bytes" in value and set(value) <= {"bytes", "path", "sampling_rate"}:
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                ext = Path(path).suffix.lower().lstrip(".") if isinstance(path, str) else ""
                record[column] = Blob(f"{where}.{column}", ext, data=bytes(data))
            else:
                record[column] = path
    return record


def _read_json_array(unit: Unit) -> Iterator[RawSample]:
    """Elements of a JSON array from the unit's first one (a byte offset), parsed one at a time."""
    with open(unit.source.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for number, (begin, end) in enumerate(_json_array_spans(m, unit.offset), start=unit.first_line):
            sample = RawSample(unit.source, {"row": number})
            try:
                sample.fields = json.loads(m[begin:end])
            except UnicodeDecodeError:
                sample.error = "the element is not valid UTF-8"
            except ValueError as err:
                sample.error = f"malformed JSON: {err}"
            yield sample


def _native_sample(sample: RawSample, forced: Any, folder: Path, root: Path, allow_outside_root: bool) -> RawSample:
    """Convert the record to ours (``data_prep.datasets.to_native``), then turn its media fields into Blobs:
    a path (relative to the input's folder, contained in ``root``) or bytes from a Parquet cell."""
    if sample.error is not None or not isinstance(sample.fields, dict):
        return sample
    place = sample.where.get("line", sample.where.get("row"))
    try:
        sample.fields = to_native(sample.fields, f"{sample.source.source}-{place}", forced)
    except FormatError as err:
        sample.error = str(err)
        return sample
    for name in MEDIA_FIELDS:
        if name not in sample.fields:
            continue
        value = sample.fields.pop(name)
        if isinstance(value, (bytes, Blob)):
            sample.media[name] = value if isinstance(value, Blob) else Blob(f"{sample.source.path.name}:{place}.{name}",
                                                                            "", data=value)
            continue
        if not isinstance(value, str) or not value:
            sample.error = sample.error or f"field '{name}' must be a non-empty path string, got {value!r}"
            continue
        if Path(value).is_absolute() and not allow_outside_root:
            sample.error = sample.error or (
                f"field '{name}' is an absolute path; write media paths relative to the manifest's "
                "folder (or pass --allow-outside-root for a manifest you trust)"
            )
            continue
        sample.media[name] = _media_blob(value, folder, root, allow_outside_root)
    return sample


def _media_blob(value: str, folder: Path, root: Path, allow_outside_root: bool) -> Blob:
    """A JSONL media path as a Blob named relative to the data root (as written, when an allowed
    path leads outside it). Whether it really stays inside is checked when it is opened."""
    path = Path(os.path.normpath(folder / value))
    relative = os.path.relpath(path, root)
    outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
    name = value if allow_outside_root and outside else Path(relative).as_posix()
    return Blob(name, path.suffix.lower().lstrip("."), path, root=None if allow_outside_root else root)


def _tar_groups(path: Path, offset: int, read) -> Iterator[tuple[str, int, dict[str, bytes | None]]]:
    """(key, offset of its first member, {suffix: bytes, or None where ``read(suffix)`` is false})
    for each run of consecutive members sharing a key, from byte ``offset`` on. A member without an
    extension is a group of its own under the suffix ``""``."""
    with open(path, "rb") as f:
        f.seek(offset)
        tar = tarfile.open(fileobj=f, mode="r:")
        current: tuple[str, int, dict[str, bytes | None]] | None = None
        while True:
            info = tar.next()
            if info is None:
                break
            tar.members = []  # tarfile keeps every header it read; a unit needs none of them
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, suffix = split_member_name(info.name)
            suffix = suffix.lower()
            if current is None or key != current[0] or suffix in current[2] or suffix == "":
                if current is not None:
                    yield current
                current = (key, info.offset, {})
            extracted = tar.extractfile(info)
            current[2][suffix] = extracted.read() if read(suffix) and extracted is not None else None
        if current is not None:
            yield current


def _read_tar(unit: Unit) -> Iterator[RawSample]:
    try:
        for key, _, members in _tar_groups(unit.source.path, unit.offset, read=lambda suffix: True):
            yield _tar_sample(unit.source, key, members)
    except (tarfile.TarError, OSError, EOFError) as err:
        # Planning stopped before the damage, so reaching it here means the file changed.
        raise PrepError(f"{unit.source.name}: the tar cannot be read in unit {unit.name} ({err})") from err


def split_member_name(name: str) -> tuple[str, str]:
    """``"a/b.frame000.png"`` -> ``("a/b", "frame000.png")``; a name without a dot -> ``(name, "")``."""
    match = _KEY_AND_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def _tar_sample(source: SourceFile, key: str, members: dict[str, bytes | None]) -> RawSample:
    sample = RawSample(source, {"key": key})
    unknown = []
    frames: list[tuple[str, bytes]] = []
    for suffix, data in members.items():
        assert data is not None
        name = f"{key}.{suffix}" if suffix else key
        ext = suffix.rsplit(".", 1)[-1]
        if suffix == "json":
            try:
                sample.fields = json.loads(data)
            except UnicodeDecodeError:
                sample.error = "the json member is not valid UTF-8"
            except ValueError as err:
                sample.error = f"malformed JSON in the json member: {err}"
        elif suffix in IMAGE_EXTENSIONS:
            _put(sample, "image", Blob(name, ext, data=data))
        elif suffix in ("wav", "flac"):
            _put(sample, "audio", Blob(name, ext, data=data))
        elif suffix == "mp4":
            _put(sample, "video", Blob(name, ext, data=data))
        elif _FRAME_MEMBER.fullmatch(suffix):
            frames.append((suffix, data))
        else:
            unknown.append(name)
    if frames:
        _put(sample, "video", FrameList(tuple(Blob(f"{key}.{s}", s.rsplit(".", 1)[-1], data=d)
                                              for s, d in sorted(frames))))
    if unknown:
        sample.error = sample.error or (
            f"unsupported member(s) {', '.join(unknown)}; a sample has json plus png/jpg/jpeg, wav/flac, mp4 "
            "or frameNNN.png members"
        )
    if "json" not in members:
        sample.error = sample.error or f"no json member for key '{key}' (a sample needs {key}.json with its fields)"
    if isinstance(sample.fields, dict):
        for name in MEDIA_FIELDS:  # paths written by whoever built the tar; the members are the media
            sample.fields.pop(name, None)
    return sample


def _put(sample: RawSample, medium: str, media: Blob | FrameList) -> None:
    if medium in sample.media:
        sample.error = sample.error or f"several {medium} members for one sample"
    sample.media[medium] = media
