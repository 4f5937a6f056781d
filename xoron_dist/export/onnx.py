"""Export to ONNX: one graph per component, each verified in onnxruntime against PyTorch right after export.

    <out>/llm.onnx          input_ids (batch, seq) int64                  -> logits (batch, seq, vocab rows)
    <out>/vision.onnx       pixel_values (batch, 3, height, width) fp32   -> features (batch, patches, hidden)
    <out>/video.onnx        frames (batch, frames, height, width, 3) uint8 -> features (batch, tokens, hidden)
    <out>/audio.onnx        samples (batch, samples) fp32 in [-1, 1]      -> features (batch, codec frames, hidden)
    <out>/vocoder.onnx      latents (batch, codec frames, latent) fp32    -> waveform (batch, samples)
                            [, voice (batch, speaker dim) fp32: a speaker-conditioned BigVGAN's second input]
    <out>/speaker.onnx      samples (batch, samples) fp32 in [-1, 1]      -> voice (batch, speaker dim), unit length
    <out>/<name>.onnx.data  a graph's weights, beside it, when they exceed protobuf's 2 GB (the exporter's rule)
    <out>/onnx_manifest.json   per graph: inputs/outputs with their symbolic axes, opset, the parity
                               measured at export (two input sizes), export seconds; skipped parts and why

Each graph is a thin wrapper (``*Graph`` below) that calls the component's own modules on one batched
tensor: the eager entry points take Python lists of media of any size and pad them, which no graph can
express, so a wrapper takes a batch of equal-size items (what the eager code does when nothing needs
padding) and leaves resizing to the caller. The wrappers' outputs are checked against the eager
components' own ``forward`` (the list path, not the wrapper), so a wrapper that drifted from the model
fails the export.

torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) writes the graphs with named dynamic
axes. Every example size is >= 2 (a dynamic dim of size 0 or 1 gets specialised), and after export the
ONNX inputs are read back: an axis declared dynamic that came out as a number fails the export (the SDPA
specialisation trap, ``shared/docs/ORACLES.md`` D.2). The manifest's axes are read from the graph itself.

MoE: exported as a *dense top-k-masked* compute (``DenseMaskedExperts``): the router is the model's own
(same top-k by score + bias, same combine weights); every expert then runs on every token and the
outputs are summed with the combine weights scattered into a (tokens, experts) matrix that is exactly
zero off the top-k. Unchosen experts contribute exactly 0 · finite = 0, so the result equals the sorted
dropless dispatch up to fp32 summation order (measured ~1e-7). The eager dispatch itself cannot be
exported as written: its fast path is ``torch._grouped_mm`` (no ONNX operator) and its fallback reads
each expert's slice size on the host (``.tolist()``: data-dependent shapes). The dense path costs
``num_experts / top_k`` times the routed FLOPs; a deployment that needs sparse compute should use
ONNX Runtime's MoE contrib operator instead (not built here).

Verification: onnxruntime (CPU) runs each graph at the example size and at a second, larger size; the
maximum absolute difference to PyTorch must be <= 1e-4 (non-finite entries, the -inf of padded
vocabulary rows, must match exactly), else ``ExportError`` names the graph, the size and the difference,
and the graph file is removed. A component whose dynamic export fails is exported with static shapes
instead, and the manifest and the log say why (``static_reason``); it is never reported as dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.export.hf import ExportError
from xoron_dist.model.common.moe import RoutedExperts, uncounted_routing
from xoron_dist.model.common.rope_nd import grid_coords
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.vision.tower import resize_positions
from xoron_dist.train.consolidation import ConsolidatedCheckpoint

logger = logging.getLogger(__name__)

OPSET = 20
TOLERANCE = 1e-4
MANIFEST = "onnx_manifest.json"
PARTS = ("llm", "vision", "video", "audio", "vocoder", "speaker")
SPEECH = ("vocoder", "speaker")  # the parts of model.speech


# --------------------------------------------------------------------------- the MoE's export path


class DenseMaskedExperts(nn.Module):
    """``RoutedExperts``' weights computed densely: every expert on every token, outputs weighted by the
    combine weights scattered into (tokens, experts) (zero off the top-k). Same interface and result as
    the sorted dispatch (see the module docstring); shares the parameters, copies nothing."""

    def __init__(self, experts: RoutedExperts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.gate_up, self.down = experts.gate_up, experts.down

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (tokens, hidden), chosen/weights (tokens, k) -> (tokens, hidden)."""
        dense = x.new_zeros(x.shape[0], self.num_experts, dtype=torch.float32).scatter(1, chosen, weights.float())
        gate, up = torch.einsum("th,eih->tei", x, self.gate_up).chunk(2, dim=-1)  # (tokens, experts, inter)
        out = torch.einsum("tei,ehi->teh", F.silu(gate) * up, self.down)  # (tokens, experts, hidden)
        return torch.einsum("te,teh->th", dense, out.float()).to(x.dtype)


