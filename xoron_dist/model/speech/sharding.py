"""Tensor-parallel plan of the speech head: its two Conformers (the TTS text encoder and the velocity
network) split like the audio encoder's (``xoron_dist.model.audio.sharding``: heads, FFN columns/rows).

The vocoder (BigVGAN and its discriminators: convolutions over one waveform channel), the speaker
encoder (TDNN convolutions) and the small projections stay whole on every rank: their inputs are
replicated, so each rank computes the same outputs and gradients.
"""

from __future__ import annotations

from xoron_dist.config import XoronConfig
from xoron_dist.model.audio.sharding import tensor_plan as conformer_plan
from xoron_dist.model.common.sharding import TensorPlan, nest


def tensor_plan(cfg: XoronConfig) -> TensorPlan:
    speech = cfg.model.speech
    return {**nest("tts.encoder", conformer_plan(speech.text_encoder)),
            **nest("tts.velocity", conformer_plan(speech.decoder))}
