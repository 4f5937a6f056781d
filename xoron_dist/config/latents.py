"""The latent spaces of image and video generation: a KL image autoencoder and a 3D causal video autoencoder.

``ImageVAEConfig`` sizes ``xoron_dist.model.latents.image_vae.ImageVAE`` (the LDM / Stable Diffusion
``AutoencoderKL`` layout), ``VideoVAEConfig`` sizes ``xoron_dist.model.latents.video_vae.VideoVAE``
(causal in time, 1 + temporal_factor·k frames -> 1 + k latent frames). Both train with the terms of
``VAELossConfig`` (``xoron_dist.model.latents.losses.VAELoss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from xoron_dist.config.checks import non_negative, positive
from xoron_dist.utils.typed_config import field_error


@dataclass
class VAELossConfig:
    """Weights of the autoencoder's training terms (``xoron_dist.model.latents.losses``).

    Every pixel term is a mean over pixels, and the KL term is the per-image KL summed over latent
    elements divided by the pixels of the image, so ``kl_weight`` has LDM's meaning (LDM sums both
    terms over pixels; its f8 models use 1e-6). ``spectral``: L1 between FFT magnitudes;
    ``gradient``: L1 between finite differences (edges). The discriminator is a PatchGAN on each
    image or frame with the ``disc_loss`` objective, switched on at step ``disc_start``; with
    ``adaptive_disc_weight`` its generator term is scaled by VQGAN's ratio of gradient norms at the
    decoder's last layer (Esser et al. 2021, eq. 7) times ``disc_weight``.
    """

    l1_weight: float = 1.0
    spectral_weight: float = 0.1
    gradient_weight: float = 0.5
    kl_weight: float = 1e-6
    discriminator: bool = False
    disc_loss: Literal["hinge", "lsgan"] = "hinge"
    disc_weight: float = 0.5
    disc_start: int = 5000
    adaptive_disc_weight: bool = True
    disc_channels: int = 64
    disc_layers: int = 3

    def validate(self, where: str) -> None:
        non_negative(
            self, where, "l1_weight", "spectral_weight", "gradient_weight", "kl_weight", "disc_weight", "disc_start"
        )
        positive(self, where, "disc_channels", "disc_layers")
        if self.l1_weight + self.spectral_weight + self.gradient_weight == 0:
            raise field_error(
                f"{where}.l1_weight",
                self.l1_weight,
                "some reconstruction weight (l1, spectral or gradient) must be > 0",
            )


def _validate_autoencoder(cfg: Any, where: str) -> int:
    """The checks both autoencoders share; returns the number of 2x spatial downsamplings."""
    positive(
        cfg,
        where,
        "in_channels",
        "channels",
        "blocks_per_level",
        "latent_channels",
        "spatial_factor",
        "norm_groups",
        "scaling_factor",
    )
    if not cfg.channel_multipliers or any(m <= 0 for m in cfg.channel_multipliers):
        raise field_error(f"{where}.channel_multipliers", cfg.channel_multipliers, "a non-empty list of ints > 0")
    downsamplings = int(math.log2(cfg.spatial_factor))
    if 2**downsamplings != cfg.spatial_factor:
        raise field_error(f"{where}.spatial_factor", cfg.spatial_factor, "must be a power of 2 (8 for f8 latents)")
    if not -30.0 <= cfg.initial_logvar <= 20.0:
        raise field_error(f"{where}.initial_logvar", cfg.initial_logvar, "must lie in the clamp range [-30, 20]")
    if len(cfg.channel_multipliers) != downsamplings + 1:
        raise field_error(
            f"{where}.channel_multipliers",
            cfg.channel_multipliers,
            f"needs log2(spatial_factor) + 1 = {downsamplings + 1} levels (every level but the "
            "last halves height and width)",
        )
    for m in cfg.channel_multipliers:
        if (cfg.channels * m) % cfg.norm_groups:
            raise field_error(
                f"{where}.norm_groups",
                cfg.norm_groups,
                f"must divide every level's width channels * multiplier ({cfg.channels * m})",
            )
    cfg.loss.validate(f"{where}.loss")
    return downsamplings


@dataclass
class ImageVAEConfig:
    """KL-regularised image autoencoder, (batch, 3, H, W) -> latents (batch, latent_channels, H/8, W/8).

    The layout of LDM's ``AutoencoderKL`` (Rombach et al. 2022): level i has ``blocks_per_level``
    residual blocks of width ``channels * channel_multipliers[i]`` and every level but the last
    halves the resolution, so ``spatial_factor = 2 ** (levels - 1)``. ``mid_attention``: one
    single-head self-attention in the middle of encoder and decoder. ``initial_logvar``: the posterior's
    log-variance at init (the log-variance half of quant_conv's bias); a randomly initialised LDM starts
    near 0, i.e. unit noise on every latent, which the decoder must first learn to see past (-4, std 0.14,
    gained 1.5 dB of held-out PSNR at 200 steps in bench/latents_recon.py). ``scaling_factor`` /
    ``shift_factor`` map latents to the diffusion model's space, ``(z - shift) * scale`` (SD's
    0.18215; set them from the latents' std and mean over data). Defaults: SD3/FLUX width (16 latent
    channels, 128·(1, 2, 4, 4), 2 blocks per level).
    """

    in_channels: int = 3
    channels: int = 128
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    blocks_per_level: int = 2
    latent_channels: int = 16
    spatial_factor: int = 8
    norm_groups: int = 32
    mid_attention: bool = True
    initial_logvar: float = -4.0
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def validate(self, where: str) -> None:
        _validate_autoencoder(self, where)


@dataclass
class VideoVAEConfig:
    """3D causal video autoencoder: (batch, 3, 1 + temporal_factor·k, H, W) -> (batch, C, 1 + k, H/8, W/8).

    The same levels as ``ImageVAEConfig``, with 3x3x3 convolutions that pad only the past in time
    and per-frame norms and attention; the deepest log2(temporal_factor) downsamplings also halve
    time (CogVideoX and Wan: 4x time, 8x space, 16 latent channels). The first frame is encoded
    alone, so an image is a one-frame video.
    """

    in_channels: int = 3
    channels: int = 128
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    blocks_per_level: int = 2
    latent_channels: int = 16
    spatial_factor: int = 8
    temporal_factor: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    initial_logvar: float = -4.0
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def validate(self, where: str) -> None:
        downsamplings = _validate_autoencoder(self, where)
        positive(self, where, "temporal_factor")
        steps = int(math.log2(self.temporal_factor))
        if 2**steps != self.temporal_factor or steps > downsamplings:
            raise field_error(
                f"{where}.temporal_factor",
                self.temporal_factor,
                f"must be a power of 2 no larger than spatial_factor ({self.spatial_factor}): "
                "each temporal halving rides on one spatial downsampling",
            )
