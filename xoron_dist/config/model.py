"""The model half of the config tree: the LLM, the encoders, the projector and the fusion layers.

Each section validates its own fields (``validate(where)``); checks that need the world size live
in ``xoron_dist.parallel.layout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from xoron_dist.config.checks import non_negative, ordered, positive
from xoron_dist.utils.typed_config import field_error


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
    theta: float = 500_000.0
    factor: float = 16.0
    original_max_positions: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    long_factor: list[float] | None = None
    short_factor: list[float] | None = None

    def validate(self, where: str) -> None:
        positive(self, where, "theta", "factor", "original_max_positions", "beta_fast", "beta_slow")
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

    Router choices: ``router_score`` ``sigmoid`` (DeepSeek-V3, the default) or ``softmax`` (the
    seed's router: softmax over the experts); ``router_norm`` puts an RMSNorm on the router's input
    before the gate (the seed's ``input_norm``). The bias rule is the same for both scores.
    """

    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_update: bool = True
    bias_update_rate: float = 1e-3
    starved_expert_warn_steps: int = 50
    router_score: Literal["sigmoid", "softmax"] = "sigmoid"
    router_norm: bool = False

    def validate(self, where: str) -> None:
        positive(self, where, "num_experts", "top_k", "expert_intermediate_size", "routed_scaling_factor",
                  "starved_expert_warn_steps")
        non_negative(self, where, "num_shared_experts", "bias_update_rate")
        ordered(self, where, "top_k", "num_experts")


