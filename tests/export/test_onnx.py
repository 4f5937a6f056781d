"""ONNX export: every graph of a tiny multimodal model (LLM, vision tower, video encoder, audio encoder,
vocoder with its voice input, speaker encoder) is exported once per module; onnxruntime then reproduces
the eager components' own forwards
(their list entry points, not the export wrappers) within 1e-4 at two input sizes other than the
export's, the inputs' batch/sequence/frames/samples/patch axes are symbolic in the graph, and the
manifest says what was exported. A text-only checkpoint exports the LLM alone, and bad requests are
one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from xoron_dist.cli import main as xoron
from xoron_dist.config import load_config
from xoron_dist.export import ConsolidatedCheckpoint
from xoron_dist.export.hf import ExportError
from xoron_dist.export.onnx import MANIFEST, PARTS, DenseMaskedExperts, export_onnx, max_abs_diff
from xoron_dist.model.common.moe import RoutedExperts
from xoron_dist.model.xoron import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
# The smoke model, thinner: one vision and video layer, a two-stage codec (hop 20) and a narrow vocoder (with
# the optional harmonic branch, so its export is checked too), so the five exports take seconds each (the
# exporter's time grows with the number of ops traced).
TINY = ["model.vision.num_layers=1", "model.video.num_layers=1", "model.audio.codec_strides=[4,5]",
        "model.audio.codec_channels=4", "model.speech.vocoder.channels=8", "model.speech.vocoder.segment_samples=200",
        "model.speech.vocoder.envelope_harmonics=8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, export dir, manifest, wall seconds): every graph exported once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: intra-op threads only contend on a shared CPU
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "pipelines" / "smoke.yaml", TINY)).eval()
    out = tmp_path_factory.mktemp("onnx")
    start = time.perf_counter()
    manifest = export_onnx(model, out)
    seconds = time.perf_counter() - start
    yield model, out, manifest, seconds
    torch.set_num_threads(threads)


def _inputs(model, name: str, size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(graph inputs, eager output) for graph ``name`` at a size (0 or 1) the export did not check."""
    xs, want = _input(model, name, size)
    return (xs if isinstance(xs, tuple) else (xs,)), want


def _input(model, name: str, size: int):
    g = torch.Generator().manual_seed(100 + size)
    batch = 4 + size
    with torch.no_grad():
        if name == "llm":
            x = torch.randint(0, model.cfg.llm.vocab_size, (batch, 5 + 9 * size), generator=g)
            return x, model.llm(x).logits
        if name == "vision":
            p = model.vision.cfg.patch_size
            x = torch.rand(batch, 3, p * (8 + size), p * (6 - 5 * size), generator=g) * 2 - 1
            return x, model.vision(x).features
        if name == "video":
            side = model.video.cfg.max_resolution
            x = torch.randint(0, 256, (batch, 2 + 6 * size, side, side, 3), generator=g, dtype=torch.uint8)
            return x, model.video(list(x))[0]
        if name == "audio":
            x = torch.rand(batch, model.audio.tokenizer.hop * (9 + 13 * size), generator=g) * 2 - 1
            return x, model.audio(list(x)).features
        if name == "speaker":  # real-looking clips: a tone in noise, each its own pitch and length
            hop = model.speech.speaker.cfg.hop
            t = torch.arange(hop * (7 + 5 * size)) / 16_000
            pitch = 100 + 300 * torch.rand(batch, 1, generator=g)
            x = 0.5 * torch.sin(2 * torch.pi * pitch * t) + 0.05 * torch.randn(batch, t.shape[0], generator=g)
            return x, model.speech.speaker(x)
        x = torch.randn(batch, 4 + 7 * size, model.speech.vocoder.frame_dim, generator=g)
        voice = torch.nn.functional.normalize(torch.randn(batch, model.speech.vocoder.generator.cfg.cond_channels,
                                                          generator=g), dim=-1)
        return (x, voice), model.speech.vocoder.decode(x, voice)


