"""The seed's understanding path after the vision tower: dual-stream layers, then a TiTok-style compressor.

    tower patches (b, n, d) ─► DualStreamLayers ─► (b, n, d) ─► LatentCompressor ─► (b, k, d) ─► projector
                               (dual_stream_layers)             (compressor_tokens, compressor_layers)

Each part is off at 0; with both off the tower's patch features go to the projector as they always
did (``VisionTower.forward``). Xoron-Dev (``models/encoders/vision.py``) runs SigLIP-2, its 2D-RoPE,
2 dual-stream layers, then TiTok 729 → 256 tokens, then the projector (64 tokens).

**Dual-stream layers** (the seed's ``DualStreamEncoderAttention`` + per-stream FFN, "SD3/Flux
style"). The two streams are two copies of the patch grid: stream a and stream b both start as the
tower's patch features; each stream has its own weights (pre-LN, q/k/v/out projections, MLP), and
both attend *jointly* over [a; b] (MMDiT, Esser et al. 2024 §3.2), so every patch of a reads every
patch of b and the reverse: the symmetric exchange the seed describes. Both streams carry the same
2D-RoPE (each patch's (row, col)), padded patches are masked in both, and the output is the mean
(a + b) / 2 (the seed's merge). A block is the tower's ``VisionBlock`` with ``dual=True``: stream a
is its ``patch`` weights, stream b its ``latent`` weights. (The seed page's diagram draws the
dual-stream layers after TiTok, but its layer rotates both streams by an (height, width) patch grid
and the seed's code runs it on the patches, before TiTok: so do we.)

**Compressor** (TiTok's encoder, Yu et al. 2024 §3.2, arXiv:2406.07550): k learned latent queries
ride along with the patches through ``compressor_layers`` pre-LN blocks of joint attention over
[patches; queries] (one stream, shared weights, as TiTok; the queries have no position: identity
rotation); only the queries' outputs leave, (b, k, d). Each query's attention row is cross-attention
to the patches plus self-attention among the queries. It is the tower's ``VisionTransformer``, the
same latent-token encoder TiTok's tokenizer uses (``titok.py``): one implementation, not two.

**Reconstruction** (``reconstruction_weight`` > 0): TiTok's decoder half (``titok.TiTokDecoder``:
cosine VQ, then a ViT decoder of mask tokens reading the quantised latents) reconstructs each image,
resized to ``titok_image_size``², from its k tokens; the MSE + codebook + β·commitment loss, summed
over the images (each image's own loss once), is ``VisionOutput.aux_loss`` (training forwards only).
The straight-through VQ lets the decoder's gradient reach the compressor and the tower. The step
optimises it as the objective ``reconstruction`` (``train/objectives.py``): the mean over the step's
understood images, times ``reconstruction_weight``.

Tensor parallelism (``sharding.py``): the same column/row splits as the tower's blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.rope_nd import AxialRoPE
from xoron_dist.model.vision.blocks import VisionBlock, VisionTransformer


class DualStreamLayers(nn.Module):
    """(batch, n, hidden) patch features -> the same shape, through ``dual_stream_layers`` MMDiT blocks."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg, dual=True) for _ in range(cfg.dual_stream_layers))
        self.rope = AxialRoPE(cfg.hidden_size // cfg.num_heads, axes=2, theta=cfg.rope_theta)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """features (batch, n, hidden), coords (batch, n, 2) (row, col), mask (batch, n) True = real patch."""
        n = features.shape[1]
        x = torch.cat([features, features], dim=1)  # [stream a; stream b], both from the patches
        cos, sin = self.rope(coords)
        rope = (torch.cat([cos, cos], dim=1), torch.cat([sin, sin], dim=1))  # same positions in both streams
        key_mask = None
        if mask is not None and not bool(mask.all()):
            key_mask = torch.cat([mask, mask], dim=1)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, n, rope, key_mask)
        return (x[:, :n] + x[:, n:]) / 2


def compressor_config(cfg: VisionConfig) -> VisionConfig:
    """The compressor's block stack: the tower's width, ``compressor_layers`` single-stream blocks, 2D-RoPE."""
    return replace(cfg, num_layers=cfg.compressor_layers, latent_tokens=cfg.compressor_tokens, dual_stream=False,
                   rope=True)


class LatentCompressor(nn.Module):
    """(batch, n, hidden) patches (+ mask) -> (batch, compressor_tokens, hidden) 1D tokens."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(cfg.compressor_tokens, cfg.hidden_size))
        self.encoder = VisionTransformer(compressor_config(cfg))

    def forward(self, features: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        queries = self.queries.to(features.dtype).expand(features.shape[0], -1, -1)
        return self.encoder(features, coords, mask, queries)[1]


def reconstruction_target(pixels: list[torch.Tensor], size: int) -> torch.Tensor:
    """Normalised (3, H, W) images -> (batch, 3, size, size), each resized (aspect not kept) for TiTok's decoder."""
    out = []
    for image in pixels:
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp(-1, 1)
        out.append(image)
    return torch.stack(out)


__all__ = ["DualStreamLayers", "LatentCompressor", "compressor_config", "reconstruction_target"]
