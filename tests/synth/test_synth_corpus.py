"""The synthetic corpus on disk: the schema contract, decodable media, determinism, bad samples."""

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xoron_dist.config import ConfigError, SynthConfig
from xoron_dist.data.chat import conversation_from_json
from xoron_dist.data.schema import CHAT_KINDS, KINDS
from xoron_dist.synth import SynthOutputError, clips, corpus, scenes, synthesize
from xoron_dist.synth.bad_samples import BAD_CASES

TINY = SynthConfig(seed=7, text=6, image_caption=14, video_caption=8, audio_transcript=10, text_to_image=4,
                   text_to_video=4, text_to_speech=4, min_image_size=32, max_image_size=96, min_video_frames=4,
                   max_video_frames=9, video_size=32, audio_sample_rate=8000, conversation=3, tool_use=2)


def _tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (folders as '<dir>')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    written = synthesize(TINY, out, progress=False, bad_samples=True)
    return out, written


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_return_value(tiny):
    out, written = tiny
    assert written == [out / f"{kind}.jsonl" for kind in KINDS] + [out / "bad.jsonl"]
    info = json.loads((out / corpus.SYNTH_FILE).read_text())
    assert info["config"]["seed"] == 7 and info["counts"]["image_caption"] == 14 and info["espeak"] is None
    assert (info["content_sha256"], info["files"]) == corpus.content_sha256(out)
    assert not (out / corpus.PARTIAL_MARKER).exists()


def test_every_line_follows_the_schema_and_its_media_decode(tiny):
    out, _ = tiny
    seen = {"png": 0, "jpg": 0, "folder": 0, "mp4": 0, "stereo": 0, "float": 0, "int": 0, "prompt": 0}
    for kind in KINDS:
        records = _records(out / f"{kind}.jsonl")
        assert len(records) == getattr(TINY, kind)
        assert [r["id"] for r in records] == [f"{kind}-{i + 1:06d}" for i in range(len(records))]
        if kind in CHAT_KINDS:  # turns instead of text (their content: tests/synth/test_capability.py)
            assert all(r["kind"] == kind and conversation_from_json(r).turns for r in records)
            continue
        media = KINDS[kind]
        for r in records:
            assert r["kind"] == kind and isinstance(r["text"], str) and r["text"].strip()
            assert set(r) <= {"id", "kind", "prompt", "text", *([media] if media else []), "fps"}
            assert r.get("fps") == (corpus.VIDEO_FPS if media == "video" else None)
            if "prompt" in r:
                seen["prompt"] += 1
                assert r["prompt"].strip()
            if media is None:
                continue
            path = out / r[media]
            assert path.exists(), r
            if media == "image":
                with Image.open(path) as image:
                    assert image.format == {".png": "PNG", ".jpg": "JPEG"}[path.suffix]
                    assert TINY.min_image_size <= min(image.size) <= max(image.size) <= TINY.max_image_size
                    image.load()
                seen[path.suffix[1:]] += 1
            elif media == "video" and path.is_dir():
                frames = sorted(path.iterdir())
                assert [f.name for f in frames] == [f"frame{i:03d}.png" for i in range(len(frames))]
                assert TINY.min_video_frames <= len(frames) <= TINY.max_video_frames
                for frame in frames:
                    with Image.open(frame) as image:
                        assert image.size == (TINY.video_size, TINY.video_size)
                seen["folder"] += 1
            elif media == "video":
                assert path.suffix == ".mp4"
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                    assert stream.average_rate == corpus.VIDEO_FPS
                assert TINY.min_video_frames <= len(decoded) <= TINY.max_video_frames
                assert decoded[0].shape == (TINY.video_size, TINY.video_size, 3)
                seen["mp4"] += 1
            else:
                info = sf.info(str(path))
                assert info.samplerate == TINY.audio_sample_rate and info.frames > 0 and info.channels in (1, 2)
                seen["stereo"] += info.channels == 2
                seen["float" if info.subtype == "FLOAT" else "int"] += 1
    assert all(seen.values()), seen  # every code path of prep gets exercised