@contextlib.contextmanager
def dense_experts(module: nn.Module) -> Iterator[None]:
    """Inside the block every ``RoutedExperts`` under ``module`` is a ``DenseMaskedExperts`` on the same
    weights, and the routers' load counters are left as they were (export traces are not load)."""
    swapped = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, RoutedExperts)]
    try:
        for parent, name, child in swapped:
            setattr(parent, name, DenseMaskedExperts(child))
        with uncounted_routing(module):
            yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


# --------------------------------------------------------------------------- one wrapper per graph


class LLMGraph(nn.Module):
    """input_ids (batch, seq) -> logits (batch, seq, vocab rows), positions 0..seq-1, no cache."""

    def __init__(self, llm: XoronLLM) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids).logits


class VisionGraph(nn.Module):
    """pixel_values (batch, 3, H, W) normalised to [-1, 1] (``prepare_images``) -> patch features
    (batch, (H // p) · (W // p), hidden), or with ``vision.compressor_tokens`` k the compressed tokens
    (batch, k, hidden): ``VisionTower.forward`` on a batch of equal-size images."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower, p = self.tower, self.tower.cfg.patch_size
        batch, channels, height, width = pixel_values.shape
        rows, cols = height // p, width // p
        x = pixel_values[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p)
        patches = x.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)  # ``patchify``'s order
        tokens = tower.patch_embed(patches)
        if tower.position_embedding is not None:
            tokens = tokens + resize_positions(tower.position_embedding, rows, cols)
        coords = grid_coords(rows, cols, device=pixel_values.device).expand(batch, -1, -1)
        latents = tower.latent_embedding.expand(batch, -1, -1) if tower.latent_embedding is not None else None
        features = tower.encoder(tokens, coords, None, latents)[0]
        if tower.dual_stream is None and tower.compressor is None:
            return features
        # the seed's path (dual-stream layers, compressor): what the projector reads, as VisionTower.forward
        return tower.after_blocks(features, coords, None)[0]  # equal-size images: every patch real


class VideoGraph(nn.Module):
    """frames (batch, T, H, W, 3) uint8, H and W multiples of the patch with the longer side inside
    [min_resolution, max_resolution] (no resize needed), T <= max_frames -> features (batch, T·h·w, hidden):
    ``VideoEncoder.forward`` on a batch of equal-size videos (no padding, every token valid)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        enc, p = self.encoder, self.encoder.cfg.patch_size
        batch, t, height, width, _ = frames.shape
        rows, cols = height // p, width // p
        x = frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # ``frames_to_patches``' scaling
        per_frame = rows * cols
        patches = x.reshape(batch, t, 3, rows, p, cols, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(
            batch, t * per_frame, 3 * p * p)
        motion = torch.cat((torch.zeros_like(patches[:, :per_frame]),
                            patches[:, per_frame:] - patches[:, :-per_frame]), dim=1)  # same patch, one frame back
        coords = grid_coords(t, rows, cols, device=frames.device).expand(batch, -1, -1)
        frame = coords[..., 0]
        mask = (frame[:, None, :] <= frame[:, :, None])[:, None]  # block-causal in time
        dtype = enc.patch_embed.weight.dtype
        cos, sin = enc.rope(coords)
        rope = (cos.to(dtype), sin.to(dtype))
        h = enc.patch_embed(patches.to(dtype))
        motion = enc.motion_embed(motion.to(dtype)).flatten(0, 1)
        for layer in enc.layers:  # ``VideoLayer.forward`` with every token valid
            h = h + layer.attn(layer.attn_norm(h), rope, mask)
            h = h + layer.ffn(layer.ffn_norm(h).flatten(0, 1), motion).view_as(h)
        return enc.norm(h)


class AudioGraph(nn.Module):
    """samples (batch, frames · hop) float in [-1, 1] -> Conformer features (batch, frames, hidden):
    ``AudioEncoder.forward`` on clips of equal length (tokenizer, residual VQ, Conformer)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        latents = enc.tokenizer(samples.to(enc.tokenizer.conv_in.weight.dtype))
        return enc.conformer(enc.quantizer(latents).latents).hidden


class VocoderGraph(nn.Module):
    """latents (batch, frames, latent_dim) [, voice (batch, speaker dim) when speaker-conditioned] ->
    waveform (batch, frames · hop) in [-1, 1] (``Vocoder.decode``)."""

    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, latents: torch.Tensor, voice: torch.Tensor | None = None) -> torch.Tensor:
        return self.vocoder.decode(latents, voice)


class SpeakerGraph(nn.Module):
    """samples (batch, samples) fp32 in [-1, 1], whole clips of equal length -> voice vectors (batch, dim),
    unit length (``SpeakerEncoder``): the speaker-conditioned vocoder's second input."""

    def __init__(self, speaker: nn.Module) -> None:
        super().__init__()
        self.speaker = speaker

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        lengths = torch.full(samples.shape[:1], samples.shape[1], device=samples.device)
        return self.speaker.embed_clips(samples, lengths)


# --------------------------------------------------------------------------- what each graph is


Dim = torch.export.Dim


@dataclass
class GraphInput:
    """A graph's input beyond its first: its name, a tensor for each of the spec's two sizes (same batch
    as the first input's), and its dynamic axes as in ``GraphSpec.axes`` (a name shared with another
    input is one dimension, e.g. ``batch``)."""

    name: str
    examples: tuple[torch.Tensor, torch.Tensor]
    axes: dict[int, tuple[str, int, int | None]]


@dataclass
class GraphSpec:
    """One graph: the wrapper, the eager reference, an input at two sizes, and its dynamic axes.
    ``axes``: per input, {axis: (name, multiple)}, the size being ``multiple`` · a dynamic ``name``.
    ``more_inputs``: further inputs (the reference and the wrapper take them after the first)."""

    name: str
    graph: nn.Module
    reference: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, torch.Tensor]  # example size, second size
    input_name: str
    output_name: str
    axes: dict[int, tuple[str, int, int | None]]  # axis -> (dim name, multiple, max of the dim or None)
    output_axes: dict[int, str]  # names for the output's symbolic axes (the exporter writes expressions)
    notes: list[str] = field(default_factory=list)
    more_inputs: list[GraphInput] = field(default_factory=list)

    @property
    def all_inputs(self) -> list[GraphInput]:
        """Every input, the first one included, as ``GraphInput``s."""
        return [GraphInput(self.input_name, self.inputs, self.axes), *self.more_inputs]

    def examples(self, size: int) -> tuple[torch.Tensor, ...]:
        """The inputs at size 0 (the export's) or 1 (the second check)."""
        return tuple(i.examples[size] for i in self.all_inputs)

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        made: dict[str, Any] = {}  # one Dim per name: inputs sharing a name share the dimension
        shapes = []
        for graph_input in self.all_inputs:
            dims = {}
            for axis, (name, multiple, high) in graph_input.axes.items():
                if name not in made:
                    made[name] = Dim(name, min=1, max=high) if high else Dim(name, min=1)
                dims[axis] = made[name] * multiple if multiple > 1 else made[name]
            shapes.append(dims)
        return tuple(shapes)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _llm_spec(llm: XoronLLM) -> GraphSpec:
    vocab = llm.cfg.vocab_size

    def ids(batch: int, seq: int, seed: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq), generator=_generator(seed))

    return GraphSpec("llm", LLMGraph(llm), lambda x: llm(x).logits, (ids(2, 7, 0), ids(3, 12, 1)), "input_ids",
                     "logits", {0: ("batch", 1, None), 1: ("seq", 1, None)}, {0: "batch", 1: "seq"},
                     ["positions 0..seq-1; no KV cache (one full forward); padded vocabulary rows are -inf"])


