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

The decoder half (quantiser, decoder, losses) is ``TiTokDecoder`` (``decoder.py``); ``TiTok`` puts its encoder in
front, and the vision tower's compressor (``xoron_dist.model.vision.compressor``), whose block stack is
this encoder's, reuses it as an auxiliary reconstruction loss on the understanding path.

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

import torch
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.vision.decoder import TiTokDecoder, TiTokOutput, titok_tower_config
from xoron_dist.model.vision.tower import IMAGE_MEAN, IMAGE_STD, VisionTower, prepare_images


class TiTok(TiTokDecoder):
    """1D tokenizer: ``encode(images) -> ids (batch, titok_tokens)``, ``decode(ids) -> images``,
    ``forward(images) -> TiTokOutput`` (losses for training)."""

    def __init__(self, cfg: VisionConfig) -> None:
        nn.Module.__init__(self)  # the encoder first, then the decoder half: the parameter order of checkpoints
        self.encoder = VisionTower(titok_tower_config(cfg))  # patches + latent tokens; outputs the latents
        self._build_decoder(cfg, cfg.titok_hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.reset_decoder()

    def pixels(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images (uint8 list, or normalised float (batch, 3, S, S)) -> (batch, 3, S, S) normalised at
        ``titok_image_size``."""
        size = self.cfg.titok_image_size
        pixels = torch.stack(prepare_images(images, self.tower_cfg)).to(self.quant_proj.weight.device)
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"TiTok reads {size}x{size} images; got {tuple(pixels.shape[-2:])} pixel values")
        return pixels

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images -> ids (batch, titok_tokens)."""
        return self.quantize(self.project(self.encoder(self.pixels(images)).latents))[0]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch, titok_tokens) -> uint8 images (batch, S, S, 3)."""
        if ids.dim() != 2 or ids.shape[1] != self.cfg.titok_tokens:
            raise ValueError(f"ids must be (batch, {self.cfg.titok_tokens}); got {tuple(ids.shape)}")
        pixels = self.decode_codes(self.quantizer.codes()[ids])
        return ((pixels * IMAGE_STD + IMAGE_MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> TiTokOutput:
        target = self.pixels(images)
        return self.reconstruct(self.encoder(target).latents, target)
