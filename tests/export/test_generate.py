"""``xoron generate``: text from a trainer checkpoint and from its export equals ``generate_text`` on the
consolidated model (greedy, token for token, streamed in pieces that add up to the whole); images,
videos and speech from an export of the smoke model are the files the Python API's arrays make; the
seed's quick-start calls run on a model loaded from an export; every bad flag is one line."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from tests.export.test_export import REPO, _one_line_error, trained
from xoron_dist.cli import main as xoron
from xoron_dist.config import load_config
from xoron_dist.export import ConsolidatedCheckpoint, consolidate, export_hf, from_pretrained
from xoron_dist.generate.streaming import TextStream
from xoron_dist.model.xoron import build_model
from xoron_dist.tokenizer import XoronTokenizer, build_tokenizer
from xoron_dist.train.samples import request_ids

PROMPT = "Two red circles and"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _greedy_text(run, max_new: int) -> str:
    model = consolidate(run).build_model()
    tok = XoronTokenizer.load(run / "tokenizer")
    ids = tok.encode(PROMPT)
    out = model.generate_text(torch.tensor([ids]), max_new, temperature=0, eos_token_id=tok.eos_id)[0, len(ids):]
    new = out.tolist()
    return tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)


def test_text_from_a_checkpoint_and_its_export_streams_the_greedy_continuation(runs, tmp_path, capsys):
    run = trained(runs, "single")
    expected = _greedy_text(run, 12)
    argv = ["generate", "text", "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"]
    assert xoron([*argv, "--model", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and "loaded step 3 of" in captured.err
    export = tmp_path / "hf"
    assert xoron(["export", "--checkpoint", str(run), "--out", str(export)]) == 0
    capsys.readouterr()
    assert xoron([*argv, "--model", str(export), "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert xoron([*argv[:-2], "--temperature", "0.9", "--top-k", "5", "--seed", "3", "--model", str(export)]) == 0


def test_the_stream_holds_back_half_characters(smoke_export):
    tok = XoronTokenizer.load(smoke_export[0])
    ids = tok.encode("naïve café ✓ done")
    out = io.StringIO()
    stream = TextStream(tok, out)
    pieces = []
    for i in ids:
        stream.push(torch.tensor([i]))
        pieces.append(out.getvalue())
    stream.push(torch.tensor([tok.eos_id]))
    stream.push(torch.tensor([ids[0]]))  # after <|endoftext|>: ignored
    stream.close()
    assert out.getvalue() == "naïve café ✓ done\n"
    assert all("\ufffd" not in p for p in pieces)  # never a half character on the terminal


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory):
    """The smoke model with random weights, exported, with a tokenizer built from the smoke config."""
    cfg = load_config(REPO / "pipelines" / "smoke.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path_factory.mktemp("smoke_export")
    tok_dir = out.parent / "smoke_tokenizer"
    build_tokenizer(cfg, tok_dir)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    export_hf(ConsolidatedCheckpoint(cfg, state, multimodal=True, step=1), out / "hf", tokenizer_dir=tok_dir)
    return out / "hf", cfg


def test_media_files_hold_what_the_api_generates(smoke_export, tmp_path):
    export, cfg = smoke_export
    model = from_pretrained(export)
    tok = XoronTokenizer.load(export)
    for medium in ("image", "video", "speech"):
        suffix = {"image": "png", "video": "mp4", "speech": "wav"}[medium]
        argv = ["generate", medium, "--model", str(export), "--prompt", "a red square", "--steps", "2",
                "--seed", "5", "--out", str(tmp_path / f"x.{suffix}")]
        if medium != "speech":
            argv += ["--height", "32", "--width", "32"]
        if medium == "video":
            argv += ["--frames", "5"]
        assert xoron(argv) == 0
    ids = {m: torch.tensor([request_ids(tok, "a red square", m)]) for m in ("image", "video", "audio")}
    image = model.generate_image(ids["image"], height=32, width=32, steps=2, seed=5)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), image)
    import av

    with av.open(str(tmp_path / "x.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    clip = model.generate_video(ids["video"], frames=5, height=32, width=32, steps=2, seed=5)[0].numpy()
    other = model.generate_video(ids["video"], frames=5, height=32, width=32, steps=2, seed=6)[0].numpy()
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    decoded = np.stack(frames).astype(float)
    # H.264 is lossy (and these random-weight frames are noise): nearer its seed's clip than another seed's
    assert np.abs(decoded - clip).mean() < 0.5 * np.abs(decoded - other).mean()
    from xoron_dist.train.samples import reference_voice

    wave = model.generate_speech(ids["audio"], speaker_audio=[reference_voice(16000)], steps=2, seed=5)[0]
    written, rate = sf.read(tmp_path / "x.wav", dtype="float32")
    assert rate == cfg.model.audio.sample_rate and written.shape == wave.shape
    assert np.abs(written - wave.clamp(-1, 1).numpy()).max() <= 1 / 32767 + 1e-6  # PCM_16 rounding


def test_generate_on_a_device_writes_what_the_cpu_writes(smoke_export, tmp_path, capsys):
    """``xoron generate --device`` with the model on a second device (the stand-in accelerator of
    tests/model/device_standin.py, where a host tensor beside device tensors raises as on a GPU): text, an
    image and speech come out as on the CPU."""
    from tests.model.device_standin import ACCEL, standin_accelerator

    export, _ = smoke_export
    common = ["--model", str(export), "--prompt", "a red square", "--seed", "5"]
    runs = {"text": ["--max-new-tokens", "4", "--no-stream", "--temperature", "0.8"],
            "image": ["--steps", "2", "--height", "32", "--width", "32"], "speech": ["--steps", "2"]}
    got = {}
    for device in ("cpu", str(ACCEL)):
        with standin_accelerator() if device != "cpu" else contextlib.nullcontext():
            for kind, extra in runs.items():
                out = tmp_path / f"{kind}-{device}.{ {'image': 'png', 'speech': 'wav'}.get(kind, 'txt') }"
                argv = ["generate", kind, *common, "--device", device, *extra]
                assert xoron(argv + ([] if kind == "text" else ["--out", str(out)])) == 0, (device, kind)
                got[kind, device] = (capsys.readouterr().out if kind == "text" else
                                     sf.read(out, dtype="int16")[0] if kind == "speech" else out.read_bytes())
    assert got["text", "cpu"] == got["text", str(ACCEL)] and got["text", "cpu"].strip()
    assert got["image", "cpu"] == got["image", str(ACCEL)]
    speech = got["speech", "cpu"].astype(int), got["speech", str(ACCEL)].astype(int)
    # the emulated CUDA attention computes in fp64: a sample may round the other way
    assert speech[0].shape == speech[1].shape and np.abs(speech[0] - speech[1]).max() <= 2


def test_the_quick_start_calls_run_on_an_exported_model(smoke_export):
    export, cfg = smoke_export
    model = from_pretrained(export)
    ids = torch.randint(0, cfg.llm.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    assert model.generate_text(input_ids=ids, max_new_tokens=3).shape == (1, 9)
    embeds = torch.randn(1, 4, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(1))
    image = model.generate_image(prompt_embeds=embeds, height=32, width=32, steps=1)
    assert image.shape == (1, 32, 32, 3) and image.dtype == torch.uint8


@pytest.mark.parametrize("extra, message", [
    (["text", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["text", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["text", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["image", "--out", "x.jpg"], "--out x.jpg must name a .png file"),
    (["video", "--out", "x.mp4", "--frames", "0"], "--frames 0 must be >= 1"),
    (["speech", "--out", "x.wav", "--speaker-wav", "missing.wav"], "--speaker-wav missing.wav is not a file"),
])
def test_bad_values_are_one_line_errors(extra, message, capsys, tmp_path):
    argv = ["generate", extra[0], "--model", str(tmp_path), "--prompt", "hi", *extra[1:]]
    assert message in _one_line_error(capsys, argv)


def test_a_model_without_the_generator_and_a_missing_model_are_named(runs, capsys, tmp_path):
    run = trained(runs, "single")
    err = _one_line_error(capsys, ["generate", "image", "--model", str(run), "--prompt", "x", "--out",
                                   str(tmp_path / "x.png")])
    assert "has no image generator" in err
    err = _one_line_error(capsys, ["generate", "text", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert "does not exist" in err