def test_image_captions_match_their_pixels(tiny):
    """Re-derive each scene from (seed, kind, index) and check the file: shapes at their centres."""
    out, _ = tiny
    for kind in ("image_caption", "text_to_image"):
        for index, record in enumerate(_records(out / f"{kind}.jsonl")):
            rng = corpus.sample_rng(TINY.seed, kind, index)
            scene = scenes.sample_scene(rng, *scenes.sample_image_size(rng, TINY.min_image_size, TINY.max_image_size))
            with Image.open(out / record["image"]) as image:
                rgb = image.convert("RGB")
            assert rgb.size == (scene.width, scene.height)
            tolerance = 0 if record["image"].endswith(".png") else 40
            for s in scene.shapes:
                if s.radius >= 3:  # JPEG blurs the tiniest shapes beyond recognition of a single pixel
                    got = np.array(rgb.getpixel((int(s.cx), int(s.cy))), dtype=int)
                    assert np.abs(got - scenes.PALETTE[s.color]).max() <= tolerance, (record, s)
            if "prompt" not in record or record["prompt"] in corpus.DESCRIBE_IMAGE:
                for s in scene.shapes:
                    assert s.color in record["text"] and s.shape in record["text"], record


def test_clips_match_their_frames(tiny):
    """Re-derive each clip from (seed, kind, index): frame folders hold its frames exactly, MP4s
    decode to them up to H.264's loss, in the same order and number."""
    out, _ = tiny
    for kind in ("video_caption", "text_to_video"):
        for index, record in enumerate(_records(out / f"{kind}.jsonl")):
            clip = clips.sample_clip(corpus.sample_rng(TINY.seed, kind, index), TINY.video_size,
                                     TINY.min_video_frames, TINY.max_video_frames)
            expected = [np.asarray(frame, dtype=int) for frame in clips.render_clip(clip)]
            path = out / record["video"]
            if path.is_dir():
                got = [np.asarray(Image.open(frame), dtype=int) for frame in sorted(path.iterdir())]
                assert len(got) == len(expected) and all((a == b).all() for a, b in zip(got, expected, strict=True))
            else:
                with av.open(str(path)) as container:
                    got = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
                assert len(got) == len(expected)
                for a, b in zip(got, expected, strict=True):
                    assert np.abs(a - b).mean() < 6, record
            if kind == "text_to_video" or "prompt" not in record:
                assert record["text"] == clips.clip_caption(clip)


def test_same_config_same_bytes(tiny, tmp_path):
    out, _ = tiny
    synthesize(TINY, tmp_path / "again", progress=False, bad_samples=True)
    assert _tree(tmp_path / "again") == _tree(out)


def test_larger_count_extends_smaller(tiny, tmp_path):
    out, _ = tiny
    small = SynthConfig(**{**TINY.__dict__, "image_caption": 5, "text": 3, "video_caption": 2,
                           "audio_transcript": 0, "text_to_image": 0, "text_to_video": 0, "text_to_speech": 0,
                           "conversation": 0, "tool_use": 0})
    written = synthesize(small, tmp_path / "small", progress=False)
    assert [p.name for p in written] == ["text.jsonl", "image_caption.jsonl", "video_caption.jsonl"]
    assert not (tmp_path / "small" / "audio").exists()
    for path in written:
        assert _records(path) == _records(out / path.name)[: len(_records(path))]
    big, little = _tree(out), _tree(tmp_path / "small")
    for rel, digest in little.items():
        if rel.startswith(("images/", "videos/")):
            assert big[rel] == digest, rel


def test_other_seed_other_corpus(tiny, tmp_path):
    out, _ = tiny
    synthesize(SynthConfig(**{**TINY.__dict__, "seed": 8}), tmp_path / "other", progress=False)
    assert (tmp_path / "other/image_caption.jsonl").read_bytes() != (out / "image_caption.jsonl").read_bytes()


