"""TiTok: a 1D image tokenizer, an image as ``titok_tokens`` discrete ids (Yu et al. 2024,
"An Image is Worth 32 Tokens for Reconstruction and Generation", arXiv:2406.07550).

    encoder   ViT over [patch tokens; K learnable latent tokens]   -> K latent outputs   (§3.2)
    quantise  latents -> code_dim, nearest codebook entry (cosine)  -> ids (batch, K)
    decoder   ViT over [mask token per patch; K quantised latents]  -> patch outputs -> pixels

Only the latent tokens cross the bottleneck: the decoder sees no image, its patch positions are
learned mask tokens that read the quantised latents through attention, so the K ids carry the
whole image (1D: they are not tied to patch positions). Both ViTs are the vision tower's
``VisionTransformer`` (``xoron_dist.model.vision.tower``); with ``dual_stream`` the latent tokens get
their own weights there (MMDiT-style), otherwise they share them, as the paper does.

Quantiser: VQ-VAE (van den Oord et al. 2017) with l2-normalised codes and latents (ViT-VQGAN,
Yu et al. 2021 §3.2, which TiTok's VQ follows): nearest code by cosine similarity, a
straight-through estimator for the encoder gradient, the codebook loss ‖sg(z) − e‖² and the
commitment loss β‖z − sg(e)‖² (β = ``titok_commitment``); the quantiser is the shared
``CosineQuantizer`` (``xoron_dist.model.common.quantize``), whose dead codes the trainer's
``CodebookKeeper`` restarts after each optimizer step (usage summed over the data-parallel ranks,
rank 0's fresh latents broadcast: every replica keeps one codebook). Reconstruction loss: MSE on pixels
normalised to [-1, 1]. (The paper's second stage, distilling MaskGIT-VQGAN codes, and its
perceptual/GAN losses are training recipes on top of this module, not part of it.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.init import init_weights_
from xoron_dist.model.common.quantize import CosineQuantizer
from xoron_dist.model.common.rope_nd import grid_coords
from xoron_dist.model.vision.tower import IMAGE_MEAN, IMAGE_STD, VisionTower, VisionTransformer, prepare_images


def titok_tower_config(cfg: VisionConfig) -> VisionConfig:
    """The ViT sizes of TiTok's encoder and decoder, from the ``titok_*`` fields."""
    return replace(cfg, hidden_size=cfg.titok_hidden_size, num_layers=cfg.titok_layers, num_heads=cfg.titok_heads,
                   intermediate_size=cfg.titok_intermediate_size, image_size=cfg.titok_image_size,
                   patch_size=cfg.titok_patch_size, latent_tokens=cfg.titok_tokens, resize="square",
                   absolute_positions=True)


def unpatchify(patches: torch.Tensor, rows: int, cols: int, patch: int) -> torch.Tensor:
    """(batch, rows*cols, 3*patch*patch) in (channel, y, x) order -> images (batch, 3, rows*patch, cols*patch)."""
    batch = patches.shape[0]
    x = patches.reshape(batch, rows, cols, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, 3, rows * patch, cols * patch)


@dataclass
class TiTokOutput:
    """``loss`` = reconstruction + codebook + β·commitment (scalars, fp32); ``ids`` (batch, K);
    ``reconstruction`` (batch, 3, S, S) normalised pixels; ``target`` the same for the input."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    ids: torch.Tensor
    reconstruction: torch.Tensor
    target: torch.Tensor


class TiTok(nn.Module):
    """1D tokenizer: ``encode(images) -> ids (batch, titok_tokens)``, ``decode(ids) -> images``,
    ``forward(images) -> TiTokOutput`` (losses for training)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        tower = titok_tower_config(cfg)
        self.tower_cfg = tower
        self.grid = cfg.titok_image_size // cfg.titok_patch_size
        hidden = tower.hidden_size
        self.encoder = VisionTower(tower)  # patches + latent tokens; outputs the latents
        self.quant_proj = nn.Linear(hidden, cfg.titok_code_dim)
        self.quantizer = CosineQuantizer(cfg.titok_codebook_size, cfg.titok_code_dim, cfg.titok_dead_code_share,
                                         cfg.titok_usage_decay)
        self.decoder_in = nn.Linear(cfg.titok_code_dim, hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.decoder_positions = nn.Parameter(torch.zeros(self.grid * self.grid, hidden))
        self.decoder = VisionTransformer(tower)
        self.pixel_out = nn.Linear(hidden, 3 * cfg.titok_patch_size ** 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        std = self.cfg.init_std
        for module in (self.quant_proj, self.decoder_in, self.decoder):
            init_weights_(module, std)
        # Zero output layer: reconstruction starts as the mid-grey image, not noise (as DiT's adaLN-zero).
        nn.init.zeros_(self.pixel_out.weight)
        nn.init.zeros_(self.pixel_out.bias)
        nn.init.normal_(self.quantizer.codebook.weight)  # l2-normalised at use: only directions matter
        nn.init.normal_(self.mask_token, std=std)
        nn.init.normal_(self.decoder_positions, std=std)

    def pixels(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images (uint8 list, or normalised float (batch, 3, S, S)) -> (batch, 3, S, S) normalised at
        ``titok_image_size``."""
        size = self.cfg.titok_image_size
        pixels = torch.stack(prepare_images(images, self.tower_cfg)).to(self.quant_proj.weight.device)
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"TiTok reads {size}x{size} images; got {tuple(pixels.shape[-2:])} pixel values")
        return pixels

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, K, code_dim) l2-normalised encoder latents."""
        return F.normalize(self.quant_proj(self.encoder(pixels).latents), dim=-1)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (batch, K, code_dim) normalised -> ids (batch, K), codes (batch, K, code_dim)."""
        return self.quantizer.lookup(latents)

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images -> ids (batch, titok_tokens)."""
        return self.quantize(self._latents(self.pixels(images)))[0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised latents (batch, K, code_dim) -> normalised pixels (batch, 3, S, S)."""
        batch = codes.shape[0]
        latents = self.decoder_in(codes)
        patches = (self.mask_token + self.decoder_positions).expand(batch, -1, -1)
        coords = grid_coords(self.grid, self.grid, device=codes.device).expand(batch, -1, -1)
        patches, _ = self.decoder(patches, coords, None, latents)
        return unpatchify(self.pixel_out(patches), self.grid, self.grid, self.cfg.titok_patch_size)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch, titok_tokens) -> uint8 images (batch, S, S, 3)."""
        if ids.dim() != 2 or ids.shape[1] != self.cfg.titok_tokens:
            raise ValueError(f"ids must be (batch, {self.cfg.titok_tokens}); got {tuple(ids.shape)}")
        pixels = self.decode_codes(self.quantizer.codes()[ids])
        return ((pixels * IMAGE_STD + IMAGE_MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> TiTokOutput:
        target = self.pixels(images)
        q = self.quantizer(self._latents(target))  # straight-through: the decoder's gradient reaches the encoder
        reconstruction = self.decode_codes(q.codes)
        reconstruction_loss = F.mse_loss(reconstruction.float(), target.float())
        loss = reconstruction_loss + q.codebook_loss + self.cfg.titok_commitment * q.commitment_loss
        return TiTokOutput(loss, reconstruction_loss, q.codebook_loss, q.commitment_loss, q.ids, reconstruction, target)
