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
        if value is not None and value < 0:
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
    """SigLIP-2 style vision tower (full: so400m-patch14-384) and the TiTok 1D tokenizer (issue #7).

    ``rope``/``absolute_positions``: 2D-RoPE over patch (row, col) and/or SigLIP's learned
    position table (bicubically resized to each image's patch grid); the faithful SigLIP
    mode is ``rope: false, absolute_positions: true``. ``resize``: ``native`` keeps each
    image's aspect ratio at up to ``max_patches`` patches; ``square`` resizes to
    ``image_size``² like SigLIP. ``latent_tokens`` learned tokens ride along with the patches;
    ``dual_stream`` gives them their own weights (MMDiT-style joint attention, see
    ``xoron_dist.model.vision``). ``titok_*``: the TiTok tokenizer (``xoron_dist.model.titok``).
    """

    enabled: bool = False
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    rope: bool = True
    rope_theta: float = 10000.0
    absolute_positions: bool = True
    resize: Literal["native", "square"] = "native"
    max_patches: int = 729
    latent_tokens: int = 0
    dual_stream: bool = False
    titok_tokens: int = 256
    titok_image_size: int = 256
    titok_patch_size: int = 16
    titok_hidden_size: int = 768
    titok_layers: int = 12
    titok_heads: int = 12
    titok_intermediate_size: int = 3072
    titok_codebook_size: int = 4096
    titok_code_dim: int = 12
    titok_commitment: float = 0.25
    # dead-code restarts: a code whose moving-average share of the ids falls below
    # titok_dead_code_share / codebook size is re-seeded with a latent of the current batch (0 = off)
    titok_dead_code_share: float = 0.03
    titok_usage_decay: float = 0.9
    pretrained_path: str | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                  "patch_size", "layer_norm_eps", "init_std", "max_patches", "titok_tokens", "titok_image_size",
                  "titok_patch_size", "titok_hidden_size", "titok_layers", "titok_heads", "titok_intermediate_size",
                  "titok_codebook_size", "titok_code_dim")
        _non_negative(self, where, "latent_tokens", "titok_commitment", "titok_dead_code_share")
        if not 0.0 <= self.titok_usage_decay < 1.0:
            raise field_error(f"{where}.titok_usage_decay", self.titok_usage_decay, "must be in [0, 1)")
        for heads, hidden in (("num_heads", "hidden_size"), ("titok_heads", "titok_hidden_size")):
            if getattr(self, hidden) % getattr(self, heads):
                raise field_error(f"{where}.{heads}", getattr(self, heads),
                                  f"must divide {hidden} ({getattr(self, hidden)})")
        if self.patch_size > self.image_size:  # SigLIP's conv drops a remainder (384 = 27·14 + 6)
            raise field_error(f"{where}.patch_size", self.patch_size, f"must be <= image_size ({self.image_size})")
        if self.titok_image_size % self.titok_patch_size:
            raise field_error(f"{where}.titok_patch_size", self.titok_patch_size,
                              f"must divide titok_image_size ({self.titok_image_size})")
        if self.rope and self.hidden_size // self.num_heads < 4:
            raise field_error(f"{where}.num_heads", self.num_heads,
                              "2D-RoPE needs a head dim (hidden_size / num_heads) of at least 4")
        if self.rope and self.rope_theta <= 1:
            raise field_error(f"{where}.rope_theta", self.rope_theta, "must be > 1")
        if self.dual_stream and not self.latent_tokens:
            raise field_error(f"{where}.dual_stream", self.dual_stream,
                              "needs a second stream: set latent_tokens > 0 or dual_stream: false")


