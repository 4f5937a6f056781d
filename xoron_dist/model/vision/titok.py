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
commitment loss β‖z − sg(e)‖² (β = ``titok_commitment``). Dead codes are restarted (as in
Jukebox, Dhariwal et al. 2020 §2.3, and SoundStream): a moving average of each code's share of
the ids is kept (``code_usage``), and a code whose share falls below ``titok_dead_code_share``
of the uniform share is re-seeded with one of the current batch's latents, so the codebook does
not shrink to the few codes that won early. With data parallelism (``sync_group``) the usage is
summed over the ranks and rank 0's choice of latents is broadcast: every replica keeps the same
codebook. Reconstruction loss: MSE on pixels
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
        self.codebook = nn.Embedding(cfg.titok_codebook_size, cfg.titok_code_dim)
        self.decoder_in = nn.Linear(cfg.titok_code_dim, hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.decoder_positions = nn.Parameter(torch.zeros(self.grid * self.grid, hidden))
        self.decoder = VisionTransformer(tower)
        self.pixel_out = nn.Linear(hidden, 3 * cfg.titok_patch_size ** 2)
        # moving-average share of the ids each code took (dead-code restarts); uniform at the start
        self.register_buffer("code_usage", torch.full((cfg.titok_codebook_size,), 1.0 / cfg.titok_codebook_size))
        self.sync_group = None  # the data-parallel group whose replicas must keep one codebook
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's (ids, latents)
        self.restarts = 0  # codes re-seeded so far (for logs)
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
        nn.init.normal_(self.codebook.weight)  # l2-normalised at use: only directions matter
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

    def _codes(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (batch, K, code_dim) normalised -> ids (batch, K), codes (batch, K, code_dim)."""
        codes = self._codes()
        ids = (latents.detach() @ codes.t()).argmax(dim=-1)  # max cosine = min l2 distance on the sphere
        return ids, codes[ids]

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
        pixels = self.decode_codes(self._codes()[ids])
        return ((pixels * IMAGE_STD + IMAGE_MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    @torch.no_grad()
    def restart_dead_codes(self, ids: torch.Tensor, latents: torch.Tensor) -> int:
        """Update the usage average with ``ids`` and re-seed the dead codes from ``latents``
        (batch, K, code_dim); returns how many codes were restarted (see the module docstring)."""
        size = self.cfg.titok_codebook_size
        counts = torch.bincount(ids.flatten(), minlength=size).float()
        group = self.sync_group
        distributed = group is not None and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts, group=group)
        decay = self.cfg.titok_usage_decay
        self.code_usage.mul_(decay).add_(counts / counts.sum().clamp(min=1), alpha=1 - decay)
        if not self.cfg.titok_dead_code_share:
            return 0
        dead = (self.code_usage < self.cfg.titok_dead_code_share / size).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pool = latents.reshape(-1, latents.shape[-1])
        picks = torch.randint(pool.shape[0], (dead.numel(),), device=pool.device)
        fresh = pool[picks].to(self.codebook.weight.dtype)
        if distributed:
            torch.distributed.broadcast(fresh, src=torch.distributed.get_global_rank(group, 0), group=group)
        self.codebook.weight[dead] = fresh
        self.code_usage[dead] = 1.0 / size  # a fresh code gets the uniform share to prove itself
        self.restarts += int(dead.numel())
        return int(dead.numel())

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> TiTokOutput:
        training = self.training and torch.is_grad_enabled()
        if training and self._pending is not None:  # the previous step's ids and latents
            self.restart_dead_codes(*self._pending)
            self._pending = None
        target = self.pixels(images)
        latents = self._latents(target)
        ids, codes = self.quantize(latents)
        codebook_loss = F.mse_loss(codes.float(), latents.detach().float())
        commitment_loss = F.mse_loss(latents.float(), codes.detach().float())
        straight_through = latents + (codes - latents).detach()  # decoder gradient flows into the encoder
        reconstruction = self.decode_codes(straight_through)
        reconstruction_loss = F.mse_loss(reconstruction.float(), target.float())
        loss = reconstruction_loss + codebook_loss + self.cfg.titok_commitment * commitment_loss
        if training:  # restarts apply at the next training forward: backward still needs this codebook
            self._pending = (ids, latents.detach())
        return TiTokOutput(loss, reconstruction_loss, codebook_loss, commitment_loss, ids, reconstruction, target)
