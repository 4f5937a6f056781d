"""Contained input: JSONL media paths stay inside the data root unless the user opts in; budgets and
truncated audio end in rejects.jsonl like any bad sample (fatal under --strict); rejects never name a
file by an absolute path."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from data_prep import PrepError, prepare
from tests.data_prep.inputs import huge_png, tiny_config, truncated_wav, write_jsonl
from xoron_dist.data.schema import REJECTS_FILE

OUTSIDE = "leads outside the data root (through '..' or a symbolic link); keep media inside the manifest's folder"
ABSOLUTE = ("field 'image' is an absolute path; write media paths relative to the manifest's folder "
            "(or pass --allow-outside-root for a manifest you trust)")


def caption(sample_id: str, **media) -> dict:
    kind = "text_to_video" if "video" in media else "image_caption"
    return {"id": sample_id, "kind": kind, "text": "a caption", **media}


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    """tmp/secret.png and tmp/secret_frames/ (outside), tmp/in/data.jsonl with media inside, links out."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")
    (tmp_path / "secret_frames").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret_frames" / "000.png")
    images = tmp_path / "in" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "ok.png")
    os.symlink(tmp_path / "secret.png", images / "link.png")
    os.symlink(tmp_path / "secret_frames", tmp_path / "in" / "frames_link")
    frames = tmp_path / "in" / "frames"
    frames.mkdir()
    Image.new("RGB", (8, 8)).save(frames / "000.png")
    os.symlink(tmp_path / "secret_frames" / "000.png", frames / "001.png")
    write_jsonl(tmp_path / "in" / "data.jsonl", [
        caption("ok", image="images/ok.png"),
        caption("absolute", image=str(tmp_path / "secret.png")),
        caption("dotdot", image="../secret.png"),
        caption("deep", image="images/../../secret.png"),
        caption("link", image="images/link.png"),
        caption("folder-link", video="frames_link"),
        caption("frame-link", video="frames"),
        caption("missing", image="../nope.png"),
    ])
    return tmp_path


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / REJECTS_FILE).read_text().splitlines()]


def test_media_outside_the_manifests_folder_are_rejected(tree):
    manifest = prepare([tree / "in" / "data.jsonl"], tree / "out", tiny_config(), progress=False)
    assert manifest.datasets["image_caption"].rows == 1 and "text_to_video" not in manifest.datasets
    assert [(r["id"], r["reason"]) for r in rejects(tree / "out")] == [
        ("absolute", ABSOLUTE),
        ("dotdot", f"image path '../secret.png' {OUTSIDE}, name a wider one with --data-root, or pass "
                   "--allow-outside-root for a manifest you trust"),
        ("deep", f"image path '../secret.png' {OUTSIDE}, name a wider one with --data-root, or pass "
                 "--allow-outside-root for a manifest you trust"),
        ("link", f"image path 'images/link.png' {OUTSIDE}, name a wider one with --data-root, or pass "
                 "--allow-outside-root for a manifest you trust"),
        ("folder-link", f"video path 'frames_link' {OUTSIDE}, name a wider one with --data-root, or pass "
                        "--allow-outside-root for a manifest you trust"),
        ("frame-link", f"video frame path 'frames/001.png' {OUTSIDE}, name a wider one with --data-root, or "
                       "pass --allow-outside-root for a manifest you trust"),
        ("missing", f"image path '../nope.png' {OUTSIDE}, name a wider one with --data-root, or pass "
                    "--allow-outside-root for a manifest you trust"),
    ]
    assert str(tree) not in (tree / "out" / REJECTS_FILE).read_text()  # no absolute path in the rejects


def test_a_named_data_root_widens_what_is_inside(tree):
    prepare([tree / "in" / "data.jsonl"], tree / "out", tiny_config(), progress=False, data_root=tree)
    got = {r["id"]: r["reason"] for r in rejects(tree / "out")}
    assert got == {"absolute": ABSOLUTE, "missing": "image file 'nope.png' not found"}  # named from the root


