"""Resume: an interrupted or damaged conversion redoes only what is missing and ends with the same manifest."""

import shutil

import pytest

import data_prep.convert as convert
from data_prep import PrepError, prepare
from data_prep.rows import RowBuilder
from tests.data_prep.inputs import tiny_config


@pytest.fixture
def tracked(monkeypatch) -> list[tuple[str, bool]]:
    """(unit, reused) for every unit the next in-process prepare() handles."""
    calls: list[tuple[str, bool]] = []
    original = convert.convert_unit

    def convert_unit(unit, job, builder):
        result = original(unit, job, builder)
        calls.append((unit.name, result.reused))
        return result

    monkeypatch.setattr(convert, "convert_unit", convert_unit)
    return calls


def test_missing_and_damaged_units_are_redone(reference, media_root, tmp_path, tracked):
    ref_out, manifest = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    (out / "manifest.json").unlink()  # as if the run had stopped before the end
    (out / "units" / "samples-u00001.json").unlink()  # unit 1 never recorded...
    stray = out / "text" / "samples-u00001-009.arrow"  # ...after it had finished a shard
    stray.write_bytes(b"left by the interrupted attempt")
    next((out / "text_to_speech").glob("samples-u00002-*.arrow")).unlink()  # unit 2 lost a shard
    damaged = next((out / "text").glob("samples-u00003-*.arrow"))  # unit 3: same size, other bytes
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = prepare([media_root / "samples.jsonl"], out, tiny_config(), progress=False)
    assert tracked == [("samples-u00000", True), ("samples-u00001", False), ("samples-u00002", False),
                       ("samples-u00003", False)]
    assert again.to_json() == manifest.to_json()
    assert (out / "manifest.json").read_text() == manifest.to_json()
    assert not stray.exists()


def test_interrupted_run_resumes(reference, media_root, tmp_path, monkeypatch, tracked):
    _, manifest = reference
    out = tmp_path / "out"
    build = RowBuilder.build
    seen = []

    def interrupted(self, sample):
        seen.append(sample)
        if len(seen) == 9:  # the last sample of unit 2, after it wrote rows
            raise KeyboardInterrupt
        return build(self, sample)

    monkeypatch.setattr(RowBuilder, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([media_root / "samples.jsonl"], out, tiny_config(), progress=False)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in (out / "units").iterdir()) == ["samples-u00000.json", "samples-u00001.json"]
    monkeypatch.setattr(RowBuilder, "build", build)
    tracked.clear()
    again = prepare([media_root / "samples.jsonl"], out, tiny_config(), progress=False)
    assert [reused for _, reused in tracked] == [True, True, False, False]
    assert again.to_json() == manifest.to_json()


def test_finished_folder_needs_resume_and_settings_must_match(reference, media_root, tmp_path, tracked):
    ref_out, manifest = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    with pytest.raises(PrepError, match="already holds a finished conversion .*pass --resume"):
        prepare([media_root / "samples.jsonl"], out, tiny_config(), progress=False)
    again = prepare([media_root / "samples.jsonl"], out, tiny_config(), resume=True, progress=False)
    assert all(reused for _, reused in tracked) and again.to_json() == manifest.to_json()
    with pytest.raises(PrepError, match="holds a conversion made with different preprocessing"):
        prepare([media_root / "samples.jsonl"], out, tiny_config(image_size=24), resume=True, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="is not empty and holds no xoron prep state"):
        prepare([media_root / "samples.jsonl"], foreign, tiny_config(), progress=False)
