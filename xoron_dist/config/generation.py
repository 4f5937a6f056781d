"""The generation half of the config tree: the image generator (MoE-DiT trained by rectified flow).

Each section validates its own fields (``validate(where)``; ``validate_tree`` runs the nested
``moe`` section's own), as in ``xoron_dist.config.model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xoron_dist.config.checks import non_negative, positive
from xoron_dist.config.model import MoEConfig
from xoron_dist.utils.typed_config import field_error

SWIGLU_MULTIPLE = 64


@dataclass
class ImageMoEConfig(MoEConfig):
    """The generator's MoE: HiDream-I1's layout (4 routed experts, top-2, one shared expert), each expert
    one hidden width wide (3 active experts ~ the 8/3·hidden of a dense SwiGLU at mlp_ratio 4).

    Its own class so that a partial ``moe:`` mapping in a YAML file or an override fills the rest
    with these defaults, not the LLM's (8 experts of width 2048)."""

    num_experts: int = 4
    num_shared_experts: int = 1
    top_k: int = 2
    expert_intermediate_size: int = 1024


@dataclass
class DiTConfig:
    """MoE-DiT image generator (``xoron_dist.model.generation``) and its rectified-flow training.

    Blocks: ``dual_layers`` MMDiT blocks (SD3: text and image keep their own weights and share one
    joint attention; the image FFN is the MoE, the text FFN dense, as in HiDream-I1), then
    ``single_layers`` Flux single-stream blocks on the concatenated sequence (parallel attention and
    MoE). Widths: attention ``num_heads`` x ``head_dim`` (default ``hidden_size / num_heads``); the
    dense FFN ``int(mlp_ratio · hidden)`` for ``ffn: gelu`` and two thirds of that for ``swiglu`` (the
    same parameter count, rounded up to a multiple of 64); the experts ``moe.expert_intermediate_size``.
    ``cond_dim``: width of the LLM hidden states the generator is conditioned on (``llm.hidden_size``).

    Flow matching (``xoron_dist.model.generation.flow``): training t ~ sigmoid(N(logit_mean,
    logit_std)) (SD3's logit-normal), then shifted ``s·t / (1 + (s-1)·t)``; ``time_shift`` a number:
    SD3's fixed shift s; null (the default): Flux's resolution-dependent s = exp(mu(tokens)), mu
    linear from 0.5 at 256 image tokens to 1.15 at 4096. ``cfg_dropout``: share of training samples
    whose condition is replaced by the learned null condition (classifier-free guidance).
    """

    hidden_size: int = 1024
    num_heads: int = 16
    head_dim: int | None = None
    dual_layers: int = 4
    single_layers: int = 8
    patch_size: int = 2
    latent_channels: int = 16
    cond_dim: int = 1024
    mlp_ratio: float = 4.0
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    moe: ImageMoEConfig = field(default_factory=ImageMoEConfig)
    rope_theta: float = 10000.0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    cfg_dropout: float = 0.1
    time_shift: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def dense_intermediate_size(self) -> int:
        """GELU: mlp_ratio · hidden; SwiGLU: two thirds of that (same parameters), rounded up to a multiple of
        ``SWIGLU_MULTIPLE`` (LLaMA's rule, so tensor parallelism can split it)."""
        width = int(self.mlp_ratio * self.hidden_size)
        if self.ffn == "gelu":
            return width
        return -(-(2 * width // 3) // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE

    def validate(self, where: str) -> None:
        positive(
            self,
            where,
            "hidden_size",
            "num_heads",
            "head_dim",
            "patch_size",
            "latent_channels",
            "cond_dim",
            "mlp_ratio",
            "rope_theta",
            "norm_eps",
            "init_std",
            "time_shift",
            "logit_std",
        )
        non_negative(self, where, "dual_layers", "single_layers")
        if self.dual_layers + self.single_layers == 0:
            raise field_error(
                f"{where}.dual_layers",
                self.dual_layers,
                "the generator needs at least one block: set dual_layers or single_layers > 0",
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise field_error(
                f"{where}.num_heads", self.num_heads, f"must divide hidden_size ({self.hidden_size}), or set head_dim"
            )
        if self.attention_head_dim < 4:
            raise field_error(
                f"{where}.head_dim",
                self.attention_head_dim,
                "2D-RoPE needs a head dim of at least 4: one rotated pair per axis",
            )
        if self.rope_theta <= 1:
            raise field_error(f"{where}.rope_theta", self.rope_theta, "must be > 1")
        if self.dense_intermediate_size < 1:
            raise field_error(
                f"{where}.mlp_ratio",
                self.mlp_ratio,
                f"gives a dense FFN of width {self.dense_intermediate_size}; raise it",
            )
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise field_error(
                f"{where}.cfg_dropout",
                self.cfg_dropout,
                "a share of samples in [0, 1) (1 would never train the conditional model)",
            )
