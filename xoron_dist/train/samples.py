"""Generated samples in TensorBoard every ``train.sample_every`` steps (``samples/<medium>/<i>``).

Each enabled generator turns every prompt of ``train.sample_prompts`` into its medium, laid out as
training lays out a generation request (``prompt <|gen_x|> <|x_start|>``, ``xoron_dist.data.packing``):
images at the prepared image size, videos with the most frames the prepared clips give (shown as
their frames side by side), speech in the voice of a fixed synthetic reference speaker. Fixed seeds,
so the samples of successive steps differ only by training.

Every rank generates (tensor- and expert-parallel layers communicate inside the forward; under ZeRO-3
the generators' weights are gathered whole on every rank for each sample, ``parallel.zero``), rank 0
writes. The model is put in eval mode for the samples and back in training mode after; the time is left
out of the throughput.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.modalities import BY_NAME, generated
from xoron_dist.parallel.zero import generators_gathered

SEED = 0


def request_ids(tokenizer, prompt: str, medium: str) -> list[int]:
    """The token ids of a generation request for ``medium`` ("image", "video", "audio"): the prompt, then
    ``<|gen_x|> <|x_start|>`` (``Modality.request_tokens``)."""
    return [*tokenizer.encode(prompt), *(tokenizer.token_id(t) for t in BY_NAME[medium].request_tokens())]


def reference_voice(sample_rate: int) -> torch.Tensor:
    """A second of synthetic speaker 0 saying vowels (int16): the reference clip of the speech samples."""
    import random

    from xoron_dist.synth import sounds

    rng = random.Random("tensorboard-reference-voice")
    voice = sounds.SPEAKERS[0]
    wave = sounds.render_events(sounds.sample_vowels(rng, voice, 3), sample_rate,
                                np.random.default_rng(0), voice)
    return torch.from_numpy(np.asarray(wave, dtype=np.int16))


class GenerationSamples:
    """``write(step, model, tb)`` at the steps ``train.sample_every`` names; nothing without generators."""

    def __init__(self, cfg: XoronConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.every = cfg.train.sample_every
        self.media = [row.name for row in generated(cfg)] if cfg.data.source == "arrow" else []

    def due(self, step: int) -> bool:
        return bool(self.every and self.media and step % self.every == 0)

    @torch.no_grad()
    def write(self, step: int, model: nn.Module, tb) -> None:
        was_training = model.training
        model.eval()
        try:
            for i, prompt in enumerate(self.cfg.train.sample_prompts):
                for medium in self.media:
                    with generators_gathered(model):  # per sample: ZeRO-3 may partition them between samples
                        self._sample(medium, i, prompt, step, model, tb)
        finally:
            model.train(was_training)

    def _sample(self, medium: str, index: int, prompt: str, step: int, model: nn.Module, tb) -> None:
        cfg, device = self.cfg, next(model.parameters()).device
        ids = torch.tensor([request_ids(self.tokenizer, prompt, medium)], device=device)
        tag = f"samples/{'speech' if medium == 'audio' else medium}/{index}"
        if medium == "image":
            size = default_image_size(cfg)
            tb.image(tag, model.generate_image(ids, height=size, width=size, seed=SEED)[0].cpu().numpy(), step)
        elif medium == "video":
            frames, size = default_video_shape(cfg)
            clip = model.generate_video(ids, frames=frames, height=size, width=size, seed=SEED)[0]
            tb.image(tag, torch.cat(list(clip), dim=1).cpu().numpy(), step)  # frames side by side
        else:
            rate = cfg.model.audio.sample_rate
            wave = model.generate_speech(ids, speaker_audio=[reference_voice(rate)], seed=SEED)[0]
            tb.audio(tag, wave.float().cpu().numpy(), rate, step)


def default_image_size(cfg: XoronConfig) -> int:
    """The side of generated images unless told: the prepared image size, on the generator's pixel grid."""
    return _fit(cfg.data.prep.image_size, cfg.model.image_gen.pixel_multiple)


def default_video_shape(cfg: XoronConfig) -> tuple[int, int]:
    """(frames, side) of generated videos unless told: the most frames the prepared clips give that the
    generator trains on, at the prepared video size on its pixel grid."""
    gen = cfg.model.video_gen
    frames = gen.trainable_frames(cfg.data.prep.video_frames) or gen.trainable_frames(10 ** 6)
    return frames, _fit(cfg.data.prep.video_size, gen.pixel_multiple)


def _fit(size: int, multiple: int) -> int:
    """``size`` rounded down to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, size // multiple * multiple)


__all__ = ["GenerationSamples", "default_image_size", "default_video_shape", "reference_voice", "request_ids"]
