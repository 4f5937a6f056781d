"""Audio understanding: 16 kHz clips -> Conformer features, and the projector into the LLM's stream.

    clips (int16 samples) ─► [-1, 1] ─► waveform tokenizer (SEANet encoder) ─► latents (n, frames, latent)
        ─► residual VQ (the audio tokens; straight-through) ─► Conformer with RMLA ─► (n, frames, hidden)
        ─► projector: frames pooled into the clip's span of ceil(seconds · data.audio_tokens_per_second)
           tokens (frame f of F to token ⌊f · T / F⌋: contiguous, every token at least one frame) ─► LLM width

``model.audio.understand_from`` picks what the Conformer reads: the quantised latents ("codes", the
default and what earlier checkpoints hold) or the tokenizer's continuous latents ("latents"; the
quantiser still runs and counts code usage, at weight 0 in the graph, and its ids stay the speech
generator's target). With "codes", a collapsed codebook hands the Conformer one vector for every frame.

The span length is the packer's rule (``xoron_dist.model.modalities``); the projector receives it, so
the tokens fill the placeholders exactly. Only real frames reach the quantiser, so padding never
counts as codebook usage. The codec's own training (reconstruction through its BigVGAN decoder) is
an objective of its own; the ASR and caption losses are the LM's loss on the transcript text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from xoron_dist.config import AudioConfig
from xoron_dist.model.audio.codec import ResidualQuantizer, WaveformEncoder
from xoron_dist.model.audio.conformer import ConformerEncoder
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.utils.host_syncs import mask_lengths, on_host, prefix_mask, upload, where_true


class AudioFeatures(NamedTuple):
    """``features`` (n, frames, hidden) zero at padding; ``mask`` (n, frames) True = a real frame.
    A named tuple: ZeRO-3 finds a module's output tensors only in tuples."""

    features: torch.Tensor
    mask: torch.Tensor