@pytest.mark.parametrize("name", PARTS)
def test_onnxruntime_equals_pytorch_at_two_sizes(exported, name):
    model, out, manifest, _ = exported
    session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["latents", "voice"] if name == "vocoder" else names[:1])
    for size in (0, 1):
        xs, want = _inputs(model, name, size)
        got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0])
        assert max_abs_diff(want, got) <= 1e-4, (name, tuple(xs[0].shape))
    if name == "llm":  # the padded vocabulary rows stay -inf, the real ones finite
        assert torch.isinf(got[..., model.cfg.llm.usable_vocab_size:]).all() and torch.isfinite(
            got[..., : model.cfg.llm.usable_vocab_size]).all()


def test_a_vocoder_with_a_pitch_code_exports(tmp_path):
    """``vocoder.pitch_levels``: the graph takes the latents with the code's two channels (random here: voiced
    and unvoiced frames, positions past the range) and onnxruntime plays the same pitch as the eager vocoder."""
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "pipelines" / "smoke.yaml",
                                    [*TINY, "model.speech.vocoder.pitch_levels=16"])).eval()
    manifest = export_onnx(model, tmp_path / "coded", parts=["vocoder"])
    assert "pitch code" in " ".join(manifest["graphs"]["vocoder"]["notes"])
    session = ort.InferenceSession(str(tmp_path / "coded" / "vocoder.onnx"), providers=["CPUExecutionProvider"])
    for size in (0, 1):
        (x, voice), want = _input(model, "vocoder", size)
        assert x.shape[-1] == model.cfg.model.audio.latent_dim + 2
        got = torch.from_numpy(session.run(None, {"latents": x.numpy(), "voice": voice.numpy()})[0])
        assert max_abs_diff(want, got) <= 1e-4


SYMBOLIC = {"llm": {0: "batch", 1: "seq"}, "vision": {0: "batch", 2: "8*rows", 3: "8*cols"},
            "video": {0: "batch", 1: "frames"}, "audio": {0: "batch", 1: "20*codec_frames"},
            "vocoder": {0: "batch", 1: "codec_frames"}, "speaker": {0: "batch", 1: "160*speaker_frames"}}


