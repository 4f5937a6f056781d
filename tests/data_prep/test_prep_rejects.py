"""Bad input: every case lands in rejects.jsonl with its reason and location; --strict stops with that message."""

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import soundfile
from PIL import Image

from data_prep import PrepError, prepare
from tests.data_prep.inputs import sine, tiny_config, write_mp4
from xoron_dist.data.schema import REJECTS_FILE, Manifest

GOOD = {"id": "good-0", "kind": "text", "text": "a good sample"}


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_media")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "ok.png")
    (root / "garbage.png").write_bytes(b"\x89PNG but not really")
    (root / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnothing")
    write_mp4(root / "clip.mp4", 6)
    (root / "broken.mp4").write_bytes((root / "clip.mp4").read_bytes()[:300])
    soundfile.write(root / "low.wav", sine(50, 500, 1.0), 500, subtype="PCM_16")
    soundfile.write(root / "long.wav", sine(200, 8000, 3.0), 8000, subtype="PCM_16")
    (root / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(root / "mixed" / "000.png")
    Image.new("RGB", (8, 6)).save(root / "mixed" / "001.png")
    return root


def bad_lines(media: str = "media") -> list[tuple[str, str | None, str]]:
    """(JSONL line, the id the reject should name, the reason it should give); ``media``: where the
    bad media are, relative to the JSONL (``with_media`` copies them there)."""

    def sample(sample_id, kind="image_caption", text="a caption", **extra):
        return json.dumps({"id": sample_id, "kind": kind, "text": text, **extra})

    return [
        ('{"id": "x", "kind": "text", "text": ', None, "malformed JSON"),
        ("[1, 2]", None, "a sample must be a JSON object, got list"),
        (json.dumps({"kind": "text", "text": "no id"}), None, "missing required field 'id'"),
        (json.dumps({"id": "b-kind", "text": "no kind"}), "b-kind", "missing required field 'kind'"),
        (sample("b-unknown", kind="smell"), "b-unknown", "unknown kind 'smell'"),
        (json.dumps({"id": "b-text", "kind": "text"}), "b-text", "missing required field 'text'"),
        (sample("b-empty", kind="text", text="   "), "b-empty", "field 'text' is empty"),
        (sample("b-prompt", kind="text", prompt=3), "b-prompt", "field 'prompt' must be a string, got int"),
        (sample("b-long", kind="text", text="word " * 200), "b-long", "exceed max_text_tokens=64"),
        (sample("b-missing", image="nope.png"), "b-missing", "image file 'nope.png' not found"),
        (sample("b-path", image=5), "b-path", "field 'image' must be a non-empty path string, got 5"),
        (sample("b-image", image=f"{media}/garbage.png"), "b-image", "cannot decode image"),
        (sample("b-audio", kind="text_to_speech", audio=f"{media}/garbage.wav"), "b-audio",
         "cannot decode audio"),
        (sample("b-video", kind="video_caption", video=f"{media}/broken.mp4"), "b-video", "cannot decode video"),
        (sample("b-rate", kind="audio_transcript", audio=f"{media}/low.wav"), "b-rate",
         "has sample rate 500 Hz, which cannot be converted"),
        (sample("b-length", kind="audio_transcript", audio=f"{media}/long.wav"), "b-length",
         "is 3.00 s long, more than max_audio_seconds=2"),
        (sample("b-frames", kind="text_to_video", video=f"{media}/mixed"), "b-frames", "frames differ in size"),
        (sample("b-fps", kind="text_to_video", video=f"{media}/mixed", fps="fast"), "b-fps",
         "field 'fps' must be a number > 0"),
        (sample("b-extra", kind="text", image=f"{media}/ok.png"), "b-extra",
         "kind 'text' carries no media, but the sample has image"),
        (sample("b-nomedia"), "b-nomedia", "missing image for kind 'image_caption'"),
        (sample("good-0", kind="text"), "good-0", "duplicate id 'good-0' (first seen at line 1)"),
    ]


def with_media(folder: Path, media: Path) -> Path:
    """``folder`` with a copy of the bad media in ``folder/media`` (inside the data root)."""
    shutil.copytree(media, folder / "media")
    return folder


def write_bad_jsonl(folder: Path, media: Path, cases) -> Path:
    with_media(folder, media)
    path = folder / "bad.jsonl"
    lines = [json.dumps(GOOD)] + [line for line, _, _ in cases]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "b-utf8", "text": "\xff"}\n')
    return path


def test_every_bad_line_is_rejected_with_its_reason(bad_media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = bad_lines()
    path = write_bad_jsonl(tmp_path / "in", bad_media, cases)
    manifest = prepare([path], tmp_path / "out", tiny_config(), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    expected = [(line_no, sample_id, reason) for line_no, (_, sample_id, reason) in enumerate(cases, start=2)]
    expected.append((len(cases) + 2, None, "the line is not valid UTF-8"))
    assert len(records) == len(expected) == manifest.rejects
    for record, (line_no, sample_id, reason) in zip(records, expected, strict=True):
        assert record["source"] == "in/bad.jsonl" and record["line"] == line_no, record
        assert record["id"] == sample_id and reason in record["reason"], record
    assert manifest.datasets["text"].rows == 1  # the good sample went through


@pytest.mark.parametrize("case", range(21))
def test_strict_stops_at_the_first_reject_with_its_message(case, bad_media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line, sample_id, reason = bad_lines()[case]
    path = with_media(tmp_path / "in", bad_media) / "one.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    where = "in/one.jsonl:2" + (f" (id {sample_id})" if sample_id else "")
    with pytest.raises(PrepError, match=re.escape(f"--strict: {where}: ") + ".*" + re.escape(reason)):
        prepare([path], tmp_path / "out", tiny_config(), strict=True, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_strict_in_worker_processes_and_the_cli(bad_media, tmp_path, monkeypatch, capsys):
    import argparse

    from data_prep.cli import add_arguments, run

    monkeypatch.chdir(tmp_path)
    path = write_bad_jsonl(tmp_path / "in", bad_media, bad_lines()[:6])
    with pytest.raises(PrepError, match=re.escape("--strict: in/bad.jsonl:")):
        prepare([path], tmp_path / "w", tiny_config(), strict=True, workers=2, progress=False)
    (tmp_path / "run.yaml").write_text(tiny_config().to_yaml())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", "run.yaml", "--out", "cli", "--strict", "--no-progress", str(path)])
    assert run(args) == 1
    assert "error: --strict: in/bad.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_consecutive_rejects_bound(bad_media, tmp_path):
    path = write_bad_jsonl(tmp_path / "in", bad_media, bad_lines()[:3])  # + the bad UTF-8 line: 4
    cfg = tiny_config(samples_per_unit=10)
    with pytest.raises(PrepError, match="3 samples in a row rejected in unit bad-u00000"):
        prepare([path], tmp_path / "out", cfg, max_consecutive_rejects=3, progress=False)
    assert prepare([path], tmp_path / "ok", cfg, max_consecutive_rejects=5, progress=False).rejects == 4


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    import io

    tar.addfile(info, io.BytesIO(data))


def test_tar_problems(bad_media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png = (bad_media / "ok.png").read_bytes()
    caption = {"kind": "image_caption", "text": "a caption"}
    path = tmp_path / "shards.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "ok-0.json", json.dumps({"id": "ok-0", **caption}).encode())
        add_member(tar, "ok-0.png", png)
        add_member(tar, "nojson.png", png)
        add_member(tar, "extra.json", json.dumps({"id": "extra", **caption}).encode())
        add_member(tar, "extra.png", png)
        add_member(tar, "extra.txt", b"caption as text")
        add_member(tar, "two.json", json.dumps({"id": "two", **caption}).encode())
        add_member(tar, "two.png", png)
        add_member(tar, "two.jpg", png)
        add_member(tar, "README", b"not a sample")
        add_member(tar, "ok-1.json", json.dumps({"id": "ok-1", **caption}).encode())
        add_member(tar, "ok-1.png", png)
        add_member(tar, "ok-2.json", json.dumps({"id": "ok-2", **caption}).encode())
        add_member(tar, "ok-2.png", png * 20)
    with tarfile.open(path) as tar:
        cut = tar.getmember("ok-2.png").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])  # a copy that stopped inside ok-2.png
    manifest = prepare([path], tmp_path / "out", tiny_config(), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    got = [(r["key"], r["id"], r["reason"]) for r in records]
    assert got[0] == ("nojson", None, "no json member for key 'nojson' (a sample needs nojson.json with its fields)")
    assert got[1][:2] == ("extra", "extra") and got[1][2].startswith("unsupported member(s) extra.txt")
    assert got[2] == ("two", "two", "several image members for one sample")
    assert got[3][:2] == ("README", None) and got[3][2].startswith("unsupported member(s) README")
    assert got[4][:2] == (None, None) and got[4][2].startswith("the tar is damaged after 6 samples")
    assert manifest.rejects == 5 and manifest.datasets["image_caption"].rows == 2
    assert Manifest.read(tmp_path / "out").sources == ["shards.tar"]
    with pytest.raises(PrepError, match="--strict: shards.tar: the tar is damaged after 6 samples"):
        prepare([path], tmp_path / "strict", tiny_config(), strict=True, progress=False)


def test_empty_and_unusable_inputs(tmp_path):
    from data_prep.sources import discover_sources

    with pytest.raises(PrepError, match="does not exist"):
        discover_sources([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="holds no \\*.jsonl or \\*.tar"):
        discover_sources([tmp_path / "empty"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("")
    (tmp_path / "a" / "x.tar").write_bytes(b"")
    with pytest.raises(PrepError, match="share the source name 'x'"):
        discover_sources([tmp_path / "a"])
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(PrepError, match="expected a .jsonl manifest"):
        discover_sources([tmp_path / "notes.txt"])


@pytest.mark.parametrize("name", ["a.json", "dir/a.frame000.png", "x/y.z/k.tar.gz", "noext", "d.ir/noext"])
def test_tar_member_names_split_like_webdataset(name):
    from webdataset.tariterators import base_plus_ext

    from data_prep.sources import split_member_name

    key, suffix = base_plus_ext(name)
    assert split_member_name(name) == ((key, suffix) if key is not None else (name, ""))
