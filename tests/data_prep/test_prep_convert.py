"""End to end: rows give back the media and text; JSONL == tar; 1 == 2 workers == 2 MPI ranks."""

import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile
from PIL import Image, ImageOps

from data_prep import prepare
from data_prep.cli import add_arguments, format_summary, run, split_items
from tests.data_prep.inputs import AUDIO_RATE, IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE, good_samples, tiny_config
from xoron_dist.data.schema import REJECTS_FILE, Manifest, schema_for, sha256_file, verify_shard
from xoron_dist.tokenizer import XoronTokenizer


def read_rows(out: Path, manifest: Manifest) -> dict[str, dict]:
    rows = {}
    for kind, dataset in manifest.datasets.items():
        for shard in dataset.shards:
            with pa.memory_map(str(out / shard.path)) as source:
                table = pa.ipc.open_file(source).read_all()
            assert table.schema.equals(schema_for(kind), check_metadata=True)
            assert table.num_rows == shard.rows
            rows.update({row["id"]: row for row in table.to_pylist()})
    return rows


def crop_expected(image: Image.Image) -> np.ndarray:
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box))


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size), n=8 * x.size))
    return float(np.fft.rfftfreq(8 * x.size, 1 / rate)[spectrum.argmax()])


def test_rows_give_back_pixels_frames_audio_and_text(reference, media_root):
    out, manifest = reference
    rows = read_rows(out, manifest)
    samples = {s["id"]: s for s in good_samples()}
    assert set(rows) == set(samples)
    tokenizer = XoronTokenizer.load(out / "tokenizer")
    for sample_id, row in rows.items():
        assert row["source"] == "samples" and row["kind"] == samples[sample_id]["kind"]
        assert tokenizer.decode(row["text_tokens"]) == samples[sample_id]["text"]
        assert tokenizer.decode(row["prompt_tokens"]) == samples[sample_id].get("prompt", "")

    def image(row):
        return np.frombuffer(row["image"], np.uint8).reshape(row["image_height"], row["image_width"], 3)

    wide = Image.open(media_root / "images/wide.png").convert("RGB")
    assert np.array_equal(image(rows["ic-0"]), crop_expected(wide))
    tall = ImageOps.exif_transpose(Image.open(media_root / "images/tall.jpg")).convert("RGB")
    assert tall.size == (40, 24)  # EXIF orientation applied
    assert np.array_equal(image(rows["ic-1"]), crop_expected(tall))
    rgba = Image.open(media_root / "images/alpha.png")
    over_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    assert np.array_equal(image(rows["ti-0"]), crop_expected(over_white))

    def video(row):
        assert (row["video_frames"], row["video_height"], row["video_width"]) == (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE)
        clip = np.frombuffer(row["video"], np.uint8).reshape(VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3)
        return [float(f.mean()) for f in clip], row["video_fps"]

    levels, fps = video(rows["vc-0"])  # 12 frames at 12 fps, frame i at level 20 i + 10
    assert np.allclose(levels, [30, 90, 150, 210], atol=3) and fps == pytest.approx(4.0)
    levels, fps = video(rows["tv-0"])  # folder of 6 frames at the sample's fps 6
    assert levels == [0, 80, 120, 200] and fps == pytest.approx(4.0)
    levels, fps = video(rows["tv-1"])  # a 2-frame clip is stretched over 4 frames
    assert np.allclose(levels, [10, 10, 30, 30], atol=3) and fps == pytest.approx(24.0)

    def audio(row):
        assert row["sample_rate"] == AUDIO_RATE
        pcm = np.frombuffer(row["audio"], "<i2")
        assert pcm.size == row["audio_samples"]
        return pcm

    assert audio(rows["at-0"]).size == 8000 and peak_hz(audio(rows["at-0"]), AUDIO_RATE) == pytest.approx(1000, abs=2)
    assert audio(rows["ts-0"]).size == 8000 and peak_hz(audio(rows["ts-0"]), AUDIO_RATE) == pytest.approx(440, abs=2)
    native, _ = soundfile.read(media_root / "audio/mono16k.flac", dtype="int16")
    assert np.array_equal(audio(rows["ts-1"]), native)


