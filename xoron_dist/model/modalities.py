"""The modality table: every medium Xoron reads, with what the data layer and the model need of it.

One row per medium. The loader lays a medium out as ``<|x_start|> <|x_pad|>*n <|x_end|>`` (for a
generation target ``<|gen_x|>`` first): ``span`` is the ``DataConfig`` field that gives n, a count
(``image_tokens``) or, with ``per_second``, a rate over the clip's duration
(``audio_tokens_per_second``). A medium the model understands has an encoder (``build``) and a
projector (``build_projector``: a Perceiver resampler, or for audio frames pooled per token)
emitting exactly n tokens in the LLM's width; both live on ``XoronMultimodalModel`` under
``encoder``/``projector`` (checkpoint names, stage-freeze prefixes). ``blank`` is one empty medium:
a rank whose micro-batch has none of it encodes that instead, so every rank runs the same modules
and reduces the same gradients. ``tensor_plan`` is the encoder's tensor-parallel plan.
A medium Xoron also produces has a generator (``build_generator``, switched by the config section
``generator_section``, under the attribute ``generator``) that reads the LLM's states of each
request (``xoron_dist.model.prompts``) and adds the losses ``objectives`` names to the step
(``xoron_dist.train.objectives``); understanding alone trains through the LM's loss.

The packer (``xoron_dist.data.packing``), ``XoronMultimodalModel`` and the trainer loop over this
table; adding a medium is a folder under ``model/``, its sharding plan, a row here and, if it
generates, an objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from xoron_dist.config import XoronConfig

if TYPE_CHECKING:  # the table itself stays importable without torch (the layout validator reads it)
    import torch
    from torch import nn

    from xoron_dist.model.common.sharding import TensorPlan


@dataclass(frozen=True)
class Modality:
    name: str  # "image": the kinds' medium, and the batch fields ``images``, ``image_spans``, ``image_is_target``
    generation_token: str  # the special token that asks for the medium ("gen_image")
    span: str  # DataConfig field giving the placeholder count (or, ``per_second``, the rate per second)
    per_second: bool = False
    section: str | None = None  # model config section whose ``enabled`` switches the encoder ("vision")
    heads: str | None = None  # the encoder's attention heads, dotted in the section ("num_heads")
    encoder: str | None = None  # XoronMultimodalModel attribute of the encoder ("vision")
    projector: str | None = None  # ... and of its projector ("image_projector")
    build: Callable[[XoronConfig], nn.Module] | None = None
    build_projector: Callable[[XoronConfig, Modality, nn.Module], nn.Module] | None = None  # (cfg, row, encoder)
    blank: Callable[[nn.Module], torch.Tensor] | None = None  # encoder -> one empty medium (uint8, on CPU)
    tensor_plan: Callable[[XoronConfig, nn.Module], TensorPlan] | None = None  # (cfg, encoder) -> plan
    # (model, encoder): links the built encoder to other modules of the model (video's tower mode: the vision tower)
    attach: Callable[[nn.Module, nn.Module], None] | None = None
    generator: str | None = None  # XoronMultimodalModel attribute of the generator ("speech")
    generator_section: str | None = None  # model config section whose ``enabled`` switches it ("speech")
    build_generator: Callable[[XoronConfig], nn.Module] | None = None
    objectives: tuple[str, ...] = ()  # the losses the generator adds, in ``generator.objective_sums``' keys
    generator_heads: tuple[str, ...] = ()  # its attention heads, dotted in ``generator_section`` (TP splits them)
    generator_plan: Callable[[XoronConfig], TensorPlan] | None = None

    def request_tokens(self) -> tuple[str, str]:
        """The special tokens that end a generation request, as ``data.packing`` lays one out:
        ``prompt + text <|gen_x|> <|x_start|>``; the generator's condition is the LLM's states of it all."""
        return f"<|{self.generation_token}|>", f"<|{self.name}_start|>"

    def encoder_heads(self, cfg: XoronConfig) -> int:
        """The encoder's attention heads (tensor parallelism splits them)."""
        value = getattr(cfg.model, self.section)
        for part in self.heads.split("."):
            value = getattr(value, part)
        return value

    def span_length(self, cfg: XoronConfig, item: torch.Tensor) -> int:
        """Placeholders one medium takes: the fixed ``data.<span>``, or for a per-second medium (audio
        samples at ``model.<section>.sample_rate``) ceil(seconds · rate), as the packer lays it out."""
        setting = getattr(cfg.data, self.span)
        if not self.per_second:
            return int(setting)
        return per_second_tokens(item.shape[-1], getattr(cfg.model, self.section).sample_rate, Fraction(str(setting)))

    @property
    def batch_field(self) -> str:
        """The batch's list of this medium's tensors (``images``)."""
        return f"{self.name}s"

    def understood(self, cfg: XoronConfig) -> bool:
        """Whether ``cfg`` builds this medium's encoder."""
        return self.section is not None and getattr(cfg.model, self.section).enabled

    def generator_head_counts(self, cfg: XoronConfig) -> list[tuple[str, int]]:
        """(dotted config field, heads) of each attention of the generator."""
        found = []
        for dotted in self.generator_heads:
            value = getattr(cfg.model, self.generator_section)
            for part in dotted.split("."):
                value = getattr(value, part)
            found.append((f"model.{self.generator_section}.{dotted}", value))
        return found

    def generated(self, cfg: XoronConfig) -> bool:
        """Whether ``cfg`` builds this medium's generator."""
        return self.generator_section is not None and getattr(cfg.model, self.generator_section).enabled