@dataclass
class VideoConfig:
    """Video encoder (``xoron_dist.model.video``): per-frame patches with 3D-RoPE over (t, y, x),
    attention causal in time and full within a frame, and temporal MoE feed-forwards whose
    router also sees each patch's motion (its difference from the same patch one frame back).

    Frames beyond ``max_frames`` are subsampled evenly; frames whose longer side lies outside
    [``min_resolution``, ``max_resolution``] are resized into it (aspect kept). Full size:
    ViT-B width (768, 12 layers, 12 heads), 16-pixel patches, 4 temporal experts (top-2).
    """

    enabled: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    min_frames: int = 8
    max_frames: int = 32
    min_resolution: int = 128
    max_resolution: int = 384
    temporal_experts: int = 4
    temporal_top_k: int = 2
    expert_intermediate_size: int = 1536
    shared_experts: int = 1
    motion_dim: int = 64
    rope_theta: float = 10000.0
    bias_update_rate: float = 1e-3

    def validate(self, where: str) -> None:
        _positive(self, where, "hidden_size", "num_layers", "num_heads", "patch_size", "min_frames", "max_frames",
                  "min_resolution", "max_resolution", "temporal_experts", "temporal_top_k",
                  "expert_intermediate_size", "motion_dim", "rope_theta")
        _non_negative(self, where, "shared_experts", "bias_update_rate")
        _ordered(self, where, "min_frames", "max_frames")
        _ordered(self, where, "min_resolution", "max_resolution")
        _ordered(self, where, "temporal_top_k", "temporal_experts")
        if self.hidden_size % self.num_heads:
            raise field_error(f"{where}.num_heads", self.num_heads, f"must divide hidden_size ({self.hidden_size})")
        if self.hidden_size // self.num_heads < 6:
            raise field_error(f"{where}.num_heads", self.num_heads,
                              f"3D-RoPE needs a head dim (hidden_size / num_heads = "
                              f"{self.hidden_size // self.num_heads}) of at least 6: one rotated pair per axis")
        if self.patch_size > self.min_resolution:
            raise field_error(f"{where}.patch_size", self.patch_size,
                              f"must be <= min_resolution ({self.min_resolution})")


@dataclass
class ProjectorConfig:
    """Perceiver resampler (Flamingo, Alayrac et al. 2022, §2.1): learned latents cross-attend to an
    encoder's features (and to themselves) for ``num_layers`` layers; one resampler per modality
    emits exactly ``data.image_tokens`` / ``data.video_tokens`` tokens in the LLM's width."""

    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 4096

    def validate(self, where: str) -> None:
        _positive(self, where, "num_layers", "num_heads", "intermediate_size")


@dataclass
class FusionConfig:
    """Gated cross-attention layers (Flamingo's GATED XATTN-DENSE, tanh gates starting at 0 so the
    model starts as the text-only LLM): ``layers[i]`` is the decoder layer fusion layer i runs before
    (several may share one index; they run in list order)."""

    layers: list[int] = field(default_factory=lambda: [0, 3, 6, 9])
    num_heads: int = 8
    intermediate_size: int = 4096

    def validate(self, where: str) -> None:
        _positive(self, where, "num_heads", "intermediate_size")
        for i, index in enumerate(self.layers):
            if index < 0:
                raise field_error(f"{where}.layers[{i}]", index, "a decoder layer index >= 0")
        if self.layers != sorted(self.layers):
            raise field_error(f"{where}.layers", self.layers, "must be in increasing order")


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
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def validate(self, where: str) -> None:
        if not (self.vision.enabled or self.video.enabled):
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
    # ep > 1: None = dropless dispatch (uneven all-to-all); a factor c caps every expert at
    # ceil(c * tokens * top_k / num_experts) rows per rank (fixed shapes; overflow choices dropped).
    expert_capacity_factor: float | None = None

    def validate(self, where: str) -> None:
        _positive(self, where, "tp", "pp", "sp", "ep")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            raise field_error(f"{where}.expert_capacity_factor", self.expert_capacity_factor,
                              "must be > 0 (or null for dropless expert dispatch)")
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
    # > 0: the LM head and loss run on chunks of this many tokens, recomputed in backward, so the
    # whole (tokens x vocabulary) logits never exist at once (long sequences); 0 = in one piece
    loss_chunk_tokens: int = 0
    dist_timeout_minutes: int = 30

    def validate(self, where: str) -> None:
        _positive(self, where, "steps", "micro_batch_size", "grad_accum_steps", "seq_len", "lr", "eps",
                  "log_every", "save_every", "keep_checkpoints", "dist_timeout_minutes")
        _non_negative(self, where, "warmup_steps", "weight_decay", "grad_clip", "loss_chunk_tokens")
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
    expert_bias_update_rate: float | None = None  # gamma of this stage; None: model.llm.moe.bias_update_rate

    def validate(self, where: str) -> None:
        _positive(self, where, "steps", "seq_len", "lr")
        _non_negative(self, where, "expert_bias_update_rate")
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
    "FusionConfig",
    "GeneratorConfig",
    "LLMConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrepConfig",
    "ProjectorConfig",
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