def test_manifest_contents(reference, media_root):
    out, manifest = reference
    assert Manifest.read(out) == manifest
    cfg = tiny_config()
    assert manifest.preprocessing == asdict(cfg.data.prep)
    assert manifest.tokenizer["sha256"] == sha256_file(out / "tokenizer" / "tokenizer.json")
    assert manifest.tokenizer["kind"] == "bpe" and manifest.tokenizer["vocab_size"] == 1040
    assert manifest.sources == [os.path.relpath(media_root / "samples.jsonl")]
    assert manifest.rejects == 0 and (out / REJECTS_FILE).read_text() == ""
    stats = manifest.datasets["image_caption"].stats
    assert stats["samples"] == stats["images"] == 2 and stats["image_pixels"] == 2 * IMAGE_SIZE**2
    assert manifest.datasets["text_to_speech"].stats["audio_seconds"] == pytest.approx(0.75)
    assert manifest.datasets["video_caption"].stats["video_frames"] == VIDEO_FRAMES
    assert sum(d.stats["samples"] for d in manifest.datasets.values()) == len(good_samples())
    shards = [s for d in manifest.datasets.values() for s in d.shards]
    assert len(manifest.datasets["image_caption"].shards) == 2  # shard_bytes forces a roll
    for shard in shards:
        verify_shard(out, shard, checksum=True)
    assert not list(out.rglob("*.tmp"))


def test_jsonl_and_tar_give_byte_identical_shards(reference, media_root, tmp_path):
    out, manifest = reference
    tar_manifest = prepare([media_root / "tar" / "samples.tar"], tmp_path / "out", tiny_config(), progress=False)
    assert tar_manifest.sources == [os.path.relpath(media_root / "tar" / "samples.tar")]
    tar_manifest.sources = manifest.sources
    assert tar_manifest == manifest
    for dataset in manifest.datasets.values():
        for shard in dataset.shards:
            assert (out / shard.path).read_bytes() == (tmp_path / "out" / shard.path).read_bytes()


def test_two_workers_write_the_same_manifest(reference, media_root, tmp_path):
    _, manifest = reference
    parallel = prepare([media_root / "samples.jsonl"], tmp_path / "out", tiny_config(), workers=2, progress=False)
    assert parallel.to_json() == manifest.to_json()


def find_mpiexec() -> str | None:
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.is_file() else shutil.which("mpiexec")


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_two_mpi_ranks_write_the_same_manifest(reference, media_root, tmp_path):
    _, manifest = reference
    config = tmp_path / "run.yaml"
    config.write_text(tiny_config().to_yaml())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "xoron_dist.cli", "prep", "--config", str(config),
           "--out", str(tmp_path / "out"), "--no-progress", str(media_root / "samples.jsonl")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "(1 worker(s) x 2 rank(s))" in done.stdout
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest.to_json()


def test_cli_summary_and_overrides(media_root, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "run.yaml"
    config.write_text(tiny_config().to_yaml())
    args = parser.parse_args(["--config", str(config), "--out", str(tmp_path / "out"), "--no-progress",
                              str(media_root / "samples.jsonl"), "data.prep.image_size=24"])
    assert split_items(args.items) == ([media_root / "samples.jsonl"], ["data.prep.image_size=24"])
    assert run(args) == 0
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.preprocessing["image_size"] == 24
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prepared 1 source(s)") and lines[-1] == "rejects: 0"
    assert lines[1:] == format_summary(manifest, tmp_path / "out", 0.0, 1, 1).splitlines()[1:]
    assert any(line.split()[:2] == ["image_caption", "2"] for line in lines)
