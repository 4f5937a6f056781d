"""3D causal video autoencoder: (batch, 3, 1 + f_t·k, H, W) <-> latents (batch, C, 1 + k, H/8, W/8).

The image autoencoder's levels (``image_vae``) with every 3x3 conv made a 3x3x3 ``CausalConv3d`` (pads
only the past in time), norms and attention applied frame by frame, and the deepest log2(f_t)
downsamplings also halving time (CogVideoX, Yang et al. 2024, arXiv:2408.06072 §2.1; Wan, 2025,
arXiv:2503.20314 §3.1):

    temporal downsampling  a causal (3, 1, 1) conv with time stride 2: output 0 reads frame 0 alone,
                           output j reads frames 2j-2 .. 2j, so 1 + 2m frames -> 1 + m
    temporal upsampling    a causal (3, 1, 1) conv to 2C channels, each frame split into two frames,
                           the first frame's earlier copy dropped: 1 + m -> 1 + 2m

So latent frame j depends on input frames <= f_t·j only: the first frame is encoded alone and later
frames in groups of f_t, and decoded frame i depends on latent frames <= ceil(i / f_t) only.

Two traps of the public causal VAEs that this module avoids: CogVideoX's GroupNorm normalises over
(T, H, W) at once, so every latent frame there depends on every input frame (not causal; here the norm
is per frame, as Wan's RMS norm is); and its temporal downsampler averages frame pairs outside the
conv cache. Here every temporal op is a ``CausalConv3d``, so one ``ConvCache`` streams the whole
network: ``encode_chunked`` (first frame, then f_t frames at a time) equals ``encode``.

An image is a one-frame video: a 4D input (batch, 3, H, W) runs the same weights as 2D ops (each
causal conv with its kernel summed over time, see ``causal_conv``), equal to the 5D call on one frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.latents import VideoVAEConfig
from xoron_dist.model.latents.causal_conv import CausalConv3d, ConvCache, per_frame
from xoron_dist.model.latents.image_vae import (
    NORM_EPS,
    DiagonalGaussian,
    Downsample2D,
    ImageVAE,
    SpatialSelfAttention,
    Upsample2D,
    VAEOutput,
    check_spatial,
    init_posterior_logvar_,
)


class CausalResBlock3d(nn.Module):
    """Per-frame GroupNorm, SiLU, causal 3x3x3 conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, (1, 1, 1)) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(per_frame(self.norm1, x)), cache)
        h = self.conv2(F.silu(per_frame(self.norm2, h)), cache)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x, cache)) + h