@dataclass
class LLMConfig:
    """The DeepSeek-V3-family decoder at Xoron's core (MLA + MoE + RMSNorm + SwiGLU).

    Defaults follow the seed's LLM page (``docs/models/llm.md``): 12 layers of width 1024, 16 heads,
    MoE on every second layer (layers 1, 3, ..., 11; dense SwiGLU on the others), expert and dense
    FFN width 2048, MLA with ``kv_lora_rank`` 512 and no low-rank query, LM head tied to the
    embeddings, RoPE base 500,000 with YaRN from 8,192 original positions to 131,072.

    Which layers are MoE: layer i is MoE when ``i >= dense_layers`` (DeepSeek's
    ``first_k_dense_replace``) and ``(i + 1) % moe_layer_freq == 0`` (every layer with 1, every
    second one, 1, 3, 5, ..., with 2); the others are dense SwiGLU layers.
    """

    vocab_size: int = 151_643
    special_token_slots: int = 256
    pad_vocab_multiple: int = 128
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    max_position_embeddings: int = 131_072
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    dense_layers: int = 0
    moe_layer_freq: int = 2
    dense_intermediate_size: int = 2048
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_word_embeddings: bool = True
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

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` (0-based) has the MoE feed-forward (see the class docstring)."""
        return index >= self.dense_layers and (index + 1) % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers, in order."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def vocab_rows(self, tp: int) -> int:
        """Embedding rows when the vocabulary is split over ``tp`` ranks: a multiple of
        ``pad_vocab_multiple * tp`` (Megatron's rule), so every rank holds the same number."""
        multiple = self.pad_vocab_multiple * tp
        return int(math.ceil(self.usable_vocab_size / multiple) * multiple)

    def validate(self, where: str) -> None:
        positive(self, where, "vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "max_position_embeddings", "dense_intermediate_size", "rms_norm_eps", "init_std",
                  "moe_layer_freq")
        non_negative(self, where, "special_token_slots", "dense_layers", "attention_dropout")
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
    ``xoron_dist.model.vision.tower``). ``titok_*``: the TiTok tokenizer (``xoron_dist.model.vision.titok``).

    The seed's understanding path after the tower (``xoron_dist.model.vision.compressor``), each part
    off at 0 (then the tower's patch features go to the projector as before): ``dual_stream_layers``
    symmetric two-stream blocks over the patch grid (seed: 2); ``compressor_tokens`` learned latent
    queries that compress the patches into that many 1D tokens through ``compressor_layers`` blocks
    (TiTok's encoder; seed: 256); ``reconstruction_weight`` TiTok's decoder + VQ reconstructing the
    image (at ``titok_image_size``) from those tokens, an auxiliary loss of this weight.
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
    dual_stream_layers: int = 0
    compressor_tokens: int = 0
    compressor_layers: int = 2
    reconstruction_weight: float = 0.0
    pretrained_path: str | None = None

    def validate(self, where: str) -> None:
        positive(self, where, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                  "patch_size", "layer_norm_eps", "init_std", "max_patches", "titok_tokens", "titok_image_size",
                  "titok_patch_size", "titok_hidden_size", "titok_layers", "titok_heads", "titok_intermediate_size",
                  "titok_codebook_size", "titok_code_dim")
        non_negative(self, where, "latent_tokens", "titok_commitment", "titok_dead_code_share", "dual_stream_layers",
                     "compressor_tokens", "reconstruction_weight")
        positive(self, where, "compressor_layers")
        if self.reconstruction_weight and not self.compressor_tokens:
            raise field_error(f"{where}.reconstruction_weight", self.reconstruction_weight,
                              "reconstructs the image from the compressor's tokens: set compressor_tokens > 0 "
                              "or reconstruction_weight: 0")
        if (self.dual_stream_layers or self.compressor_tokens) and self.hidden_size // self.num_heads < 4:
            raise field_error(f"{where}.num_heads", self.num_heads, "the dual-stream and compressor blocks use "
                              "2D-RoPE, which needs a head dim (hidden_size / num_heads) of at least 4")
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

    ``frame_encoder`` picks how frames become tokens: ``own`` (the encoder above: its own patch
    embedding, full block-causal attention over every T·h·w token, one Perceiver span per clip) or
    ``tower`` (the seed's: every frame through the model's vision tower, shared weights, then
    ``num_layers`` factorised layers (spatial attention within a frame, causal temporal attention
    per patch position, the temporal MoE) and ``tokens_per_frame`` tokens per frame; a clip is
    resampled to ``data.video_tokens / tokens_per_frame`` frames, so its span is T x k). In tower
    mode the frame size is the tower's (``vision.resize`` / ``max_patches``) and ``patch_size`` /
    ``min_resolution`` / ``max_resolution`` only size the blank video.
    """

    enabled: bool = False
    frame_encoder: Literal["own", "tower"] = "own"
    tokens_per_frame: int = 64  # tower mode: k tokens per frame (the seed's 64)
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
        positive(self, where, "hidden_size", "num_layers", "num_heads", "patch_size", "min_frames", "max_frames",
                  "min_resolution", "max_resolution", "temporal_experts", "temporal_top_k",
                  "expert_intermediate_size", "motion_dim", "rope_theta", "tokens_per_frame")
        non_negative(self, where, "shared_experts", "bias_update_rate")
        ordered(self, where, "min_frames", "max_frames")
        ordered(self, where, "min_resolution", "max_resolution")
        ordered(self, where, "temporal_top_k", "temporal_experts")
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
class ConformerConfig:
    """A Conformer encoder (``xoron_dist.model.audio.conformer``): macaron FFNs, RMLA or rotary MHA, a
    depthwise-conv module. Defaults: 6 blocks (the seed) of Conformer-L width (512); RMLA caches
    kv_lora_rank + qk_rope_head_dim = 160 numbers per frame and layer, where rotary MHA of the same
    heads would cache 2·8·64 = 1024. The input width is the caller's (the codec's latents, ...)."""

    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    conv_kernel: int = 31  # depthwise kernel (odd: "same" padding), torchaudio's default
    attention: Literal["rmla", "mha_rope"] = "rmla"
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32  # per-head q/k dims without position (RMLA: from the latent)
    qk_rope_head_dim: int = 32  # per-head rotated q/k dims (RMLA: the shared rope key's width)
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_on: Literal["qk", "input"] = "qk"  # mha_rope only: "input" = wav2vec2-conformer's placement
    conv_norm: Literal["layer", "batch"] = "layer"
    bias: bool = True  # biases of the FFNs and the q/k/v/out projections (RMLA's latent path has none)
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on every residual branch and inside the FFNs
    init_std: float = 0.02

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, where: str) -> None:
        positive(self, where, "hidden_size", "num_layers", "num_heads", "ffn_dim", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "rope_theta", "norm_eps", "init_std")
        non_negative(self, where, "qk_nope_head_dim")
        if self.qk_rope_head_dim % 2:
            raise field_error(f"{where}.qk_rope_head_dim", self.qk_rope_head_dim,
                              "RoPE rotates pairs of dims; use an even width")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise field_error(f"{where}.conv_kernel", self.conv_kernel,
                              "the depthwise conv pads (k - 1) / 2 frames on each side; use an odd kernel")
        if self.rope_on == "input" and self.attention != "mha_rope":
            raise field_error(f"{where}.rope_on", self.rope_on,
                              "'input' placement exists for the HF wav2vec2-conformer oracle; use attention: mha_rope")
        if self.rope_on == "input" and self.hidden_size % self.qk_rope_head_dim:
            raise field_error(f"{where}.rope_on", self.rope_on,
                              f"'input' rotates the input in blocks of qk_rope_head_dim = {self.qk_rope_head_dim}, "
                              f"which must divide hidden_size = {self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise field_error(f"{where}.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class AudioConfig:
    """Audio understanding: the raw-waveform tokenizer (``xoron_dist.model.audio.codec``: a SEANet-style
    strided-conv encoder, ``codec_strides`` multiplying to the samples per latent frame, and a residual
    vector quantiser) and the Conformer with RMLA over its frames (``conformer``). Default strides
    (2, 4, 5, 8): 320 samples, 50 frames per second at 16 kHz (the seed's 64x tokenizer gives 250
    frames/s, 25x the attention cost on a 10 s clip). The codec's decoder is ``model.speech``'s BigVGAN."""

    enabled: bool = False
    sample_rate: int = 16_000
    codec_channels: int = 32
    codec_strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])
    latent_dim: int = 128
    rvq_quantizers: int = 8
    rvq_codebook_size: int = 1024
    rvq_code_dim: int = 8
    rvq_commitment: float = 0.25
    rvq_dead_code_share: float = 0.03
    rvq_usage_decay: float = 0.9
    # what the Conformer (understanding) reads: the residual VQ's quantised latents ("codes") or the
    # tokenizer's continuous latents ("latents"; the discrete tokens stay the generation target)
    understand_from: Literal["codes", "latents"] = "codes"
    conformer: ConformerConfig = field(default_factory=ConformerConfig)

    @property
    def hop(self) -> int:
        """Samples per latent frame."""
        return math.prod(self.codec_strides)

    def validate(self, where: str) -> None:
        positive(self, where, "sample_rate", "codec_channels", "latent_dim", "rvq_quantizers", "rvq_codebook_size",
                 "rvq_code_dim")
        non_negative(self, where, "rvq_commitment", "rvq_dead_code_share")
        if not self.codec_strides or any(s < 1 for s in self.codec_strides):
            raise field_error(f"{where}.codec_strides", self.codec_strides, "a list of strides >= 1")
        if not 0.0 <= self.rvq_usage_decay < 1.0:
            raise field_error(f"{where}.rvq_usage_decay", self.rvq_usage_decay, "must be in [0, 1)")


@dataclass
class ProjectorConfig:
    """Perceiver resampler (Flamingo, Alayrac et al. 2022, §2.1): learned latents cross-attend to an
    encoder's features (and to themselves) for ``num_layers`` layers; one resampler per modality
    emits exactly ``data.image_tokens`` / ``data.video_tokens`` tokens in the LLM's width."""

    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 4096

    def validate(self, where: str) -> None:
        positive(self, where, "num_layers", "num_heads", "intermediate_size")


@dataclass
class FusionConfig:
    """Gated cross-attention layers (Flamingo's GATED XATTN-DENSE, tanh gates starting at 0 so the
    model starts as the text-only LLM): ``layers[i]`` is the decoder layer fusion layer i runs before
    (several may share one index; they run in list order)."""

    layers: list[int] = field(default_factory=lambda: [0, 3, 6, 9])
    num_heads: int = 8
    intermediate_size: int = 4096

    def validate(self, where: str) -> None:
        positive(self, where, "num_heads", "intermediate_size")
        for i, index in enumerate(self.layers):
            if index < 0:
                raise field_error(f"{where}.layers[{i}]", index, "a decoder layer index >= 0")
        if self.layers != sorted(self.layers):
            raise field_error(f"{where}.layers", self.layers, "must be in increasing order")