def _vision_spec(tower: nn.Module) -> GraphSpec:
    p = tower.cfg.patch_size

    def pixels(batch: int, rows: int, cols: int, seed: int) -> torch.Tensor:
        return torch.rand(batch, 3, rows * p, cols * p, generator=_generator(seed)) * 2 - 1

    notes = ["pixels as prepare_images makes them: resized by the caller, (x / 255 - 0.5) / 0.5"]
    return GraphSpec("vision", VisionGraph(tower), lambda x: tower(x).features,
                     (pixels(2, 3, 2, 2), pixels(3, 4, 5, 3)), "pixel_values", "features",
                     {0: ("batch", 1, None), 2: ("rows", p, None), 3: ("cols", p, None)},
                     {0: "batch"} if tower.compressor is not None else {0: "batch", 1: "patches"}, notes)


def _video_spec(encoder: nn.Module) -> GraphSpec:
    cfg, p = encoder.cfg, encoder.cfg.patch_size
    side = cfg.max_resolution - cfg.max_resolution % p  # a size frames_to_patches keeps as is

    def frames(batch: int, t: int, seed: int) -> torch.Tensor:
        return torch.randint(0, 256, (batch, t, side, side, 3), generator=_generator(seed), dtype=torch.uint8)

    notes = [f"height and width fixed at {side}: frames_to_patches resizes the longer side into "
             f"[min_resolution, max_resolution] = [{cfg.min_resolution}, {cfg.max_resolution}] in Python "
             "(resize to this size before calling)", f"frames at most max_frames = {cfg.max_frames} (the eager "
             "encoder subsamples longer videos)"]

    def reference(x: torch.Tensor) -> torch.Tensor:
        return encoder(list(x))[0]

    return GraphSpec("video", VideoGraph(encoder), reference, (frames(2, 3, 4), frames(3, 5, 5)), "frames",
                     "features", {0: ("batch", 1, None), 1: ("frames", 1, cfg.max_frames)},
                     {0: "batch", 1: "tokens"}, notes)


