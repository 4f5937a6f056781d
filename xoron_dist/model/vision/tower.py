"""Xoron's vision tower: a SigLIP-2 style ViT with 2D-RoPE, native-resolution patches and padding masks.

The layer stack is SigLIP's (Zhai et al. 2023; SigLIP 2, Tschannen et al. 2025): a linear patch
embedding (the p×p/stride-p conv written as a linear over flattened (channel, y, x) patches),
pre-LN encoder blocks (LayerNorm → multi-head attention with q/k/v/out biases → residual,
LayerNorm → fc1 → GELU-tanh → fc2 → residual) and a final LayerNorm. Full preset: so400m-patch14-384
(hidden 1152, 27 layers, 16 heads, MLP 4304; a 384² image gives 27² = 729 tokens).

Positions, two switchable sources (``VisionConfig.rope`` / ``absolute_positions``):

* **2D-RoPE** (``xoron_dist.model.common.rope_nd``) over each patch's (row, col): attention depends only
  on patch offsets, so any aspect ratio and resolution works without a table.
* **Learned absolute positions**, SigLIP's (grid × grid) table, resized bicubically
  (align_corners=False, as HF's ``interpolate_pos_encoding``) to each image's patch grid.

``rope: false, absolute_positions: true`` is exactly SigLIP (the oracle test checks an imported
HF checkpoint to 1e-4); both on is the default for training at native resolution.

Native resolution (NaViT / SigLIP-2 NaFlex): ``prepare_images`` resizes each image, keeping its
aspect ratio, to the largest patch grid of at most ``max_patches`` patches; a batch of different
grids is padded to the longest patch sequence, and a key mask stops padded patches from
influencing real ones (an image's features are the same alone or batched next to a larger one).

**Dual-stream (symmetric) attention.** The seed names it for the vision encoder and, "SD3/Flux
style", for the image generator. Its faithful meaning is SD3's MMDiT block (Esser et al. 2024,
§3.2): two token streams keep separate weights (norms, q/k/v/out projections, MLP) and attend
*jointly* over their concatenation, each stream reading the other symmetrically. A vision encoder
has one input stream, so the second stream here is a set of ``latent_tokens`` learned tokens
(registers / TiTok's latent tokens, which read the image): with ``dual_stream: true`` they get
their own weights (MMDiT); with ``dual_stream: false`` they share the patch weights (a single
stream, as ViT registers and TiTok do). The patch stream keeps SigLIP's weights either way, but
the joint attention lets patches attend to the new tokens, which changes an imported
checkpoint's features; hence both are off by default (``latent_tokens: 0``).

**After the blocks** (``compressor.py``, the seed's path; each part off at 0, and then the output is
the patch features above, bit for bit): ``dual_stream_layers`` symmetric two-stream blocks over the
patch grid, then a TiTok-style compressor to ``compressor_tokens`` 1D tokens, which take the place
of the patches in ``VisionOutput.features`` (the projector reads them), and optionally TiTok's
reconstruction as ``VisionOutput.aux_loss``.

Tensor parallelism (``sharding.py``): q/k/v and fc1 are column layers (heads and MLP units split,
their biases alike); out_proj and fc2 are row layers (partial sums reduced, then the whole bias
added once). Norms, patch embedding and position tables stay whole. A block reads the number of
heads it holds off its q projection. HF SigLIP checkpoints import through ``siglip.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.init import init_weights_
from xoron_dist.model.common.rope_nd import grid_coords
from xoron_dist.model.vision.blocks import VisionTransformer
from xoron_dist.utils.host_syncs import mask_lengths, prefix_mask, upload

IMAGE_MEAN = 0.5  # SigLIP normalises every channel with mean 0.5, std 0.5 (pixels to [-1, 1])
IMAGE_STD = 0.5


# --------------------------------------------------------------------------- preprocessing


def patch_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The largest (rows, cols) patch grid of at most ``max_patches`` with the image's aspect ratio."""
    scale = (max_patches * patch * patch / (height * width)) ** 0.5
    rows, cols = max(1, round(height * scale / patch)), max(1, round(width * scale / patch))
    while rows * cols > max_patches:  # rounding up (or the 1-patch floor) can overshoot: shrink the longer side
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def prepare_images(images: list[torch.Tensor] | torch.Tensor, cfg: VisionConfig,
                   device: torch.device | None = None) -> list[torch.Tensor]:
    """Images -> normalised float pixels, one (3, H, W) per image, sized for the tower.

    ``images``: a list of uint8 (H, W, 3) RGB images (``PackedBatch.images``), resized by
    ``cfg.resize`` (``native``: aspect kept, H and W multiples of the patch, at most
    ``max_patches`` patches; ``square``: ``image_size``² like SigLIP) and scaled to [-1, 1];
    or a float tensor (batch, 3, H, W) of pixels already normalised (HF ``pixel_values``),
    used as is. ``device``: where to resize (the tower's device; default: where each image is).
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"float pixel values must be (batch, 3, height, width); got {tuple(images.shape)}")
        return list(images.to(device) if device is not None else images)
    out = []
    for index, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {index}: expected uint8 (height, width, 3) RGB; got {image.dtype} "
                             f"{tuple(image.shape)}")
        pixels = image.to(device).permute(2, 0, 1).float().div(255.0)
        height, width = pixels.shape[1:]
        if cfg.resize == "square":
            size = (cfg.image_size, cfg.image_size)
        else:
            rows, cols = patch_grid(height, width, cfg.patch_size, cfg.max_patches)
            size = (rows * cfg.patch_size, cols * cfg.patch_size)
        if size != (height, width):
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False,
                                   antialias=True)[0].clamp(0, 1)
        out.append((pixels - IMAGE_MEAN) / IMAGE_STD)
    return out


def patchify(pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) -> patches (rows*cols, 3*patch*patch) in (channel, y, x) order, and (rows, cols).

    A remainder of fewer than ``patch`` pixels at the bottom/right is dropped, like SigLIP's
    stride-p "valid" convolution (384 px with patch 14: 27 patches, 6 px dropped).
    """
    channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    if not rows or not cols:
        raise ValueError(f"image of {height}x{width} px is smaller than one {patch}x{patch} patch")
    x = pixels[:, : rows * patch, : cols * patch].reshape(channels, rows, patch, cols, patch)
    return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, channels * patch * patch), (rows, cols)