def test_bad_samples_cover_each_defect(tiny):
    out, _ = tiny
    lines = (out / "bad.jsonl").read_text().splitlines()
    parsed, malformed = [], 0
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            malformed += 1
    assert malformed == 1 and {r["id"] for r in parsed} == set(BAD_CASES)
    by_id = {r["id"]: r for r in parsed}
    with pytest.raises(OSError):
        with Image.open(out / by_id["bad-truncated-png"]["image"]) as image:
            image.load()
    assert not (out / by_id["bad-missing-image"]["image"]).exists()
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(out / by_id["bad-garbage-wav"]["audio"]))
    empty = out / by_id["bad-empty-video-folder"]["video"]
    assert empty.is_dir() and not any(empty.iterdir())
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(out / by_id["bad-corrupt-mp4"]["video"]))
    missing_text = by_id["bad-missing-text"]
    assert "text" not in missing_text and (out / missing_text["image"]).is_file()
    assert by_id["bad-unknown-kind"]["kind"] not in KINDS
    for kind in KINDS:  # the clean corpus never points at the broken media
        assert "/bad/" not in (out / f"{kind}.jsonl").read_text()


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthOutputError, match="not a synth corpus"):
        synthesize(SynthConfig(text=1, image_caption=0, video_caption=0, audio_transcript=0, text_to_image=0,
                               text_to_video=0, text_to_speech=0), foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    # an earlier corpus is replaced, stale files included
    out = tmp_path / "corpus"
    synthesize(SynthConfig(**{**TINY.__dict__, "text_to_video": 0}), out, progress=False, bad_samples=True)
    synthesize(SynthConfig(**{**TINY.__dict__, "image_caption": 2}), out, progress=False)
    assert not (out / "bad.jsonl").exists() and not (out / "images/bad").exists()
    assert len(list((out / "images").glob("image_caption-*"))) == 2


def test_espeak_speech_when_asked(tmp_path, monkeypatch):
    """A stand-in espeak-ng on PATH: speech replaces some tone samples, the rest stay identical."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\nimport numpy as np\nimport soundfile as sf\n"
        "args = sys.argv[1:]\n"
        "if args == ['--version']:\n    print('eSpeak NG text-to-speech: 0.0-fake'); sys.exit(0)\n"
        "path, text = args[args.index('-w') + 1], args[-1]\n"
        "t = np.arange(len(text) * 200) / 22050\n"
        "sf.write(path, 0.5 * np.sin(2 * np.pi * 300 * t), 22050, subtype='PCM_16')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = SynthConfig(seed=3, text=0, image_caption=0, video_caption=0, audio_transcript=6, text_to_image=0,
                      text_to_video=0, text_to_speech=6, audio_sample_rate=16_000)
    synthesize(cfg, tmp_path / "speech", progress=False, espeak=True)
    synthesize(cfg, tmp_path / "tones", progress=False)
    info = json.loads((tmp_path / "speech/synth.json").read_text())
    assert info["espeak"] == "eSpeak NG text-to-speech: 0.0-fake"
    spoken = 0
    for name in ("audio_transcript.jsonl", "text_to_speech.jsonl"):
        for a, b in zip(_records(tmp_path / "speech" / name), _records(tmp_path / "tones" / name), strict=True):
            if a == b:
                assert (tmp_path / "speech" / a["audio"]).read_bytes() == (tmp_path / "tones" / b["audio"]).read_bytes()
            else:
                spoken += 1
                assert sf.info(str(tmp_path / "speech" / a["audio"])).samplerate == 16_000
    assert spoken > 0


def test_audio_rate_too_low_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="data.synth.audio_sample_rate"):
        synthesize(SynthConfig(text=0, audio_transcript=1, audio_sample_rate=4000), tmp_path / "x", progress=False)


def test_espeak_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(corpus.sounds.EspeakError, match="not on PATH"):
        synthesize(SynthConfig(text=1), tmp_path / "x", progress=False, espeak=True)