def _audio_spec(encoder: nn.Module) -> GraphSpec:
    hop = encoder.tokenizer.hop

    def samples(batch: int, frames: int, seed: int) -> torch.Tensor:
        return torch.rand(batch, frames * hop, generator=_generator(seed)) * 2 - 1

    notes = [f"samples a multiple of the codec hop ({hop}): pad clips with zeros to whole frames"]
    return GraphSpec("audio", AudioGraph(encoder), lambda x: encoder(list(x)).features,
                     (samples(2, 3, 6), samples(3, 5, 7)), "samples", "features",
                     {0: ("batch", 1, None), 1: ("codec_frames", hop, None)},
                     {0: "batch", 1: "codec_frames"}, notes)


def _vocoder_spec(vocoder: nn.Module) -> GraphSpec:
    width, voice_dim = vocoder.generator.cfg.in_channels, vocoder.generator.cfg.cond_channels

    def latents(batch: int, frames: int, seed: int) -> torch.Tensor:
        return torch.randn(batch, frames, width, generator=_generator(seed))

    def voice(batch: int, seed: int) -> torch.Tensor:
        return F.normalize(torch.randn(batch, voice_dim, generator=_generator(seed)), dim=-1)

    notes = ["the BigVGAN generator with its weight norm as trained (folded into the graph's weights)"]
    more = []
    if vocoder.conditioned:
        more = [GraphInput("voice", (voice(2, 10), voice(3, 11)), {0: ("batch", 1, None)})]
        notes.append("speaker-conditioned: voice is the speaker graph's output for a reference clip (unit length)")
    if vocoder.generator.cfg.pitch_code:
        notes.append("the last two latent channels are the pitch code (log-f0 level position in [-1, 1], voicing "
                     "+1/-1: xoron_dist.model.speech.pitch.pitch_code); they drive the harmonic source")
    return GraphSpec("vocoder", VocoderGraph(vocoder), vocoder.decode, (latents(2, 3, 8), latents(3, 5, 9)),
                     "latents", "waveform", {0: ("batch", 1, None), 1: ("codec_frames", 1, None)},
                     {0: "batch", 1: "samples"}, notes, more)


def _speaker_spec(speaker: nn.Module) -> GraphSpec:
    hop = speaker.cfg.hop

    def samples(batch: int, frames: int, seed: int) -> torch.Tensor:
        return torch.rand(batch, frames * hop, generator=_generator(seed)) * 2 - 1

    notes = [f"whole clips of equal length, a multiple of {hop} samples (the encoder's frame hop; pad clips "
             "with zeros to whole frames): padding a shorter clip changes its vector, embed it alone"]
    return GraphSpec("speaker", SpeakerGraph(speaker), speaker, (samples(2, 6, 12), samples(3, 9, 13)), "samples",
                     "voice", {0: ("batch", 1, None), 1: ("speaker_frames", hop, None)}, {0: "batch"}, notes)


