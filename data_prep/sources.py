"""Input files -> units of work -> raw samples, alike for JSONL manifests and webdataset tars.

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
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_prep.errors import PrepError
from data_prep.media import IMAGE_EXTENSIONS, Blob, FrameList

MEDIA_FIELDS = ("image", "video", "audio")
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
    format: Literal["jsonl", "tar"]


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


def discover_sources(inputs: list[Path], cwd: Path | None = None) -> list[SourceFile]:
    """Input arguments (JSONL files, tar files, folders of them) -> sources in processing order.

    A folder contributes its ``*.jsonl`` and ``*.tar``, sorted by name.
    """
    cwd = Path(cwd or os.getcwd())
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".tar"))
            if not found:
                raise PrepError(f"input folder {path} holds no *.jsonl or *.tar files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".jsonl", ".tar"):
                raise PrepError(f"input {path}: expected a .jsonl manifest, a webdataset .tar or a folder of them")
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
        sources.append(SourceFile(absolute, name, stem, "jsonl" if path.suffix == ".jsonl" else "tar"))
    if not sources:
        raise PrepError("no inputs given: pass JSONL files, webdataset .tar files or folders of them")
    return sources


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
    if unit.source.format == "jsonl":
        samples = _read_jsonl(unit, data_root or unit.source.path.parent, allow_outside_root)
    else:
        samples = _read_tar(unit)
    count = 0
    for sample in samples:
        sample.duplicate_of = duplicates.get(unit.first + count)
        yield sample
        count += 1
        if count == unit.count:
            return
    raise PrepError(f"{unit.source.name} ended after {count} of the {unit.count} samples of unit {unit.name}: "
                    "the input changed while it was being converted")


def _read_jsonl(unit: Unit, root: Path, allow_outside_root: bool) -> Iterator[RawSample]:
    folder = unit.source.path.parent
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
            if isinstance(sample.fields, dict):
                for name in MEDIA_FIELDS:
                    if name not in sample.fields:
                        continue
                    value = sample.fields.pop(name)
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
            yield sample


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