def resize_positions(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A square (grid*grid, hidden) learned position table resized bicubically to (rows*cols, hidden)."""
    grid = int(round(table.shape[0] ** 0.5))
    if (rows, cols) == (grid, grid):
        return table
    square = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(rows * cols, -1)


# --------------------------------------------------------------------------- the tower


class VisionOutput(NamedTuple):
    """``features`` (batch, tokens, hidden): patch features, rows padded to the longest image, or with
    the compressor on its (batch, compressor_tokens, hidden) 1D tokens; ``mask`` (batch, tokens) True =
    a real token (padded rows are zero); ``grids`` (batch, 2) each image's (rows, cols) patch grid
    (row-major in ``features`` when they are patches); ``latents`` (batch, L, hidden) the latent
    tokens' outputs, or None; ``aux_loss`` TiTok's reconstruction loss summed over the images, each
    image's own loss once, unweighted (``reconstruction_weight`` > 0, in training), or None. A named
    tuple, not a dataclass: DeepSpeed's ZeRO-3 finds the tensors of a module's output (to re-gather its
    weights for backward) only in tuples, lists, dicts."""

    features: torch.Tensor
    mask: torch.Tensor
    grids: torch.Tensor
    latents: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

    def per_image(self) -> list[torch.Tensor]:
        """The real tokens of each image: a list of (rows*cols, hidden) patches (or (k, hidden) tokens)."""
        counts = mask_lengths(self.mask)
        return [feats[:count] for feats, count in zip(self.features, counts, strict=True)]


class VisionTower(nn.Module):
    """SigLIP-2 style ViT: images in, patch features (+ mask and grids) out. See the module docstring."""

    aux_objective = "reconstruction"  # the step's objective whose item sum ``VisionOutput.aux_loss`` is

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch_dim = 3 * cfg.patch_size * cfg.patch_size
        self.patch_embed = nn.Linear(patch_dim, cfg.hidden_size)
        grid = cfg.image_size // cfg.patch_size
        self.position_embedding = (nn.Parameter(torch.zeros(grid * grid, cfg.hidden_size))
                                   if cfg.absolute_positions else None)
        self.latent_embedding = (nn.Parameter(torch.zeros(cfg.latent_tokens, cfg.hidden_size))
                                 if cfg.latent_tokens else None)
        self.encoder = VisionTransformer(cfg)
        # The seed's path after the tower (``compressor.py``); absent at 0, so the tower's checkpoints keep
        # their names. Imported here: compressor.py and titok.py build on this file's blocks.
        from xoron_dist.model.vision.compressor import DualStreamLayers, LatentCompressor
        from xoron_dist.model.vision.decoder import TiTokDecoder

        self.dual_stream = DualStreamLayers(cfg) if cfg.dual_stream_layers else None
        self.compressor = LatentCompressor(cfg) if cfg.compressor_tokens else None
        self.reconstruction = TiTokDecoder(cfg, cfg.hidden_size) if cfg.reconstruction_weight else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights_(self, self.cfg.init_std)
        queries = self.compressor.queries if self.compressor is not None else None
        for table in (self.position_embedding, self.latent_embedding, queries):
            if table is not None:
                nn.init.normal_(table, std=self.cfg.init_std)
        if self.reconstruction is not None:
            self.reconstruction.reset_decoder()

    @property
    def num_tokens(self) -> int:
        """Patch tokens of a ``image_size``² image (SigLIP so400m-patch14-384: 729)."""
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def embed(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised (3, H, W) images -> tokens (batch, n, hidden) padded, coords (batch, n, 2),
        mask (batch, n), grids (batch, 2)."""
        weight = self.patch_embed.weight
        patched = [patchify(image.to(device=weight.device, dtype=weight.dtype), self.cfg.patch_size)
                   for image in pixels]
        grids = [grid for _, grid in patched]
        # one patch_embed call for the whole batch, however many images: ZeRO-3 gathers a module's weights
        # around each of its calls, which every data-parallel rank must then make equally often
        embedded = self.patch_embed(torch.cat([patches for patches, _ in patched]))
        rows_of = list(embedded.split([patches.shape[0] for patches, _ in patched]))
        if self.position_embedding is not None:
            rows_of = [t + resize_positions(self.position_embedding, *grid) for t, grid in zip(rows_of, grids,
                                                                                                strict=True)]
        longest = max(t.shape[0] for t in rows_of)
        batch = len(rows_of)
        tokens = weight.new_zeros(batch, longest, self.cfg.hidden_size)
        coords = torch.zeros(batch, longest, 2, dtype=torch.long, device=weight.device)
        for i, (t, grid) in enumerate(zip(rows_of, grids, strict=True)):
            tokens[i, : t.shape[0]] = t
            coords[i, : t.shape[0]] = grid_coords(*grid, device=weight.device)
        mask = prefix_mask([t.shape[0] for t in rows_of], longest, weight.device)  # read on its host copy
        return tokens, coords, mask, upload(grids, dtype=torch.long, device=weight.device)

    def forward(self, images: list[torch.Tensor] | torch.Tensor, patches_only: bool = False) -> VisionOutput:
        """``images``: a list of uint8 (H, W, 3) RGB images, or float pixels (batch, 3, H, W) already
        normalised (see ``prepare_images``). The understanding path: the tower's blocks, then (when on)
        the dual-stream layers, the compressor and the reconstruction loss; ``patches_only``: the
        blocks' patch features alone (``encode_patches``)."""
        patches, coords, pixels = self._patches(images)
        if patches_only:
            return patches
        features, tokens_mask = self.after_blocks(patches.features, coords, patches.mask)
        grids, latents = patches.grids, patches.latents
        aux_loss = None
        if self.reconstruction is not None and self.training:  # a training objective: inference skips the decoder
            from xoron_dist.model.vision.compressor import reconstruction_target

            target = reconstruction_target(pixels, self.cfg.titok_image_size).to(features.dtype)
            # the decoder's loss is a mean over equal-size images (and their equal token counts): times the
            # count, the sum of each image's own loss; the step weighs and averages it (objective
            # ``reconstruction``, ``xoron_dist.train.objectives``)
            aux_loss = len(pixels) * self.reconstruction.reconstruct(features, target).loss
        return VisionOutput(features, tokens_mask, grids, latents, aux_loss)

    def encode_patches(self, images: list[torch.Tensor] | torch.Tensor) -> VisionOutput:
        """The tower's blocks alone (as ``forward`` with the seed's path off): patch features, whatever
        ``dual_stream_layers`` / ``compressor_tokens`` say. For callers that need the patch grid (video
        frames through the tower). Through ``__call__``, so hooks on the tower (ZeRO-3's gathering of
        its own parameters, the position table) run as for any forward."""
        return self(images, patches_only=True)

    def _patches(self, images: list[torch.Tensor] | torch.Tensor) -> tuple[VisionOutput, torch.Tensor,
                                                                            list[torch.Tensor]]:
        """-> (patch output, coords (batch, n, 2), the normalised pixels)."""
        if len(images) == 0:
            raise ValueError("the vision tower got no images")
        pixels = prepare_images(images, self.cfg, self.patch_embed.weight.device)
        tokens, coords, mask, grids = self.embed(pixels)
        latents = None
        if self.latent_embedding is not None:
            latents = self.latent_embedding.expand(tokens.shape[0], -1, -1)
        features, latents = self.encoder(tokens, coords, mask, latents)
        return VisionOutput(features * mask[..., None], mask, grids, latents), coords, pixels

    def after_blocks(self, features: torch.Tensor, coords: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seed's path after the tower's blocks: patch features (batch, n, hidden) (zero at padding),
        coords (batch, n, 2), mask (batch, n) (None: every patch real) -> what the projector reads and
        its mask: the dual-stream layers' patches, then the compressor's (batch, k, hidden) tokens (all
        real); as given when off."""
        if self.dual_stream is not None:
            features = self.dual_stream(features, coords, mask)
            features = features if mask is None else features * mask[..., None]
        if self.compressor is None:
            return features, mask
        compressed = self.compressor(features, coords, mask)
        return compressed, torch.ones(compressed.shape[:2], dtype=torch.bool, device=compressed.device)