class TemporalUpsample(nn.Module):
    """(batch, C, 1 + m, H, W) -> (batch, C, 1 + 2m, H, W): each frame becomes two (module docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))
        self.conv.init_last_tap_identity()  # starts as frame repetition

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        channels = x.shape[1]
        if x.dim() == 4:  # the first frame keeps only its later copy
            return self.conv(x)[:, channels:]
        first = cache is None or self.conv not in cache
        y = self.conv(x, cache)
        batch, _, frames, height, width = y.shape
        y = y.reshape(batch, 2, channels, frames, height, width).permute(0, 2, 3, 1, 4, 5)
        y = y.reshape(batch, channels, 2 * frames, height, width)
        return y[:, :, 1:] if first else y


class CausalLevel(nn.Module):
    """Residual blocks, then an optional spatial (per-frame) and temporal resampler."""

    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, groups: int, spatial: str | None, temporal: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [CausalResBlock3d(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(blocks)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if spatial == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if spatial == "up" else [])
        self.temporal: nn.Module | None = None
        if temporal and spatial == "down":
            self.temporal = CausalConv3d(out_channels, out_channels, (3, 1, 1), (2, 1, 1))
            self.temporal.init_last_tap_identity()  # starts as frame subsampling
        elif temporal:
            self.temporal = TemporalUpsample(out_channels)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        for block in self.resnets:
            x = block(x, cache)
        for down in self.downsamplers:  # down: space, then time (on fewer pixels)
            x = per_frame(down, x)
        if self.temporal is not None:
            x = self.temporal(x, cache)
        for up in self.upsamplers:  # up: time, then space
            x = per_frame(up, x)
        return x


class CausalMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([CausalResBlock3d(channels, channels, groups) for _ in range(2)])
        # within each frame
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attention in self.attentions:
            x = per_frame(attention, x)
        return self.resnets[1](x, cache)


class CausalEncoder3d(nn.Module):
    """(batch, 3, T, H, W) -> moments (batch, 2C, 1 + (T - 1) / f_t, H/f, W/f); images (batch, 3, H, W) too."""

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_multipliers]
        last = len(widths) - 1
        first_temporal = last - int(math.log2(cfg.temporal_factor))
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        self.down_blocks = nn.ModuleList(
            [
                CausalLevel(
                    widths[max(i - 1, 0)],
                    width,
                    cfg.blocks_per_level,
                    cfg.norm_groups,
                    "down" if i < last else None,
                    first_temporal <= i < last,
                )
                for i, width in enumerate(widths)
            ]
        )
        self.mid_block = CausalMidBlock(widths[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for level in self.down_blocks:
            x = level(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(per_frame(self.conv_norm_out, x)), cache)


class CausalDecoder3d(nn.Module):
    """latents (batch, C, 1 + k, h, w) -> videos (batch, 3, 1 + f_t·k, f·h, f·w); 4D latents -> images."""

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_multipliers)]
        last = len(widths) - 1
        temporal_levels = int(math.log2(cfg.temporal_factor))
        self.conv_in = CausalConv3d(cfg.latent_channels, widths[0])
        self.mid_block = CausalMidBlock(widths[0], cfg.norm_groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            [
                CausalLevel(
                    widths[max(i - 1, 0)],
                    width,
                    cfg.blocks_per_level + 1,
                    cfg.norm_groups,
                    "up" if i < last else None,
                    i < temporal_levels,
                )
                for i, width in enumerate(widths)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], cfg.in_channels)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, cache), cache)
        for level in self.up_blocks:
            x = level(x, cache)
        return self.conv_out(F.silu(per_frame(self.conv_norm_out, x)), cache)


class VideoVAE(nn.Module):
    """``encode(video) -> DiagonalGaussian``, ``decode(latents) -> video``, ``forward`` for training.

    Videos are (batch, in_channels, T, H, W) in [-1, 1] with T = 1 + temporal_factor·k; images
    (batch, in_channels, H, W) are one-frame videos. Passing a ``ConvCache`` streams: the first call
    takes the first frame (1 + f_t·k frames), each later call a multiple of f_t frames.
    """

    def __init__(self, cfg: VideoVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = CausalEncoder3d(cfg)
        self.decoder = CausalDecoder3d(cfg)
        # 1x1x1, as Wan's conv1/conv2 and the image VAE's quant convs (so ``inflate_from`` maps every weight)
        self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, (1, 1, 1))
        init_posterior_logvar_(self.quant_conv.conv.bias, cfg.initial_logvar)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.conv.weight

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.cfg.temporal_factor

    def check_input(self, x: torch.Tensor, cache: ConvCache | None = None) -> None:
        if x.dim() not in (4, 5) or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"VideoVAE takes (batch, {self.cfg.in_channels}, T, H, W) or an image (batch, "
                f"{self.cfg.in_channels}, H, W); got {tuple(x.shape)}"
            )
        check_spatial(x.shape[-2], x.shape[-1], self.cfg.spatial_factor, "VideoVAE")
        factor, frames = self.cfg.temporal_factor, x.shape[2] if x.dim() == 5 else 1
        if cache:  # a continuation: whole groups only
            if frames % factor:
                raise ValueError(f"VideoVAE continues a stream in groups of {factor} frames; got {frames} frames")
        elif (frames - 1) % factor:
            raise ValueError(
                f"VideoVAE encodes 1 + {factor}·k frames (1, {1 + factor}, {1 + 2 * factor}, ...); got {frames} frames"
            )

    def encode(self, video: torch.Tensor, cache: ConvCache | None = None) -> DiagonalGaussian:
        self.check_input(video, cache)
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(video, cache)))

    def decode(self, latents: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents, cache), cache)

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> VAEOutput:
        posterior = self.encode(video)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return VAEOutput(self.decode(latents), posterior, latents)

    def encode_chunked(self, video: torch.Tensor) -> DiagonalGaussian:
        """Streamed ``encode``: the first frame, then ``temporal_factor`` frames per call, one cache throughout."""
        self.check_input(video)
        cache: ConvCache = {}
        bounds = range(1, video.shape[2], self.cfg.temporal_factor)
        chunks = [video[:, :, :1]] + [video[:, :, i : i + self.cfg.temporal_factor] for i in bounds]
        parts = [self.encode(chunk, cache) for chunk in chunks]
        return DiagonalGaussian(torch.cat([p.mean for p in parts], 2), torch.cat([p.logvar for p in parts], 2))

    def decode_chunked(self, latents: torch.Tensor) -> torch.Tensor:
        """Streamed ``decode``: one latent frame per call (1, then temporal_factor frames out), one cache."""
        cache: ConvCache = {}
        return torch.cat([self.decode(latents[:, :, j : j + 1], cache) for j in range(latents.shape[2])], 2)

    @torch.no_grad()
    def inflate_from(self, image_vae: ImageVAE) -> None:
        """Start from a trained image VAE of the same sizes: each 2D kernel becomes the last time tap of its causal
        3D kernel (the other taps zero), norms, attention and spatial resamplers are copied. Every frame then
        sees only itself, and with the temporal resamplers at their frame-copy init, latent frame j is the image
        VAE's latent of frame 4j, and decoded frame i the image VAE's decoding of latent frame ceil(i / 4)
        (CogVideoX and Wan also start video VAEs from image weights)."""
        ours, written = self.state_dict(), set()
        for name, value in image_vae.state_dict().items():
            module, _, leaf = name.rpartition(".")
            target = name if name in ours else f"{module}.conv.{leaf}"  # a CausalConv3d keeps its nn.Conv3d in .conv
            if target in ours and ours[target].dim() == value.dim() + 1 and ours[target].shape[:2] == value.shape[:2]:
                ours[target].zero_()
                ours[target][:, :, -1] = value  # (out, in, kh, kw) -> the last of the kt taps
            elif target in ours and ours[target].shape == value.shape:
                ours[target].copy_(value)
            else:
                raise ValueError(
                    f"inflate_from: image VAE weight {name} {tuple(value.shape)} has no counterpart "
                    "here; build both from the same channels, multipliers, blocks and latent sizes"
                )
            written.add(target)
        missed = sorted(k for k in ours if k not in written and ".temporal." not in k)
        if missed:
            raise ValueError(
                f"inflate_from: the image VAE has nothing for {missed[:3]}...; build both from the same "
                "sizes (mid_attention too)"
            )

    def to_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor
