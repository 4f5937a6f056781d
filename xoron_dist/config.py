"""The one config tree of a Xoron run: model / parallel / train / data / tokenizer / stages.

``XoronConfig()`` is the full-size model of the seed (12 layers, hidden 1024, 16
heads, 8 routed + 1 shared experts, top-2, 128K positions, vocabulary 151,643).
Named presets are YAML files in ``xoron_dist/presets/`` (``tiny`` for tests and
the smoke run); a run file may start from one with ``preset: tiny``.

    cfg = load_config("pipelines/smoke.yaml", ["train.lr=1e-3", "parallel.zero_stage=2"])

Every field is checked where it is defined (``validate``); a wrong value, type
or unknown key raises ``ConfigError`` naming the dotted field, the value and
what is allowed. Checks that need the world size (divisibility of heads by TP
and so on) live in ``xoron_dist.parallel.layout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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

PRESET_DIR = Path(__file__).parent / "presets"


def _positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise field_error(f"{where}.{name}" if where else name, value, "must be > 0")


def _ordered(obj: Any, where: str, low: str, high: str) -> None:
    if getattr(obj, low) > getattr(obj, high):
        raise field_error(f"{where}.{low}", getattr(obj, low), f"must be <= {high} ({getattr(obj, high)})")


def _non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise field_error(f"{where}.{name}" if where else name, value, "must be >= 0")


# --------------------------------------------------------------------------- model


@dataclass
class RopeConfig:
    """Rotary embedding of MLA's decoupled rope dims, with long-context scaling.

    ``yarn``: YaRN (Peng et al. 2023, arXiv:2309.00071) as DeepSeek-V2/V3 use it:
    frequencies interpolated by ``factor`` outside the [beta_slow, beta_fast]
    rotation band, and the softmax scale multiplied by mscale(factor, mscale_all_dim)^2.
    ``longrope``: LongRoPE (Ding et al. 2024, arXiv:2402.13753): per-frequency
    rescale factors, ``short_factor`` up to ``original_max_positions`` and
    ``long_factor`` beyond. ``default``: plain RoPE.
    """

    type: Literal["default", "yarn", "longrope"] = "yarn"
    theta: float = 10000.0
    factor: float = 32.0
    original_max_positions: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    long_factor: list[float] | None = None
    short_factor: list[float] | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "theta", "factor", "original_max_positions", "beta_fast", "beta_slow")
        if self.type != "default" and self.factor < 1.0:
            raise field_error(f"{where}.factor", self.factor, "a context-extension factor must be >= 1")
        if self.type == "longrope" and (self.long_factor is None or self.short_factor is None):
            raise field_error(
                f"{where}.long_factor", self.long_factor,
                "rope.type=longrope needs both long_factor and short_factor (one value per rope frequency)",
            )


@dataclass
class MoEConfig:
    """DeepSeek-V3 MoE: sigmoid router, top-k of the routed experts, shared experts on every token.

    Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): a per-expert bias is added
    to the scores for top-k *selection only*; after each optimizer step it moves
    by ``bias_update_rate`` (gamma) towards the mean load.
    """

    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_intermediate_size: int = 1408
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_update: bool = True
    bias_update_rate: float = 1e-3
    starved_expert_warn_steps: int = 50

    def validate(self, where: str) -> None:
        _positive(self, where, "num_experts", "top_k", "expert_intermediate_size", "routed_scaling_factor",
                  "starved_expert_warn_steps")
        _non_negative(self, where, "num_shared_experts", "bias_update_rate")
        _ordered(self, where, "top_k", "num_experts")


@dataclass
class LLMConfig:
    """The DeepSeek-V3-family decoder at Xoron's core (MLA + MoE + RMSNorm + SwiGLU)."""

    vocab_size: int = 151_643
    special_token_slots: int = 256
    pad_vocab_multiple: int = 128
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 16
    q_lora_rank: int | None = 512
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    max_position_embeddings: int = 131_072
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    dense_layers: int = 0
    dense_intermediate_size: int = 2816
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding/LM head: regular tokens + reserved special slots, rounded up.

        For the full preset this is 151,936, the embedding size of Qwen2.5 models.
        """
        return self.vocab_rows(tp=1)

    @property
    def usable_vocab_size(self) -> int:
        """Ids a tokenizer may use; rows beyond are padding that is never predicted."""
        return self.vocab_size + self.special_token_slots

    def vocab_rows(self, tp: int) -> int:
        """Embedding rows when the vocabulary is split over ``tp`` ranks: a multiple of
        ``pad_vocab_multiple * tp`` (Megatron's rule), so every rank holds the same number."""
        multiple = self.pad_vocab_multiple * tp
        return int(math.ceil(self.usable_vocab_size / multiple) * multiple)

    def validate(self, where: str) -> None:
        _positive(self, where, "vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "max_position_embeddings", "dense_intermediate_size", "rms_norm_eps", "init_std")
        _non_negative(self, where, "special_token_slots", "dense_layers", "attention_dropout")
        if self.qk_rope_head_dim % 2:
            raise field_error(f"{where}.qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary pairs)")
        if self.dense_layers > self.num_layers:
            raise field_error(f"{where}.dense_layers", self.dense_layers,
                              f"must be <= num_layers ({self.num_layers})")
        if self.rope.type != "default" and self.rope.original_max_positions > self.max_position_embeddings:
            raise field_error(f"{where}.rope.original_max_positions", self.rope.original_max_positions,
                              f"must be <= max_position_embeddings ({self.max_position_embeddings})")
        for name in ("long_factor", "short_factor"):
            factors = getattr(self.rope, name)
            if factors is not None and len(factors) != self.qk_rope_head_dim // 2:
                raise field_error(f"{where}.rope.{name}", f"<{len(factors)} values>",
                                  f"needs qk_rope_head_dim/2 = {self.qk_rope_head_dim // 2} values")


@dataclass
class VisionConfig:
    """SigLIP-2 style vision tower (full: so400m-patch14-384). Built by the vision issue (#7)."""

    enabled: bool = False
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    image_size: int = 384
    patch_size: int = 14
    titok_tokens: int = 256
    pretrained_path: str | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                  "patch_size", "titok_tokens")
        if self.hidden_size % self.num_heads:
            raise field_error(f"{where}.num_heads", self.num_heads,
                              f"must divide hidden_size ({self.hidden_size})")


@dataclass
class VideoConfig:
    """Video encoder (3D-RoPE, temporal MoE, causal-in-time attention). Built by issue #7."""

    enabled: bool = False
    min_frames: int = 8
    max_frames: int = 32
    min_resolution: int = 128
    max_resolution: int = 384
    temporal_experts: int = 4

    def validate(self, where: str) -> None:
        _positive(self, where, "min_frames", "max_frames", "min_resolution", "max_resolution", "temporal_experts")
        _ordered(self, where, "min_frames", "max_frames")
        _ordered(self, where, "min_resolution", "max_resolution")


@dataclass
class AudioConfig:
    """Raw-waveform tokenizer + Conformer/RMLA encoder, BigVGAN decoder. Built by the audio issue."""

    enabled: bool = False
    sample_rate: int = 16_000
    hidden_size: int = 512
    num_layers: int = 12

    def validate(self, where: str) -> None:
        _positive(self, where, "sample_rate", "hidden_size", "num_layers")


@dataclass
class GeneratorConfig:
    """Image (MoE-DiT, rectified flow) or video (3D causal, flow) generator head. Built by later issues."""

    enabled: bool = False
    num_experts: int = 4
    min_resolution: int = 256
    max_resolution: int = 512

    def validate(self, where: str) -> None:
        _positive(self, where, "num_experts", "min_resolution", "max_resolution")
        _ordered(self, where, "min_resolution", "max_resolution")


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    image_gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    video_gen: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(min_resolution=128, max_resolution=384))