def per_second_tokens(samples: int, sample_rate: int, rate: Fraction) -> int:
    """ceil(samples / sample_rate · rate), at least 1, in integers (exact like the Fraction, no float
    rounding: 12.5 tokens/s over 0.08 s is exactly 1)."""
    return max(1, -(-samples * rate.numerator // (sample_rate * rate.denominator)))


def _build_vision(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.vision import VisionTower, load_siglip_vision

    vision = cfg.model.vision
    return load_siglip_vision(vision.pretrained_path, vision) if vision.pretrained_path else VisionTower(vision)


def _build_video(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.video import TowerVideoEncoder, VideoEncoder, tower_clip_sizes

    video = cfg.model.video
    if video.frame_encoder == "own":
        return VideoEncoder(video, cfg.llm.init_std)
    return TowerVideoEncoder(video, cfg.model.vision.hidden_size, cfg.llm.init_std, *tower_clip_sizes(cfg))


def _attach_video(model: nn.Module, encoder: nn.Module) -> None:
    """Tower mode: the video encoder runs its frames through the model's own vision tower."""
    if encoder.cfg.frame_encoder == "tower":
        encoder.use_tower(model.vision)


def _build_audio(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.audio.encoder import AudioEncoder

    return AudioEncoder(cfg.model.audio)


def _build_speech(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.speech.head import SpeechHead

    return SpeechHead(cfg)


def _build_image_gen(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.generation.heads import ImageGenerator

    return ImageGenerator(cfg)


def _build_video_gen(cfg: XoronConfig) -> nn.Module:
    from xoron_dist.model.generation.heads import VideoGenerator

    return VideoGenerator(cfg)


def _perceiver(cfg: XoronConfig, row: Modality, encoder: nn.Module) -> nn.Module:
    """A Perceiver resampler from the encoder's width to the LLM's, emitting the medium's fixed span."""
    from xoron_dist.model.common.perceiver import PerceiverResampler

    return PerceiverResampler(encoder.cfg.hidden_size, cfg.llm.hidden_size, getattr(cfg.data, row.span),
                              cfg.model.projector, cfg.llm.init_std)


def _video_projector(cfg: XoronConfig, row: Modality, encoder: nn.Module) -> nn.Module:
    """``own``: a Perceiver to the fixed span; ``tower``: the T·k tokens projected one by one (they fill the span)."""
    if encoder.cfg.frame_encoder == "own":
        return _perceiver(cfg, row, encoder)
    from xoron_dist.model.video import VideoTokenProjector

    return VideoTokenProjector(encoder.cfg.hidden_size, cfg.llm.hidden_size, cfg.llm.init_std)


def _frame_pool(cfg: XoronConfig, row: Modality, encoder: nn.Module) -> nn.Module:
    from xoron_dist.model.audio.encoder import FramePoolProjector

    return FramePoolProjector(encoder.hidden_size, cfg.llm.hidden_size, cfg.llm.init_std)


def _vision_plan(cfg: XoronConfig, encoder: nn.Module) -> TensorPlan:
    from xoron_dist.model.vision.sharding import tensor_plan

    return tensor_plan(encoder.cfg)


def _video_plan(cfg: XoronConfig, encoder: nn.Module) -> TensorPlan:
    from xoron_dist.model.video.sharding import tensor_plan

    return tensor_plan(encoder.cfg, cfg.parallel.tp_experts, factorised=encoder.cfg.frame_encoder == "tower")


def _audio_plan(cfg: XoronConfig, encoder: nn.Module) -> TensorPlan:
    from xoron_dist.model.audio.sharding import tensor_plan
    from xoron_dist.model.common.sharding import nest

    return nest("conformer", tensor_plan(encoder.cfg.conformer))


def _speech_plan(cfg: XoronConfig) -> TensorPlan:
    from xoron_dist.model.speech.sharding import tensor_plan

    return tensor_plan(cfg)


def _image_gen_plan(cfg: XoronConfig) -> TensorPlan:
    from xoron_dist.model.common.sharding import nest
    from xoron_dist.model.generation.sharding import tensor_plan

    return nest("dit", tensor_plan(cfg.model.image_gen.dit, cfg.parallel.tp_experts))


def _video_gen_plan(cfg: XoronConfig) -> TensorPlan:
    from xoron_dist.model.common.sharding import nest
    from xoron_dist.model.generation.video_sharding import tensor_plan

    return nest("dit", tensor_plan(cfg.model.video_gen.dit, cfg.parallel.tp_experts))


def _blank_image(encoder: nn.Module) -> torch.Tensor:
    """A black image_size² image."""
    import torch

    return torch.zeros(encoder.cfg.image_size, encoder.cfg.image_size, 3, dtype=torch.uint8)


def _blank_video(encoder: nn.Module) -> torch.Tensor:
    """One black min_resolution² frame."""
    import torch

    return torch.zeros(1, encoder.cfg.min_resolution, encoder.cfg.min_resolution, 3, dtype=torch.uint8)


def _blank_audio(encoder: nn.Module) -> torch.Tensor:
    """A tenth of a second of silence."""
    import torch

    return torch.zeros(encoder.cfg.sample_rate // 10, dtype=torch.int16)


MODALITIES: tuple[Modality, ...] = (
    Modality("image", "gen_image", "image_tokens", section="vision", heads="num_heads", encoder="vision",
             projector="image_projector", build=_build_vision, build_projector=_perceiver, tensor_plan=_vision_plan,
             blank=_blank_image, generator="image_gen", generator_section="image_gen", build_generator=_build_image_gen,
             objectives=("image_vae", "text_to_image"), generator_heads=("dit.num_heads",),
             generator_plan=_image_gen_plan),
    Modality("video", "gen_video", "video_tokens", section="video", heads="num_heads", encoder="video",
             projector="video_projector", build=_build_video, build_projector=_video_projector,
             tensor_plan=_video_plan, attach=_attach_video, blank=_blank_video, generator="video_gen",
             generator_section="video_gen", build_generator=_build_video_gen,
             objectives=("video_vae", "text_to_video"), generator_heads=("dit.num_heads",),
             generator_plan=_video_gen_plan),
    Modality("audio", "gen_speech", "audio_tokens_per_second", per_second=True, section="audio",
             heads="conformer.num_heads", encoder="audio", projector="audio_projector", build=_build_audio,
             build_projector=_frame_pool, tensor_plan=_audio_plan, blank=_blank_audio, generator="speech",
             generator_section="speech", build_generator=_build_speech, objectives=("codec", "tts"),
             generator_heads=("text_encoder.num_heads", "decoder.num_heads"), generator_plan=_speech_plan),
)
BY_NAME = {m.name: m for m in MODALITIES}


def understood(cfg: XoronConfig) -> list[Modality]:
    """The media ``cfg`` builds encoders for, in table order (the order they are encoded in)."""
    return [m for m in MODALITIES if m.understood(cfg)]


def generated(cfg: XoronConfig) -> list[Modality]:
    """The media ``cfg`` builds generators for, in table order."""
    return [m for m in MODALITIES if m.generated(cfg)]


__all__ = ["BY_NAME", "MODALITIES", "Modality", "generated", "per_second_tokens", "understood"]
