"""``xoron synth`` on the command line."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xoron_dist.config import ConfigError
from xoron_dist.data.schema import KINDS
from xoron_dist.synth import cli
from xoron_dist.synth.bad_samples import BAD_CASES
from xoron_dist.synth.corpus import EXTRA_SOURCES

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--text", "3", "--image-caption", "2", "--video-caption", "1", "--audio-transcript", "1",
         "--text-to-image", "1", "--text-to-video", "1", "--text-to-speech", "1", "--conversation", "2",
         "--tool-use", "1"]
# xoron_dist.cli imports every verb's module, data_prep.cli (xoron prep) included
needs_prep = pytest.mark.skipif(importlib.util.find_spec("data_prep.cli") is None,
                                reason="data_prep.cli (xoron prep) is not in this tree")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_count_flags_cover_every_kind():
    assert cli.COUNT_FIELDS == (*KINDS, *EXTRA_SOURCES)  # and the capability sources with files of their own


def test_config_precedence(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny\ndata:\n  synth:\n    seed: 5\n    text: 7\n    max_image_size: 200\n")
    cfg = cli.synth_config_from_args(_args("--out", "x", "--config", str(run), "--text", "2",
                                           "max_image_size=150", "data.synth.min_image_size=64"))
    assert (cfg.seed, cfg.text, cfg.max_image_size, cfg.min_image_size) == (5, 2, 150, 64)
    assert cli.synth_config_from_args(_args("--out", "x", "--seed", "9")).seed == 9


@pytest.mark.parametrize("argv, message", [
    (["max_imag_size=3"], "did you mean 'max_image_size'"),
    (["min_image_size=600"], "data.synth.min_image_size"),
    (["--text", "-1"], "data.synth.text"),
    (["a.b=1"], "SynthConfig fields"),
])
def test_bad_arguments_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.synth_config_from_args(_args("--out", "x", *argv))


def test_config_without_synth_section(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny\n")
    with pytest.raises(ConfigError, match="no data.synth section"):
        cli.synth_config_from_args(_args("--out", "x", "--config", str(run)))


def test_run_writes_the_corpus(tmp_path, capsys):
    assert cli.run(_args("--out", str(tmp_path / "c"), "--no-progress", "--bad-samples", *SMALL)) == 0
    assert "synth.json" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").glob("*.jsonl")) == sorted(
        [f"{k}.jsonl" for k in KINDS] + ["bad.jsonl"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("")
    assert cli.run(_args("--out", str(tmp_path / "d"), "--no-progress", *SMALL)) == 2
    assert "not a synth corpus" in capsys.readouterr().err


@needs_prep
def test_xoron_synth_verb(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xoron_dist.cli", "synth", "--out", str(tmp_path / "c"),
                             "--no-progress", *SMALL, "--video-caption", "0", "max_image_size=64",
                             "min_image_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "c" / "synth.json").read_text())
    assert info["counts"] == {"text": 3, "image_caption": 2, "audio_transcript": 1, "text_to_image": 1,
                              "text_to_video": 1, "text_to_speech": 1, "conversation": 2, "tool_use": 1}
    assert not (tmp_path / "c" / "video_caption.jsonl").exists()


@needs_prep
def test_xoron_prep_takes_the_corpus_unchanged(tmp_path):
    """The contract end to end: prep accepts every clean sample and rejects exactly the bad ones."""
    corpus, prepared = tmp_path / "corpus", tmp_path / "prepared"
    assert cli.run(_args("--out", str(corpus), "--no-progress", "--bad-samples", *SMALL, "max_image_size=64",
                         "min_image_size=32", "video_size=32", "max_video_frames=8")) == 0
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny\ndata:\n  prep:\n    image_size: 32\n    video_size: 32\n    video_frames: 4\n")
    result = subprocess.run([sys.executable, "-m", "xoron_dist.cli", "prep", "--config", str(run), "--out",
                             str(prepared), "--no-progress", str(corpus)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((prepared / "manifest.json").read_text())
    synth = json.loads((corpus / "synth.json").read_text())
    rows = {kind: sum(shard["rows"] for shard in d["shards"]) for kind, d in manifest["datasets"].items()}
    assert rows == synth["counts"]
    rejects = [json.loads(line) for line in (prepared / "rejects.jsonl").read_text().splitlines()]
    assert sorted(str(r["id"]) for r in rejects) == sorted([*BAD_CASES, "None"])