@pytest.mark.parametrize("name", PARTS)
def test_graph_inputs_are_symbolic_and_the_manifest_says_so(exported, name):
    _, out, manifest, _ = exported
    graph = onnx.load(str(out / f"{name}.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert {axis: dims[axis].dim_param for axis in SYMBOLIC[name]} == SYMBOLIC[name]
    entry = manifest["graphs"][name]
    assert entry["dynamic_axes"][graph.input[0].name] == {str(axis): dim for axis, dim in SYMBOLIC[name].items()}
    symbolic_out = 1 if name == "speaker" else 2  # batch and its length axis; a voice vector has no length
    assert all(isinstance(d, str) for d in entry["outputs"][0]["shape"][:symbolic_out])
    assert "static_reason" not in entry
    if name == "vocoder":  # the voice shares the latents' batch dimension
        assert graph.input[1].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert entry["dynamic_axes"]["voice"] == {"0": "batch"}


def test_manifest_lists_what_was_exported(exported):
    _, out, manifest, seconds = exported
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["format"] == "onnx" and manifest["skipped"] == {} and list(manifest["graphs"]) == list(PARTS)
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(f"{name}.onnx" for name in PARTS)
    for name, entry in manifest["graphs"].items():
        assert entry["file"] == f"{name}.onnx" and entry["opset"] == manifest["opset"]
        shapes = [tuple(check["shape"]) for check in entry["parity"]]
        assert len(set(shapes)) == 2 and all(check["max_abs_diff"] <= 1e-4 for check in entry["parity"])
        assert entry["export_seconds"] > 0
    assert "dense top-k-masked" in manifest["graphs"]["llm"]["moe"]
    print("export seconds:", {name: e["export_seconds"] for name, e in manifest["graphs"].items()},
          f"total {seconds:.1f}")


def test_an_existing_export_and_bad_parts_are_refused(exported, capsys):
    model, out, _, _ = exported
    with pytest.raises(ExportError, match="already holds an ONNX export; pass --force"):
        export_onnx(model, out)
    with pytest.raises(ExportError, match="unknown part.* speech; parts: llm, vision"):
        export_onnx(model, out, force=True, parts=["speech"])
    assert (out / MANIFEST).is_file()  # refused before anything was touched
    assert xoron(["export", "--checkpoint", str(out), "--format", "hf", "--parts", "llm", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: --parts applies to --format onnx only, not hf"


def test_a_text_only_checkpoint_exports_the_llm_alone(tmp_path):
    cfg = load_config(None, ["preset=tiny", "model.llm.num_layers=1"])
    torch.manual_seed(1)
    state = {n: t.clone() for n, t in build_model(cfg).state_dict().items()}
    ckpt = ConsolidatedCheckpoint(cfg, state, multimodal=False, step=5, source="test")
    with pytest.raises(ExportError, match="part vision was asked for but the model has no vision"):
        export_onnx(ckpt, tmp_path / "asked", parts=["llm", "vision"])
    manifest = export_onnx(ckpt, tmp_path / "onnx")
    assert list(manifest["graphs"]) == ["llm"] and manifest["step"] == 5
    assert sorted(manifest["skipped"]) == ["audio", "speaker", "video", "vision", "vocoder"]
    assert all(check["max_abs_diff"] <= 1e-4 for check in manifest["graphs"]["llm"]["parity"])


def test_dense_masked_experts_equal_the_sorted_dispatch():
    """The export's MoE path against the eager one, on shapes where some experts get no token."""
    torch.manual_seed(0)
    experts = RoutedExperts(6, 16, 24)
    experts.init_weights(0.2)
    x = torch.randn(5, 16)
    chosen = torch.stack([torch.randperm(6)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    want = experts(x, chosen, weights)
    assert (DenseMaskedExperts(experts)(x, chosen, weights) - want).abs().max().item() <= 1e-6


def test_max_abs_diff_requires_the_same_non_finite_entries():
    a = torch.tensor([1.0, float("-inf")])
    assert max_abs_diff(a, torch.tensor([1.5, float("-inf")])) == 0.5
    assert max_abs_diff(a, torch.tensor([1.0, 0.0])) == float("inf")
    assert max_abs_diff(a, torch.tensor([1.0, float("inf")])) == float("inf")
    assert max_abs_diff(a, a[:1]) == float("inf")


def test_the_seed_vision_path_exports_what_the_projector_reads(tmp_path):
    """With the dual-stream layers and the compressor on, the vision graph gives the k compressed tokens
    (the export itself fails above 1e-4 from PyTorch at two sizes); video in tower mode is skipped, named."""
    torch.manual_seed(0)
    seed_path = ["model.vision.dual_stream_layers=1", "model.vision.compressor_tokens=3",
                 "model.vision.compressor_layers=1", "model.video.frame_encoder=tower",
                 "model.video.tokens_per_frame=2", "data.video_tokens=16", "model.audio.enabled=false",
                 "model.speech.enabled=false"]
    model = build_model(load_config(REPO / "pipelines" / "smoke.yaml", [*TINY, *seed_path])).eval()
    manifest = export_onnx(model, tmp_path, parts=["vision"])
    entry = manifest["graphs"]["vision"]
    assert [d["max_abs_diff"] <= 1e-4 for d in entry["parity"]] == [True, True]
    assert entry["outputs"][0]["shape"][1:] == [3, model.vision.cfg.hidden_size]
    with pytest.raises(ExportError, match="frame_encoder: tower"):
        export_onnx(model, tmp_path / "video", parts=["video"])
