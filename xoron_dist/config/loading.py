"""The root of the config tree (``XoronConfig``; ``ModelConfig``, its ``model``), presets, reading a run file.

    cfg = load_config("pipelines/smoke.yaml", ["train.lr=1e-3", "parallel.zero_stage=2"])

``XoronConfig()`` is the full-size model of the seed. Named presets are YAML files in
``xoron_dist/presets/`` (``tiny`` for tests and the smoke run); a run file may start from one
with ``preset: tiny``; ``a.b=c`` overrides apply last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xoron_dist.config.generators import ImageGenConfig, VideoGenConfig
from xoron_dist.config.lora import LoRAConfig
from xoron_dist.config.model import (
    AudioConfig,
    FusionConfig,
    LLMConfig,
    ProjectorConfig,
    VideoConfig,
    VisionConfig,
)
from xoron_dist.config.run import DataConfig, ParallelConfig, StageConfig, TokenizerConfig, TrainConfig
from xoron_dist.config.speech import SpeechConfig
from xoron_dist.utils.typed_config import (
    ConfigError,
    apply_override,
    deep_merge,
    field_error,
    from_dict,
    parse_override,
    to_dict,
    validate_tree,
)

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class ModelConfig:
    """``model``: the LLM, the understanding encoders with their projector and fusion layers, and the
    generators (``speech``: needs ``audio``, whose tokenizer is the codec's encoder; ``image_gen``,
    ``video_gen``); ``lora``: low-rank adapters on the built model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    image_gen: ImageGenConfig = field(default_factory=ImageGenConfig)
    video_gen: VideoGenConfig = field(default_factory=VideoGenConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (model/lora.py), off by default

    def validate(self, where: str) -> None:
        for name in ("image_gen", "video_gen"):
            section = getattr(self, name)
            if section.enabled and section.dit.cond_dim != self.llm.hidden_size:
                raise field_error(f"{where}.{name}.dit.cond_dim", section.dit.cond_dim,
                                  f"must equal llm.hidden_size ({self.llm.hidden_size}): the generator reads the "
                                  "LLM's hidden states")
        if self.speech.enabled and not self.audio.enabled:
            raise field_error(f"{where}.speech.enabled", True,
                              "speech generation decodes the audio codec's latents: set model.audio.enabled: true")
        if self.speech.enabled and self.speech.vocoder.segment_samples % self.audio.hop:
            raise field_error(f"{where}.speech.vocoder.segment_samples", self.speech.vocoder.segment_samples,
                              f"must be a multiple of the codec's hop ({self.audio.hop} samples, "
                              "model.audio.codec_strides multiplied)")
        if not (self.vision.enabled or self.video.enabled or self.audio.enabled):
            return  # projector and fusion exist only beside an enabled encoder
        hidden = self.llm.hidden_size
        for name in ("projector", "fusion"):
            heads = getattr(self, name).num_heads
            if hidden % heads:
                raise field_error(f"{where}.{name}.num_heads", heads, f"must divide llm.hidden_size ({hidden})")
        for i, index in enumerate(self.fusion.layers):
            if index >= self.llm.num_layers:
                raise field_error(f"{where}.fusion.layers[{i}]", index,
                                  f"must be < llm.num_layers ({self.llm.num_layers})")


@dataclass
class XoronConfig:
    """A whole Xoron run. ``XoronConfig()`` is the full-size model with default training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_tree(self)

    def validate(self, where: str) -> None:
        """Checks across sections (each section checked itself first: ``validate_tree`` goes children first)."""
        self._check_multiscale(f"{where}.data.multiscale" if where else "data.multiscale")

    def _check_multiscale(self, where: str) -> None:
        """The loader's scale buckets must fit the encoders that read them: scales on their patch grid,
        frame counts within the video encoder's range (``model.video.min_frames``..``max_frames``)."""
        ms, vision, video = self.data.multiscale, self.model.vision, self.model.video
        if ms is None:
            return
        if vision.enabled and ms.image_patch != vision.patch_size:
            raise field_error(f"{where}.image_patch", ms.image_patch,
                              f"must equal model.vision.patch_size ({vision.patch_size}): image scales are "
                              "multiples of the tower's patch")
        if video.enabled and video.frame_encoder == "own" and ms.video_patch != video.patch_size:
            raise field_error(f"{where}.video_patch", ms.video_patch,
                              f"must equal model.video.patch_size ({video.patch_size}): video scales are "
                              "multiples of the encoder's patch")
        if video.enabled:
            bad = [f for f in ms.video_frames if not video.min_frames <= f <= video.max_frames]
            if bad:
                raise field_error(f"{where}.video_frames", ms.video_frames,
                                  f"{bad} outside model.video.min_frames..max_frames ({video.min_frames}.."
                                  f"{video.max_frames}); use frame counts the video encoder accepts")

    @property
    def llm(self) -> LLMConfig:
        return self.model.llm

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XoronConfig:
        return from_dict(cls, data)

    @classmethod
    def preset(cls, name: str) -> XoronConfig:
        return cls.from_dict(preset_dict(name))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    if name == "full":
        return {}
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: full, {', '.join(available_presets())}")
    return read_yaml_mapping(path)


def read_yaml_mapping(path: Path, what: str = "config file", owner: str = "the run's",
                      example: str = "'preset: tiny'", keys: str = "train: ..., model: ...") -> dict[str, Any]:
    """The top-level mapping of a YAML file. Every way a user's file can be wrong (missing, a folder,
    unreadable, not UTF-8, not YAML, empty, not a mapping) is one ``ConfigError`` line naming the
    file (as ``what``) and the fix, never a traceback. ``owner``, ``example``, ``keys``: whose settings
    the file holds, one to suggest for an empty file, the top-level keys it should have."""
    path = Path(path)
    where = f"{what} '{path}'"
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"{where} is a folder; give the YAML file itself{hint}")
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); re-save it as UTF-8 "
            "(an editor's encoding setting, or: iconv -f latin1 -t utf-8)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(err)}; fix it there") from None
    if data is None:
        raise ConfigError(f"{where} is empty (no settings in it); write {owner} settings, e.g. {example}")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping ({keys}), "
                          f"got {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where, then what (its own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is not None and problem:
        context = getattr(err, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {f'{context}: ' if context else ''}{problem}"
    return " ".join(str(err).replace('in "<unicode string>",', "at").split())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> XoronConfig:
    """Read a run YAML (optionally starting from ``preset: NAME``) and apply ``a.b=c`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(Path(path))
    parsed = [parse_override(text) for text in overrides]
    preset = data.pop("preset", None)
    for keys, value in parsed:
        if keys == ["preset"]:
            preset = value
    if preset is not None:
        if not isinstance(preset, str):
            raise field_error("preset", preset, f"a preset name: full, {', '.join(available_presets())}")
        data = deep_merge(preset_dict(preset), data)
    for keys, value in parsed:
        if keys != ["preset"]:
            apply_override(data, keys, value)
    return XoronConfig.from_dict(data)
