"""TiTok's decoder half (``TiTokDecoder``): K latents -> cosine-quantised ids -> a ViT decoder of
learned mask tokens that read the latents -> pixels, with the VQ training losses (see ``titok.py``'s
docstring for the design and its sources). ``TiTok`` (``titok.py``) puts its encoder in front; the
vision tower's seed path (``tower.py`` with ``reconstruction_weight``) reuses it as an auxiliary
reconstruction objective on the compressor's tokens. Its own module so the tower can own one without
importing the tokenizer, which is built on the tower.
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
from xoron_dist.model.vision.blocks import VisionTransformer


def titok_tower_config(cfg: VisionConfig) -> VisionConfig:
    """The ViT sizes of TiTok's encoder and decoder, from the ``titok_*`` fields."""
    return replace(cfg, hidden_size=cfg.titok_hidden_size, num_layers=cfg.titok_layers, num_heads=cfg.titok_heads,
                   intermediate_size=cfg.titok_intermediate_size, image_size=cfg.titok_image_size,
                   patch_size=cfg.titok_patch_size, latent_tokens=cfg.titok_tokens, resize="square",
                   absolute_positions=True, dual_stream_layers=0, compressor_tokens=0, reconstruction_weight=0.0)


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


class TiTokDecoder(nn.Module):
    """TiTok's decoder half: K latents (batch, K, ``in_width``) -> quantised ids -> pixels, and the
    training losses. ``TiTok`` puts its own encoder in front; the understanding path's compressor
    (``xoron_dist.model.vision.compressor``) reuses it as an auxiliary reconstruction objective."""

    def __init__(self, cfg: VisionConfig, in_width: int) -> None:
        super().__init__()
        self._build_decoder(cfg, in_width)
        self.reset_decoder()

    def _build_decoder(self, cfg: VisionConfig, in_width: int) -> None:
        self.cfg = cfg
        tower = titok_tower_config(cfg)
        self.tower_cfg = tower
        self.grid = cfg.titok_image_size // cfg.titok_patch_size
        hidden = tower.hidden_size
        self.quant_proj = nn.Linear(in_width, cfg.titok_code_dim)
        self.quantizer = CosineQuantizer(cfg.titok_codebook_size, cfg.titok_code_dim, cfg.titok_dead_code_share,
                                         cfg.titok_usage_decay)
        self.decoder_in = nn.Linear(cfg.titok_code_dim, hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.decoder_positions = nn.Parameter(torch.zeros(self.grid * self.grid, hidden))
        self.decoder = VisionTransformer(tower)
        self.pixel_out = nn.Linear(hidden, 3 * cfg.titok_patch_size ** 2)

    @torch.no_grad()
    def reset_decoder(self) -> None:
        std = self.cfg.init_std
        for module in (self.quant_proj, self.decoder_in, self.decoder):
            init_weights_(module, std)
        # Zero output layer: reconstruction starts as the mid-grey image, not noise (as DiT's adaLN-zero).
        nn.init.zeros_(self.pixel_out.weight)
        nn.init.zeros_(self.pixel_out.bias)
        nn.init.normal_(self.quantizer.codebook.weight)  # l2-normalised at use: only directions matter
        nn.init.normal_(self.mask_token, std=std)
        nn.init.normal_(self.decoder_positions, std=std)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """Encoder latents (batch, K, in_width) -> (batch, K, code_dim) l2-normalised."""
        return F.normalize(self.quant_proj(latents), dim=-1)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (batch, K, code_dim) normalised -> ids (batch, K), codes (batch, K, code_dim)."""
        return self.quantizer.lookup(latents)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised latents (batch, K, code_dim) -> normalised pixels (batch, 3, S, S)."""
        batch = codes.shape[0]
        latents = self.decoder_in(codes)
        patches = (self.mask_token + self.decoder_positions).expand(batch, -1, -1)
        coords = grid_coords(self.grid, self.grid, device=codes.device).expand(batch, -1, -1)
        patches, _ = self.decoder(patches, coords, None, latents)
        return unpatchify(self.pixel_out(patches), self.grid, self.grid, self.cfg.titok_patch_size)

    def reconstruct(self, latents: torch.Tensor, target: torch.Tensor) -> TiTokOutput:
        """Encoder latents (batch, K, in_width) and the image they encode, normalised (batch, 3, S, S)
        -> the losses (straight-through: the decoder's gradient reaches the latents)."""
        q = self.quantizer(self.project(latents))
        reconstruction = self.decode_codes(q.codes)
        reconstruction_loss = F.mse_loss(reconstruction.float(), target.float())
        loss = reconstruction_loss + q.codebook_loss + self.cfg.titok_commitment * q.commitment_loss
        return TiTokOutput(loss, reconstruction_loss, q.codebook_loss, q.commitment_loss, q.ids, reconstruction, target)