def batch_clips(clips: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 (or float) clips of any length -> samples (n, longest) float in [-1, 1], lengths (n,) (with their
    host copy: ``utils.host_syncs.host_list`` reads them without a sync)."""
    if not clips:
        raise ValueError("the audio encoder got no clips")
    sizes = [clip.shape[-1] for clip in clips]  # known on the host: no read of the device tensor below
    lengths = upload(sizes, device=device, keep_host=True)
    samples = torch.zeros(len(clips), max(sizes), device=device)
    for i, clip in enumerate(clips):
        if clip.dim() != 1:
            raise ValueError(f"audio clip {i}: expected mono samples (samples,); got shape {tuple(clip.shape)}")
        clip = clip.to(device)
        samples[i, : clip.shape[0]] = clip.float() / 32768.0 if clip.dtype == torch.int16 else clip.float()
    return samples, lengths


class AudioEncoder(nn.Module):
    """list of (samples,) int16 clips -> ``AudioFeatures``."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = WaveformEncoder(cfg.codec_channels, cfg.codec_strides, cfg.latent_dim)
        self.quantizer = ResidualQuantizer(cfg.latent_dim, cfg.rvq_quantizers, cfg.rvq_codebook_size, cfg.rvq_code_dim,
                                           cfg.rvq_dead_code_share, cfg.rvq_usage_decay)
        self.conformer = ConformerEncoder(cfg.conformer, cfg.latent_dim)

    @property
    def hidden_size(self) -> int:
        return self.cfg.conformer.hidden_size

    @property
    def device(self) -> torch.device:
        return self.tokenizer.conv_in.weight.device

    def tokens(self, clips: list[torch.Tensor], batched: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> quantised latents (n, frames, latent_dim) zero at padding, their ``ResidualQuantized`` over the
        real frames, and the frame mask (n, frames). ``batched``: ``batch_clips(clips, self.device)`` when the
        caller already made it (it needs the samples too)."""
        latents, mask, real, _, quantized = self._quantize_real_frames(clips, batched)
        return _on_frame_grid(latents, real, quantized.latents), quantized, mask

    def _quantize_real_frames(self, clips: list[torch.Tensor],
                              batched: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The tokenizer's frames of ``clips`` (n, frames, latent_dim), their mask (n, frames), the flat
        indices of the real frames, those frames (real, latent_dim) and their ``ResidualQuantized``."""
        samples, lengths = batched if batched is not None else batch_clips(clips, self.device)
        latents = self.tokenizer(samples.to(self.tokenizer.conv_in.weight.dtype), lengths)
        mask, real = self._real_frames(latents, lengths)
        rows = latents.flatten(0, 1).index_select(0, real)
        return latents, mask, real, rows, self.quantizer(rows)

    def _real_frames(self, latents: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame mask (n, frames) and the flat indices of the real frames, whose number comes from the
        lengths' host copy (``batch_clips`` keeps one; so no boolean mask: its size would be read from the
        device)."""
        longest = latents.shape[1]
        frames = on_host(lambda n: self.tokenizer.frames(n).clamp(max=longest).tolist(), lengths)
        mask = prefix_mask(frames, longest, latents.device)  # with its host copy, for the projector's check
        return mask, where_true(mask, sum(frames))

    def forward(self, clips: list[torch.Tensor]) -> AudioFeatures:
        if self.cfg.understand_from == "codes":
            latents, _, mask = self.tokens(clips)
            return AudioFeatures(self.conformer(latents, mask).hidden, mask)
        # "latents": the Conformer reads the tokenizer's continuous frames; the quantiser still runs (its
        # usage feeds the dead-code restarts) and stays in the graph at weight 0 (every parameter takes part)
        latents, mask, real, rows, quantized = self._quantize_real_frames(clips)
        frames = _on_frame_grid(latents, real, rows + 0.0 * quantized.latents)
        return AudioFeatures(self.conformer(frames, mask).hidden, mask)


def _on_frame_grid(latents: torch.Tensor, real: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one per real frame, at flat indices ``real``) back on ``latents``' (n, frames, dim) grid, zero
    at padding."""
    flat = latents.flatten(0, 1)
    return flat.new_zeros(flat.shape).index_copy(0, real, rows).view_as(latents)


class FramePoolProjector(nn.Module):
    """(n, frames, in_dim) features + mask (n, frames) + span lengths (n,) -> (n, longest span, hidden):
    each clip's frames split into its span's tokens in order, averaged, projected (see the module docstring)."""

    def __init__(self, in_dim: int, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.in_proj = empty_linear(in_dim, hidden, bias=True)
        self.norm = RMSNorm(hidden)
        self.out_proj = empty_linear(hidden, hidden)
        with torch.no_grad():
            nn.init.normal_(self.in_proj.weight, std=init_std)
            nn.init.zeros_(self.in_proj.bias)
            nn.init.normal_(self.out_proj.weight, std=init_std)  # on the scale of the token embeddings

    def forward(self, features: torch.Tensor, mask: torch.Tensor, span_lengths: Sequence[int]) -> torch.Tensor:
        have = mask_lengths(mask)  # the encoder's mask keeps its host copy
        for clip, (real, asked) in enumerate(zip(have, span_lengths, strict=True)):
            if asked > real:
                raise ValueError(f"audio clip {clip} has {real} frames but its span asks for {asked} tokens: "
                                 "data.audio_tokens_per_second must not exceed the codec's frame rate "
                                 "(model.audio.sample_rate / prod(codec_strides))")
        frames = mask.sum(1)
        spans = upload(list(span_lengths), device=features.device)
        n, longest = len(span_lengths), max(span_lengths)
        x = self.in_proj(features)
        position = torch.arange(features.shape[1], device=features.device)
        spans, counts = spans[:, None], frames.clamp(min=1)[:, None]
        token = (position[None] * spans // counts).clamp(max=longest - 1)  # a padding frame's: any, it adds 0
        slot = (torch.arange(n, device=position.device)[:, None] * longest + token).flatten()
        real = mask.flatten()  # not a boolean index (its size is read on the host): padding adds zeros
        total = x.new_zeros(n * longest, x.shape[-1]).index_add(0, slot, torch.where(real[:, None], x.flatten(0, 1), 0))
        count = x.new_zeros(n * longest).index_add(0, slot, real.to(x.dtype))
        pooled = (total / count.clamp(min=1)[:, None]).view(n, longest, -1)
        return self.out_proj(self.norm(pooled))


__all__ = ["AudioEncoder", "AudioFeatures", "FramePoolProjector", "batch_clips"]