def test_allow_outside_root_reads_everything(tree):
    manifest = prepare([tree / "in" / "data.jsonl"], tree / "out", tiny_config(), progress=False,
                       allow_outside_root=True)
    assert manifest.datasets["image_caption"].rows == 5 and manifest.datasets["text_to_video"].rows == 2
    assert [(r["id"], r["reason"]) for r in rejects(tree / "out")] == [
        ("missing", "image file '../nope.png' not found")]


def test_strict_makes_a_path_outside_the_root_fatal(tree):
    with pytest.raises(PrepError, match=re.escape("--strict: in/data.jsonl:2 (id absolute): " + ABSOLUTE)):
        prepare([tree / "in" / "data.jsonl"], tree / "out", tiny_config(), strict=True, progress=False)


def test_resume_refuses_other_media_path_settings(tree):
    jsonl = tree / "in" / "data.jsonl"
    write_jsonl(jsonl, [caption(f"ok-{i}", image="images/ok.png") for i in range(4)])
    prepare([jsonl], tree / "out", tiny_config(), progress=False)
    with pytest.raises(PrepError, match="holds a conversion made with different media_paths"):
        prepare([jsonl], tree / "out", tiny_config(), progress=False, resume=True, allow_outside_root=True)


def run_cli(*argv: str) -> int:
    from data_prep.cli import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def test_cli_flags(tree, capsys):
    (tree / "run.yaml").write_text(tiny_config().to_yaml())
    jsonl = str(tree / "in" / "data.jsonl")
    assert run_cli("--config", "run.yaml", "--out", "a", "--no-progress", "--allow-outside-root", jsonl) == 0
    assert "rejects: 1 " in capsys.readouterr().out
    assert run_cli("--config", "run.yaml", "--out", "b", "--no-progress", "--data-root", str(tree), jsonl) == 0
    assert "rejects: 2 " in capsys.readouterr().out
    assert run_cli("--config", "run.yaml", "--out", "c", "--no-progress", "--data-root", "nowhere", jsonl) == 1
    assert capsys.readouterr().err == (
        "error: --data-root nowhere is not a folder; name the folder that holds the media\n")


def test_budgets_and_truncated_audio_are_rejects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(huge_png(12000, 12000))
    truncated_wav(tmp_path / "in" / "cut.wav", seconds=1.0, rate=16_000, keep=0.5)
    jsonl = write_jsonl(tmp_path / "in" / "media.jsonl", [
        {"id": "ok", "kind": "text", "text": "fine"},
        {"id": "bomb", "kind": "image_caption", "text": "all black", "image": "bomb.png"},
        {"id": "cut", "kind": "audio_transcript", "text": "a tone", "audio": "cut.wav"},
    ])
    prepare([jsonl], tmp_path / "out", tiny_config(), progress=False)  # the default pixel budget: 64 MP
    assert [(r["id"], r["reason"]) for r in rejects(tmp_path / "out")] == [
        ("bomb", "image 'bomb.png' is 12000x12000 = 144,000,000 pixels, more than data.prep.max_image_pixels = "
                 "64,000,000 (read from its header, not decoded); shrink the file or raise the budget"),
        ("cut", "audio 'cut.wav' is truncated: its WAV header promises 32,000 bytes of samples, the file holds "
                "15,978 (50%); copy the whole file again"),
    ]
    with pytest.raises(PrepError, match=re.escape("--strict: in/media.jsonl:2 (id bomb): image 'bomb.png' is "
                                                  "12000x12000")):
        prepare([jsonl], tmp_path / "strict", tiny_config(), strict=True, progress=False)
    write_jsonl(jsonl, [{"id": "cut", "kind": "audio_transcript", "text": "a tone", "audio": "cut.wav"}])
    with pytest.raises(PrepError, match=re.escape("--strict: in/media.jsonl:1 (id cut): audio 'cut.wav' is "
                                                  "truncated")):
        prepare([jsonl], tmp_path / "strict2", tiny_config(), strict=True, progress=False)