def graph_specs(model: nn.Module) -> tuple[list[GraphSpec], dict[str, str]]:
    """The graphs ``model`` (``XoronLLM`` or ``XoronMultimodalModel``) has, and part -> why it is skipped."""
    llm = model if isinstance(model, XoronLLM) else model.llm
    specs, skipped = [_llm_spec(llm)], {}
    found = {"vision": getattr(model, "vision", None), "video": getattr(model, "video", None),
             "audio": getattr(model, "audio", None)}
    speech = getattr(model, "speech", None)
    found["vocoder"] = speech.vocoder if speech is not None else None
    found["speaker"] = speech.speaker if speech is not None else None
    builders = {"vision": _vision_spec, "video": _video_spec, "audio": _audio_spec, "vocoder": _vocoder_spec,
                "speaker": _speaker_spec}
    for part, module in found.items():
        if module is None:
            skipped[part] = f"the model has no {part} ({'model.speech' if part in SPEECH else 'model.' + part}" \
                            ".enabled is false in its config)"
        elif part == "video" and module.cfg.frame_encoder == "tower":
            skipped[part] = ("its video encoder runs frames through the vision tower (model.video.frame_encoder: "
                             "tower), which has no ONNX graph yet: export the vision part and run the rest in PyTorch")
        else:
            specs.append(builders[part](module))
    return specs, skipped


# --------------------------------------------------------------------------- export and verification