# --------------------------------------------------------------------------- run


@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions; data parallelism takes what the world size leaves.

    world = dp * tp * pp * sp ; experts are spread over ``ep`` ranks carved out of dp*sp.
    """

    tp: int = 1
    pp: int = 1
    sp: int = 1
    ep: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    tp_experts: bool = True  # split routed experts on their FFN dim over TP; False: whole experts per rank
    ring_latent: bool = True  # ring attention passes MLA's latent + rope key instead of full K/V

    def validate(self, where: str) -> None:
        _positive(self, where, "tp", "pp", "sp", "ep")
        if self.zero_stage not in (0, 1, 2, 3):
            raise field_error(f"{where}.zero_stage", self.zero_stage, "allowed values are 0, 1, 2, 3")
        if self.sequence_parallel and self.tp == 1:
            raise field_error(f"{where}.sequence_parallel", True,
                              "Megatron sequence parallelism splits the TP group's work; it needs tp > 1")


@dataclass
class TrainConfig:
    name: str = "xoron"
    output_dir: str = "runs"
    steps: int = 1000
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    seq_len: int = 4096
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = "auto"
    ds_config: str = "ds_configs/zero1.json"
    seed: int = 1234
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    activation_checkpointing: bool = False
    dist_timeout_minutes: int = 30

    def validate(self, where: str) -> None:
        _positive(self, where, "steps", "micro_batch_size", "grad_accum_steps", "seq_len", "lr", "eps",
                  "log_every", "save_every", "keep_checkpoints", "dist_timeout_minutes")
        _non_negative(self, where, "warmup_steps", "weight_decay", "grad_clip")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise field_error(f"{where}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise field_error(f"{where}.{name}", getattr(self, name), "must be in [0, 1)")
        if not self.name or "/" in self.name:
            raise field_error(f"{where}.name", self.name, "a non-empty run name without '/'")


ResizePolicy = Literal["crop", "pad", "squash", "max_side"]


@dataclass
class PrepConfig:
    """How ``xoron prep`` turns raw media into training-ready arrays (recorded in the manifest).

    Resize policies: ``crop`` (shorter side to size, centre crop: square), ``pad`` (longer side
    to size, pad to square), ``squash`` (to size x size, aspect ignored), ``max_side`` (longer
    side to size, aspect kept, both sides rounded down to multiples of ``patch_multiple``; for
    native-resolution encoders).
    """

    image_size: int = 384
    image_resize: ResizePolicy = "crop"
    video_frames: int = 16
    video_size: int = 256
    video_resize: ResizePolicy = "crop"
    patch_multiple: int = 14
    audio_sample_rate: int = 16_000
    max_audio_seconds: float = 30.0
    max_text_tokens: int = 8192
    shard_bytes: int = 256 * 1024 * 1024
    samples_per_unit: int = 256

    def validate(self, where: str) -> None:
        _positive(self, where, "image_size", "video_frames", "video_size", "patch_multiple", "audio_sample_rate",
                  "max_audio_seconds", "max_text_tokens", "shard_bytes", "samples_per_unit")


@dataclass
class SynthConfig:
    """What ``xoron synth`` generates: samples per kind, and the media sizes (seeded, deterministic)."""

    seed: int = 0
    text: int = 2000
    image_caption: int = 400
    video_caption: int = 60
    audio_transcript: int = 200
    text_to_image: int = 200
    text_to_video: int = 40
    text_to_speech: int = 100
    min_image_size: int = 128
    max_image_size: int = 512
    min_video_frames: int = 8
    max_video_frames: int = 32
    video_size: int = 128
    audio_sample_rate: int = 22_050

    def validate(self, where: str) -> None:
        _non_negative(self, where, "text", "image_caption", "video_caption", "audio_transcript", "text_to_image",
                      "text_to_video", "text_to_speech")
        _positive(self, where, "min_image_size", "max_image_size", "min_video_frames", "max_video_frames",
                  "video_size", "audio_sample_rate")
        _ordered(self, where, "min_image_size", "max_image_size")
        _ordered(self, where, "min_video_frames", "max_video_frames")


@dataclass
class DataConfig:
    """Where batches come from.

    ``synthetic_text``: the built-in deterministic text generator (no files).
    ``arrow``: prepared shards in ``path`` (``xoron prep``). With ``synth`` set, a missing
    ``path`` is first filled by ``xoron synth`` + ``xoron prep`` (rank 0; cached by content).
    ``mix``: dataset (kind) -> blend weight; empty = every dataset in proportion to its rows.
    ``image_tokens``/``video_tokens``/``audio_tokens_per_second``: length of the placeholder
    span each medium occupies in the token stream (what the encoder + projector emit).
    """

    source: Literal["synthetic_text", "arrow"] = "synthetic_text"
    num_documents: int = 4096
    seed: int = 0
    path: str | None = None
    mix: dict[str, float] = field(default_factory=dict)
    num_workers: int = 1
    verify_checksums: bool = True
    image_tokens: int = 64
    video_tokens: int = 64
    audio_tokens_per_second: float = 12.5
    prep: PrepConfig = field(default_factory=PrepConfig)
    synth: SynthConfig | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "num_documents", "image_tokens", "video_tokens", "audio_tokens_per_second")
        _non_negative(self, where, "num_workers")
        if self.source == "arrow" and not self.path:
            raise field_error(f"{where}.path", self.path, "data.source=arrow needs the prepared dataset folder")
        for key, weight in self.mix.items():
            if weight < 0:
                raise field_error(f"{where}.mix.{key}", weight, "blend weights must be >= 0")


@dataclass
class TokenizerConfig:
    """``path``: a local Qwen2.5 tokenizer directory. Without one, a byte-level BPE is trained on
    ``train_text`` (default: the text shipped with the package) and saved with the run."""

    path: str | None = None
    train_text: str | None = None

    def validate(self, where: str) -> None:
        for name in ("path", "train_text"):
            value = getattr(self, name)
            if value is not None and not value:
                raise field_error(f"{where}.{name}", value, "a path, or null")


@dataclass
class StageConfig:
    """One curriculum stage; unset fields inherit from ``train``. Stages run in order, each
    resuming from the checkpoint of the one before."""

    name: str = "stage"
    steps: int = 100
    seq_len: int | None = None
    lr: float | None = None
    mix: dict[str, float] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    expert_bias_update: bool | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "steps", "seq_len", "lr")
        for key, weight in self.mix.items():
            if weight < 0:
                raise field_error(f"{where}.mix.{key}", weight, "blend weights must be >= 0")


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
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> XoronConfig:
    """Read a run YAML (optionally starting from ``preset: NAME``) and apply ``a.b=c`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        data = _read_yaml(path)
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


__all__ = [
    "AudioConfig",
    "ConfigError",
    "DataConfig",
    "GeneratorConfig",
    "LLMConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrepConfig",
    "RopeConfig",
    "StageConfig",
    "SynthConfig",
    "TokenizerConfig",
    "TrainConfig",
    "VideoConfig",
    "VisionConfig",
    "XoronConfig",
    "available_presets",
    "load_config",
    "preset_dict",
]
