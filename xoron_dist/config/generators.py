"""``model.image_gen`` and ``model.video_gen``: the image and video generators, each an autoencoder
(its latent space) and a MoE-DiT trained by rectified flow in it, conditioned on the LLM's states of
the request (``xoron_dist.model.generation.heads``).

    image_gen.vae   KL autoencoder, 8x spatial (``ImageVAEConfig``)       objective image_vae
    image_gen.dit   MoE-DiT, dual- then single-stream (``DiTConfig``)      objective text_to_image
    video_gen.vae   3D causal autoencoder, 4x time, 8x space              objective video_vae
    video_gen.dit   block-causal MoE-DiT over chunks (``VideoDiTConfig``)  objective text_to_video

``steps``, ``guidance`` and ``sampler`` are the generation defaults (``generate_image`` /
``generate_video`` and the TensorBoard samples take them unless told otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xoron_dist.config.checks import positive
from xoron_dist.config.generation import DiTConfig
from xoron_dist.config.latents import ImageVAEConfig, VideoVAEConfig
from xoron_dist.config.video_generation import VideoDiTConfig
from xoron_dist.utils.typed_config import field_error


def _check_pair(cfg, where: str) -> None:
    """What a generator's autoencoder and DiT must agree on."""
    positive(cfg, where, "steps")
    if cfg.guidance < 1.0:
        raise field_error(f"{where}.guidance", cfg.guidance, "classifier-free guidance scale >= 1 (1: no guidance)")
    if cfg.dit.latent_channels != cfg.vae.latent_channels:
        raise field_error(f"{where}.dit.latent_channels", cfg.dit.latent_channels,
                          f"must equal {where}.vae.latent_channels ({cfg.vae.latent_channels}): the DiT works "
                          "in the autoencoder's latent space")
    if cfg.vae.loss.discriminator:
        raise field_error(f"{where}.vae.loss.discriminator", True,
                          "inside Xoron the autoencoder trains without its PatchGAN (its adaptive weight needs "
                          "a second backward through the decoder); pretrain with the discriminator on its own "
                          "(bench/latents_recon.py shows how) and load the weights")


class _GeneratorSection:
    """What ``ImageGenConfig`` and ``VideoGenConfig`` share (no fields: each dataclass keeps its own)."""

    @property
    def pixel_multiple(self) -> int:
        """Heights and widths must be multiples of this: the autoencoder's factor times the patch."""
        return self.vae.spatial_factor * self.dit.patch_size

    def validate(self, where: str) -> None:
        _check_pair(self, where)


@dataclass
class ImageGenConfig(_GeneratorSection):
    enabled: bool = False
    vae: ImageVAEConfig = field(default_factory=ImageVAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    steps: int = 28
    guidance: float = 4.0
    sampler: Literal["euler", "heun"] = "euler"


@dataclass
class VideoGenConfig(_GeneratorSection):
    enabled: bool = False
    vae: VideoVAEConfig = field(default_factory=VideoVAEConfig)
    dit: VideoDiTConfig = field(default_factory=VideoDiTConfig)
    steps: int = 20
    guidance: float = 4.0
    sampler: Literal["euler", "heun"] = "euler"

    def trainable_frames(self, frames: int) -> int:
        """The most frames <= ``frames`` the generator trains on: 1 + temporal_factor·k video frames whose
        1 + k latent frames fill whole chunks (0 if even one chunk does not fit)."""
        factor, chunk = self.vae.temporal_factor, self.dit.chunk_frames
        latent = (frames - 1) // factor + 1 if frames >= 1 else 0
        latent -= latent % chunk
        return 1 + factor * (latent - 1) if latent >= 1 else 0

    def validate(self, where: str) -> None:
        _check_pair(self, where)


__all__ = ["ImageGenConfig", "VideoGenConfig"]
