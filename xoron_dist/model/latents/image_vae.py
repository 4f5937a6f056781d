"""KL-regularised image autoencoder: images (batch, 3, H, W) in [-1, 1] <-> latents (batch, C, H/8, W/8).

The layout is LDM's ``AutoencoderKL`` (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", §3 and appendix G), which Stable Diffusion, SDXL, SD3 and FLUX use:

    encoder  conv_in -> per level: residual blocks, a stride-2 conv (all but the last level)
             -> mid (residual block, single-head self-attention, residual block)
             -> GroupNorm, SiLU, conv_out to 2C (mean and log-variance) -> 1x1 quant_conv
    decoder  1x1 post_quant_conv -> conv_in -> mid -> per level (reversed): residual blocks + 1,
             nearest 2x upsampling + conv (all but the last) -> GroupNorm, SiLU, conv_out to 3

The posterior is a diagonal Gaussian (Kingma & Welling 2014); the KL to N(0, I) keeps the latent
space smooth for the diffusion model. Module names are diffusers' (``down_blocks.0.resnets.1``,
``mid_block.attentions.0.to_q``), so a diffusers ``AutoencoderKL`` state dict of the same sizes
loads with ``load_state_dict`` (the parity test in tests/model/test_latents_vae.py does that).

The 2D blocks here are also the per-frame spatial resamplers of the video autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.latents import ImageVAEConfig

NORM_EPS = 1e-6


def check_spatial(height: int, width: int, factor: int, who: str) -> None:
    if height % factor or width % factor:
        raise ValueError(f"{who} needs height and width divisible by {factor}; got {height}x{width}")


@torch.no_grad()
def init_posterior_logvar_(moments_bias: torch.Tensor, logvar: float) -> None:
    """Set the log-variance half of the (2C,) bias that makes the posterior's moments (``initial_logvar``)."""
    moments_bias[moments_bias.shape[0] // 2 :] = logvar


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); ``mean``/``logvar`` (batch, C, ...latent dims)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """moments (batch, 2C, ...) -> mean, logvar; logvar clamped to [-30, 20] as LDM does (exp stays finite)."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn from ``generator`` (the reparameterisation trick)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (batch,): 0.5 * sum(mean^2 + var - 1 - logvar) over the latent elements."""
        terms = self.mean.square() + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(1)


@dataclass
class VAEOutput:
    """``reconstruction`` shaped like the input; ``latents`` the decoded sample (or the mean)."""

    reconstruction: torch.Tensor
    posterior: DiagonalGaussian
    latents: torch.Tensor


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus a (1x1 conv) shortcut: (batch, C_in, H, W) -> (batch, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, with GroupNorm in front and a residual:
    (batch, C, H, W) -> (batch, C, H, W)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (batch, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        h = self.to_out(h[:, 0]).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock2D(nn.Module):
    """Residual block, (optional) self-attention, residual block, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class ResampleLevel(nn.Module):
    """One level: ``blocks`` residual blocks, then ``downsamplers`` or ``upsamplers`` (empty at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(blocks)]
        )
        # Both lists exist (one empty) so the names match diffusers' DownEncoderBlock2D / UpDecoderBlock2D.
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if resample == "up" else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in [*self.downsamplers, *self.upsamplers]:
            x = resample(x)
        return x


class ImageEncoder(nn.Module):
    """(batch, 3, H, W) -> moments before quant_conv (batch, 2C, H/f, W/f)."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_multipliers]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                ResampleLevel(
                    widths[max(i - 1, 0)],
                    width,
                    cfg.blocks_per_level,
                    cfg.norm_groups,
                    "down" if i < len(widths) - 1 else None,
                )
                for i, width in enumerate(widths)
            ]
        )
        self.mid_block = MidBlock2D(widths[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ImageDecoder(nn.Module):
    """latents after post_quant_conv (batch, C, h, w) -> images (batch, 3, f·h, f·w)."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_multipliers)]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock2D(widths[0], cfg.norm_groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            [
                ResampleLevel(
                    widths[max(i - 1, 0)],
                    width,
                    cfg.blocks_per_level + 1,
                    cfg.norm_groups,
                    "up" if i < len(widths) - 1 else None,
                )
                for i, width in enumerate(widths)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ImageVAE(nn.Module):
    """``encode(images) -> DiagonalGaussian``, ``decode(latents) -> images``, ``forward`` for training.

    Images are (batch, in_channels, H, W) in [-1, 1] with H and W divisible by ``spatial_factor``;
    latents are (batch, latent_channels, H/f, W/f).
    """

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.decoder = ImageDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        init_posterior_logvar_(self.quant_conv.bias, cfg.initial_logvar)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (for the adaptive GAN weight, ``losses.adaptive_gan_weight``)."""
        return self.decoder.conv_out.weight

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"ImageVAE.encode takes (batch, {self.cfg.in_channels}, H, W); got {tuple(images.shape)}")
        check_spatial(images.shape[2], images.shape[3], self.cfg.spatial_factor, "ImageVAE")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> VAEOutput:
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return VAEOutput(self.decode(latents), posterior, latents)

    def to_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's space, (z - shift_factor) * scaling_factor."""
        return (latents - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor
