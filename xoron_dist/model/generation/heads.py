"""Xoron's image and video generators: the generator rows of the modality table for ``image`` and ``video``.

    training, per micro-batch:
      *_vae           every image / video of the batch (understood or target) ─► autoencoder ─► L1 +
                      spectral + gradient + KL (``model.latents.losses``), summed over items
      text_to_image   every target image: its posterior sample (no gradient to the autoencoder) ─►
      text_to_video   the diffusion scale ─► rectified flow of the MoE-DiT, conditioned on the LLM's
                      states of the request (``model.prompts``), condition dropped for CFG
    generation: request states ─► seeded noise ─► Euler/Heun steps with guidance (video: chunk by chunk
                with the KV cache) ─► autoencoder decoder ─► uint8 pixels

Every random draw (posterior sample, flow time and noise, condition dropout, clean-context prefix)
comes from the item's own generator (``model.common.noise``), so split batches sum to the whole one.
Items are processed one at a time: sizes may differ within a batch, and the per-item losses are
the DiT's own ``flow_loss`` / ``video_flow_loss`` on a batch of one with the item's generator.

Videos train on their first ``video_gen.trainable_frames(T)`` frames: 1 + temporal_factor·k frames
whose latent frames fill whole chunks (8 prepared frames at factor 4 and one-frame chunks: 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.common.noise import NoiseClock, blank_item
from xoron_dist.model.generation.dit import MoEDiT
from xoron_dist.model.generation.flow import euler_sample, flow_loss, heun_sample, time_shift_for
from xoron_dist.model.generation.video_dit import VideoMoEDiT, generate_video, video_flow_loss
from xoron_dist.model.latents import ImageVAE, VAELoss, VideoVAE
from xoron_dist.utils.host_syncs import host_list, mask_lengths, prefix_mask, upload, with_host_copy


def to_pixels(item: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (H, W, 3) or (T, H, W, 3) -> (1, 3, H, W) or (1, 3, T, H, W) in [-1, 1]."""
    x = item.to(device=device, dtype=dtype) / 127.5 - 1.0
    return x.movedim(-1, 0)[None]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, [T,] H, W) in [-1, 1] -> uint8 (n, [T,] H, W, 3)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)


def check_size(height: int, width: int, multiple: int, section: str) -> None:
    if height < 1 or width < 1 or height % multiple or width % multiple:
        near = [max(multiple, side // multiple * multiple) for side in (height, width)]
        raise ValueError(f"{height}x{width} pixels: model.{section} generates sizes that are multiples of {multiple} "
                         f"(the autoencoder's factor times the DiT's patch); e.g. {near[0]}x{near[1]}")


def _own_counts(counts: list[int], device: torch.device) -> list[int]:
    return counts


class _LatentGenerator(nn.Module):
    """What the image and the video generator share: the clock, the autoencoder's loss, the bookkeeping."""

    objectives: tuple[str, str]
    section: str

    def __init__(self, cfg: XoronConfig) -> None:
        super().__init__()
        self.gen_cfg = getattr(cfg.model, self.section)
        self.clock = NoiseClock()
        self.vae_loss = VAELoss(self.gen_cfg.vae.loss)
        # How many autoencoder and flow-network calls a micro-batch makes, given this rank's own counts and
        # device: its own here. Expert parallelism (the DiT experts' all-to-alls) replaces it with the most of
        # any rank of the step (``xoron_dist.parallel.calls``); the extra calls are idle ones, times zero.
        self.agree_calls: Callable[[list[int], torch.device], list[int]] = _own_counts

    def objective_sums(self, encoder, items: list[torch.Tensor], is_target: torch.Tensor | None,
                       request: torch.Tensor, request_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ over the batch's items of the autoencoder loss and over its targets of the flow loss. The
        autoencoder runs on every item, then the flow network on every target, each at least once and as
        often as ``agree_calls`` says: the missing calls run on a blank item (or without a request), times
        zero, so every parameter is in every step and every rank of the step makes the same calls."""
        flags = host_list(is_target) if is_target is not None else [False] * len(items)
        vae_name, flow_name = self.objectives
        targets = sum(flags)
        vae_calls, flow_calls = self.agree_calls([max(len(items), 1), max(targets, 1)], request.device)
        blank = self.blank(request.device)
        encoded = [self.autoencode(item) for item in items]
        idle = [self.autoencode(blank) for _ in range(vae_calls - len(items))]
        vae_total = sum((vae for vae, _ in encoded), 0.0) + sum((0.0 * vae for vae, _ in idle), 0.0)
        flow_total, target = 0.0, 0
        lengths = mask_lengths(request_mask)  # ``prompt_states`` keeps a host copy
        for item, (_, latents), is_gen in zip(items, encoded, flags, strict=True):
            if is_gen:
                length = max(lengths[target], 1)
                mask = with_host_copy(lambda m, i=target, n=length: m[i: i + 1, :n], request_mask)
                flow_total = flow_total + self.flow_sum(item, latents, request[target: target + 1, :length], mask)
                target += 1
        item, latents = (items[-1], encoded[-1][1]) if items else (blank, idle[0][1])
        # an empty request, still in the LLM's graph as a real one is, so an idle call has a real one's graph
        zeros = request.new_zeros(1, 1, request.shape[-1]) + 0.0 * request.sum()
        ones = prefix_mask([1], 1, zeros.device)
        for _ in range(flow_calls - targets):
            flow_total = flow_total + 0.0 * self.flow_sum(item, latents, zeros, ones)
        return {vae_name: vae_total, flow_name: flow_total}

    def cfg_drop(self, item: torch.Tensor, batch: int, p: float, device: torch.device) -> torch.Tensor:
        """(batch,) bool: which samples of the item's flow loss train unconditionally (each with probability
        ``p``), drawn on the host from the item's clock (``NoiseClock.host_random``) and uploaded with their
        host copy, so the DiT counts its text tokens without reading the device."""
        draw = self.clock.host_random(item, salt=3)
        return upload([draw.random() < p for _ in range(batch)], dtype=torch.bool, device=device, keep_host=True)

    def autoencode(self, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The autoencoder loss of one item, and its posterior sample (detached) in the diffusion scale."""
        x = self.prepare(item)
        posterior = self.vae.encode(x)
        eps = self.clock.normal([item], [tuple(posterior.mean.shape)])[0].to(posterior.mean)
        latents = posterior.mean + posterior.std * eps
        loss, _ = self.vae_loss.generator_loss(x, self.vae.decode(latents), posterior)
        return loss, self.vae.to_diffusion(latents.detach())

    def _weights(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.vae.parameters())
        return weight.device, weight.dtype


class ImageGenerator(_LatentGenerator):
    """``model.image_gen``: ``ImageVAE`` + ``MoEDiT`` (see the module docstring)."""

    objectives = ("image_vae", "text_to_image")
    section = "image_gen"

    def __init__(self, cfg: XoronConfig) -> None:
        super().__init__(cfg)
        self.vae = ImageVAE(self.gen_cfg.vae)
        self.dit = MoEDiT(self.gen_cfg.dit)

    def blank(self, device: torch.device) -> torch.Tensor:
        size = self.gen_cfg.pixel_multiple
        return blank_item((size, size, 3), torch.uint8, device)

    def prepare(self, item: torch.Tensor) -> torch.Tensor:
        return to_pixels(item, *self._weights())

    def flow_sum(self, item: torch.Tensor, latents: torch.Tensor, request: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        dit = self.gen_cfg.dit
        tokens = (latents.shape[-2] // dit.patch_size) * (latents.shape[-1] // dit.patch_size)
        losses = flow_loss(self.dit, latents, (request, mask), self.clock.generator(item, salt=1),
                           logit_mean=dit.logit_mean, logit_std=dit.logit_std,
                           shift=time_shift_for(tokens, dit.time_shift),
                           drop=self.cfg_drop(item, latents.shape[0], dit.cfg_dropout, latents.device))
        return losses.sum()

    @torch.no_grad()
    def generate(self, request: torch.Tensor, mask: torch.Tensor, height: int, width: int, *, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, sampler: str | None = None) -> torch.Tensor:
        """-> uint8 images (n, height, width, 3) for n requests (n, L, D) with their mask."""
        g, dit = self.gen_cfg, self.gen_cfg.dit
        check_size(height, width, g.pixel_multiple, self.section)
        factor = g.vae.spatial_factor
        shape = (request.shape[0], dit.latent_channels, height // factor, width // factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(request.device)
        tokens = (shape[2] // dit.patch_size) * (shape[3] // dit.patch_size)
        sample = heun_sample if (sampler or g.sampler) == "heun" else euler_sample
        z = sample(self.dit, shape, (request, mask), generator=torch.Generator(), steps=steps or g.steps,
                   guidance_scale=guidance or g.guidance, shift=time_shift_for(tokens, dit.time_shift),
                   noise=noise.to(self._weights()[1]))
        return to_uint8(self.vae.decode(self.vae.from_diffusion(z)))


class VideoGenerator(_LatentGenerator):
    """``model.video_gen``: ``VideoVAE`` + ``VideoMoEDiT`` (see the module docstring)."""

    objectives = ("video_vae", "text_to_video")
    section = "video_gen"

    def __init__(self, cfg: XoronConfig) -> None:
        super().__init__(cfg)
        self.vae = VideoVAE(self.gen_cfg.vae)
        self.dit = VideoMoEDiT(self.gen_cfg.dit)

    def blank(self, device: torch.device) -> torch.Tensor:
        size = self.gen_cfg.pixel_multiple
        frames = 1 + self.gen_cfg.vae.temporal_factor * (self.gen_cfg.dit.chunk_frames - 1)  # one chunk
        return blank_item((frames, size, size, 3), torch.uint8, device)

    def prepare(self, item: torch.Tensor) -> torch.Tensor:
        usable = self.gen_cfg.trainable_frames(item.shape[0])
        if usable < 1:
            g = self.gen_cfg
            raise ValueError(f"a {item.shape[0]}-frame video is too short for model.video_gen: it needs at least "
                             f"1 + {g.vae.temporal_factor}·({g.dit.chunk_frames} - 1) frames (one chunk of "
                             "dit.chunk_frames latent frames); prepare longer clips (data.prep.video_frames)")
        return to_pixels(item[:usable], *self._weights())

    def flow_sum(self, item: torch.Tensor, latents: torch.Tensor, request: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        drop = self.cfg_drop(item, latents.shape[0], self.gen_cfg.dit.cfg_dropout, latents.device)
        return video_flow_loss(self.dit, latents, (request, mask), self.clock.generator(item, salt=1), drop).sum()

    @torch.no_grad()
    def generate(self, request: torch.Tensor, mask: torch.Tensor, frames: int, height: int, width: int, *,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 sampler: str | None = None) -> torch.Tensor:
        """-> uint8 videos (n, frames, height, width, 3); ``frames`` = 1 + temporal_factor·(latent frames - 1)
        with the latent frames a whole number of chunks."""
        g = self.gen_cfg
        check_size(height, width, g.pixel_multiple, self.section)
        if g.trainable_frames(frames) != frames:
            usable = g.trainable_frames(frames) or 1 + g.vae.temporal_factor * (g.dit.chunk_frames - 1)
            raise ValueError(f"{frames} frames: model.video_gen makes 1 + {g.vae.temporal_factor}·k frames whose "
                             f"{g.vae.temporal_factor}x-compressed latents fill chunks of {g.dit.chunk_frames}; "
                             f"e.g. {usable}")
        factor = g.vae.spatial_factor
        latent_frames = 1 + (frames - 1) // g.vae.temporal_factor
        shape = (request.shape[0], g.dit.latent_channels, latent_frames, height // factor, width // factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(request.device)
        z = generate_video(self.dit, shape, (request, mask), generator=torch.Generator(), steps=steps or g.steps,
                           guidance_scale=guidance or g.guidance, sampler=sampler or g.sampler,
                           noise=noise.to(self._weights()[1]))
        return to_uint8(self.vae.decode(self.vae.from_diffusion(z)))


__all__ = ["ImageGenerator", "VideoGenerator", "check_size", "to_pixels", "to_uint8"]