def export_onnx(ckpt_or_model: ConsolidatedCheckpoint | nn.Module, out: str | Path, *, force: bool = False,
                parts: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write one verified ONNX graph per component of ``ckpt_or_model`` into ``out`` (see the module
    docstring) and ``onnx_manifest.json``; returns the manifest. ``parts``: a subset of ``PARTS``
    (default: every part the model has; absent ones are skipped with a log line). Raises ``ExportError``
    for an unknown or absent part asked for, an ``out`` that holds an export (without ``force``), or a
    graph onnxruntime does not reproduce within 1e-4."""
    import onnxruntime

    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise ExportError(f"format onnx: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    model = ckpt_or_model.build_model() if isinstance(ckpt_or_model, ConsolidatedCheckpoint) else ckpt_or_model
    specs, skipped = graph_specs(model)
    if parts is not None:
        missing = [p for p in parts if p in skipped]
        if missing:
            raise ExportError(f"format onnx: part {missing[0]} was asked for but {skipped[missing[0]]}")
        specs = [s for s in specs if s.name in parts]
        skipped = {}
    out = Path(out)
    _prepare_out_dir(out, force)
    for part, why in skipped.items():
        logger.info("onnx: skipping %s: %s", part, why)
    was_training = model.training
    model.eval()
    graphs = {}
    try:
        for spec in specs:
            graphs[spec.name] = _export_graph(spec, out, onnxruntime)
    finally:
        model.train(was_training)
    manifest = {"format": "onnx", "opset": OPSET, "tolerance": TOLERANCE, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "graphs": graphs, "skipped": skipped}
    if isinstance(ckpt_or_model, ConsolidatedCheckpoint):
        manifest.update(step=ckpt_or_model.step, source=ckpt_or_model.source)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _prepare_out_dir(out: Path, force: bool) -> None:
    """Create ``out``; one holding an ONNX export is refused unless ``force`` (then its manifest, its
    ``*.onnx`` files and their ``*.onnx.data`` weights, and only those, are removed)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if (out / MANIFEST).is_file() and not force:
        raise ExportError(f"{out} already holds an ONNX export; pass --force to replace it, or choose another --out")
    for path in ([*out.glob("*.onnx"), *out.glob("*.onnx.data")] if out.is_dir() else ()):
        path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _torch_export(spec: GraphSpec, path: Path, dynamic: bool) -> None:
    """The dynamo exporter, its progress prints kept off stdout (they go to the debug log)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        program = torch.onnx.export(spec.graph, spec.examples(0), dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=spec.dynamic_shapes() if dynamic else None,
                                    input_names=[i.name for i in spec.all_inputs], output_names=[spec.output_name],
                                    verbose=False)
        program.save(path)
    logger.debug("onnx exporter, %s: %s", spec.name, printed.getvalue())


def _export_graph(spec: GraphSpec, out: Path, onnxruntime) -> dict[str, Any]:
    """Export ``spec`` to ``out/<name>.onnx``, check its axes and its outputs; the manifest entry."""
    path = out / f"{spec.name}.onnx"
    start = time.perf_counter()
    static_reason = None
    spec.graph.eval()
    with dense_experts(spec.graph):
        try:
            _torch_export(spec, path, dynamic=True)
        except Exception as err:  # noqa: BLE001 - any exporter failure: fall back to static shapes, say why
            static_reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
            logger.warning("onnx: %s does not export with dynamic axes (%s); exporting it with static shapes",
                           spec.name, static_reason)
            try:
                _torch_export(spec, path, dynamic=False)
            except Exception as again:  # noqa: BLE001 - reported as one line with the cause chained
                raise ExportError(f"onnx {spec.name}: the exporter failed ({type(again).__name__}: "
                                  f"{str(again).strip().splitlines()[0]}); export the other parts with --parts") \
                    from again
    seconds = time.perf_counter() - start
    inputs, outputs = _graph_io(path, spec.output_axes)
    dynamic_axes = {i.name: {str(axis): inputs[k]["shape"][axis] for axis in i.axes}  # JSON keys
                    for k, i in enumerate(spec.all_inputs)}
    if static_reason is None:
        for name, axes in dynamic_axes.items():
            fixed = {axis: dim for axis, dim in axes.items() if not isinstance(dim, str)}
            if fixed:
                path.unlink()
                raise ExportError(f"onnx {spec.name}: axes {sorted(fixed)} of {name} were declared dynamic but "
                                  f"the exporter specialised them to {fixed}")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for size in (0, 1) if static_reason is None else (0,):
        xs = spec.examples(size)
        with torch.no_grad(), uncounted_routing(spec.graph):
            want = spec.reference(*xs)
        got = torch.from_numpy(session.run(None, {i.name: x.numpy() for i, x in zip(spec.all_inputs, xs,
                                                                                       strict=True)})[0])
        diff = max_abs_diff(want, got)
        if not diff <= TOLERANCE:
            path.unlink()
            raise ExportError(f"onnx {spec.name}: onnxruntime differs from PyTorch by {diff:.3g} (> {TOLERANCE}) at "
                              f"{spec.input_name} of shape {tuple(xs[0].shape)}; the graph was not kept")
        diffs.append({"shape": list(xs[0].shape), "max_abs_diff": diff})
    logger.info("onnx: %s exported in %.1f s, parity %s", spec.name, seconds,
                ", ".join(f"{d['max_abs_diff']:.1e} at {tuple(d['shape'])}" for d in diffs))
    entry = {"file": path.name, "inputs": inputs, "outputs": outputs, "dynamic_axes": dynamic_axes,
             "opset": OPSET, "parity": diffs, "export_seconds": round(seconds, 2), "notes": spec.notes}
    if spec.name in ("llm", "video"):
        entry["moe"] = "dense top-k-masked experts (DenseMaskedExperts): exact up to fp32 summation order"
    if static_reason is not None:
        entry["static_reason"] = static_reason
    return entry


def max_abs_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    """Max |want - got| over finite entries; inf when the shapes or the non-finite entries differ."""
    if want.shape != got.shape:
        return float("inf")
    want, got = want.float(), got.float()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(want[~finite], got[~finite]):
        return float("inf")
    return (want[finite] - got[finite]).abs().max().item() if finite.any() else 0.0


def _graph_io(path: Path, output_axes: dict[int, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph's inputs and outputs: name, element type, shape (str: a symbolic dim). The output's
    symbolic axes are renamed to ``output_axes`` (the exporter names them by expressions such as
    ``CeilToInt(IntTrueDiv(20*codec_frames, 20))``); an axis it wrote as a number keeps its number."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    dims = graph.output[0].type.tensor_type.shape.dim
    renamed = False
    for axis, name in output_axes.items():
        if dims[axis].dim_param and dims[axis].dim_param != name:
            dims[axis].dim_param, renamed = name, True
    if renamed:
        onnx.save(proto, str(path))

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
                "shape": shape}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


__all__ = ["DenseMaskedExperts", "ExportError", "MANIFEST", "PARTS", "dense_experts", "export_onnx", "graph_specs",
           "max_abs_diff"]
