"""``model.speech``: speech generation and the codec's decoder (needs ``model.audio``, whose tokenizer
and residual VQ are the codec's encoder).

    vocoder       BigVGAN-v2 generator from the codec's latent frames to 16 kHz samples, and the
                  multi-period / multi-resolution discriminators it trains against (``codec`` objective)
    speaker       ECAPA-TDNN over a learned filterbank: a reference clip -> one voice vector
    text_encoder  the TTS text encoder (Conformer over the LLM's hidden states of the prompt)
    decoder       the TTS velocity network (Conformer over latent frames; rectified flow)

The vocoder's upsampling rates are the codec's strides reversed (``model.audio.codec_strides``), so
one latent frame always decodes to exactly ``hop`` samples; nothing here can make them disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xoron_dist.config.checks import non_negative, positive
from xoron_dist.config.model import ConformerConfig
from xoron_dist.utils.typed_config import field_error


def _small_conformer() -> ConformerConfig:
    return ConformerConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024, kv_lora_rank=64,
                           qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)


@dataclass
class VocoderConfig:
    """BigVGAN-v2 (``xoron_dist.model.speech.bigvgan``) and its GAN training. ``channels`` is NVIDIA's
    ``upsample_initial_channel`` (halved per upsampling stage). Generator loss (BigVGAN-v2):
    ``adversarial + fm_weight * 2 * feature matching + mel_weight * multi-scale log-mel L1``; the
    discriminators' LSGAN loss joins the same backward (the generator's audio detached for it, the
    discriminators' weights detached for the generator's terms), so one optimizer step trains both.
    ``speaker_conditioned``: the generator also reads the speaker encoder's voice vector (timbre the
    codec's few bits per frame cannot carry; zero-shot cloning needs it)."""

    channels: int = 512
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    activation: Literal["snakebeta", "snake"] = "snakebeta"
    discriminator_scale: float = 1.0  # channel multiplier of both discriminators (NVIDIA's widths at 1)
    segment_samples: int = 8000  # the codec trains on one crop of this many samples per clip (HiFi-GAN: 8192)
    mel_weight: float = 15.0
    fm_weight: float = 1.0  # on top of the x2 HiFi-GAN folds into its feature-matching loss
    adversarial: bool = True  # False: spectral loss only (a quick codec warm-up)
    # BigVGAN reads a voice vector besides the latents (``model.speech.vocoder``'s docstring): the speaker
    # encoder's embedding of the clip in codec training, of the reference clip at generation
    speaker_conditioned: bool = True
    # the speaker-consistency loss (YourTTS): 1 - cos(speaker encoder of the generated segment, of the real
    # one), its gradient to BigVGAN only; two speaker-encoder passes per segment. Without it BigVGAN learned
    # to ignore the voice vector (bench.audio_codec); 0 turns it off (the tiny preset: 80 ms segments)
    speaker_weight: float = 5.0
    # the neural source-filter excitation (``xoron_dist.model.speech.pitch``): BigVGAN predicts f0 and voicing
    # per frame from the latents and adds a harmonic excitation at that pitch to every upsampling stage (in codec
    # training driven by the pitch tracked on the real segment); 0 harmonics: none. On by default: on the bench
    # codec (bench.audio_codec / audio_tts, two seeds each) it cut the resyntheses' pitch error from 31-53 % to
    # 13-28 % and the TTS's voice cloning by Resemblyzer among the codec's voices rose from 0.25-0.27 to 0.36-0.41
    # (chance 0.125), re-recognition no worse. pitch_weight: the predictor's loss (log-f0 L1 + voicing BCE);
    # 20: predicted pitch 8.5 % off the real one (median) vs 14.7 % at 5
    source_harmonics: int = 8
    pitch_weight: float = 20.0
    # a DDSP harmonic branch beside the source (``pitch.HarmonicEnvelope``): per-frame amplitudes of this many
    # harmonics of the source's pitch, read from the latents, their sum added to BigVGAN's output, trained against
    # the real segment's harmonic amplitudes at the tracked pitch (envelope_weight: that ln-amplitude L1), so the
    # latents learn to carry the formants; 0: none (needs source_harmonics). On by default: over three bench codec
    # seeds Resemblyzer placed their resyntheses with the real voices (SIM-o) at 0.25-0.41 vs 0.11-0.16 without,
    # and the TTS's generated vowels at 0.19-0.27 vs 0.14-0.19 (chance 0.125), at a spectral-distance cost
    # (MR-STFT 2.30-2.38 vs 1.82-2.05: the predicted pitch, 11-14 % off, drives its harmonics)
    envelope_harmonics: int = 48
    envelope_weight: float = 5.0
    # a pitch code beside the residual VQ's tokens (``pitch.pitch_code``): the pitch tracked on the audio, in this
    # many log-f0 levels from f0_min to f0_max (plus unvoiced), rides in two more channels of every latent frame;
    # BigVGAN's source plays it, its predictor learns the pitch from the latents with the code zeroed (it writes the
    # code of generated latents with model.speech.pitch_code_from=vocoder). 0: none, BigVGAN predicts the pitch from
    # the latents (which carry the voice's mean pitch, not its contour: a probe reads it at 22-26 % error,
    # bench.audio_codec). Needs source_harmonics. Off by default: at 128 levels the codec is better (two seeds:
    # MR-STFT 1.71-1.83 vs 2.30-2.36, resyntheses' pitch 0.5 % off), but generated speech clones no better (at best,
    # pitch_code_from=vocoder: Resemblyzer SIM-o 0.27 / 0.27 vs 0.30 / 0.23 at 300 TTS steps; bench.audio_tts)
    pitch_levels: int = 0
    f0_min: float = 60.0  # Hz; the pitch tracker's window (3 hops, speech/pitch.py) must hold a period and more
    f0_max: float = 1000.0

    def validate(self, where: str) -> None:
        positive(self, where, "channels", "discriminator_scale", "segment_samples", "f0_min", "f0_max")
        non_negative(self, where, "mel_weight", "fm_weight", "speaker_weight", "source_harmonics", "pitch_weight",
                     "envelope_harmonics", "envelope_weight", "pitch_levels")
        if self.f0_min >= self.f0_max:
            raise field_error(f"{where}.f0_max", self.f0_max, f"a pitch range above f0_min={self.f0_min} Hz")
        if self.envelope_harmonics and not self.source_harmonics:
            raise field_error(f"{where}.envelope_harmonics", self.envelope_harmonics,
                              "0, or the pitch source on (source_harmonics > 0): the harmonic branch plays its pitch")
        if self.pitch_levels and (self.pitch_levels < 2 or not self.source_harmonics):
            raise field_error(f"{where}.pitch_levels", self.pitch_levels,
                              "0, or at least 2 levels with the pitch source on (source_harmonics > 0): the source "
                              "plays the code")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise field_error(f"{where}.resblock_dilation_sizes", self.resblock_dilation_sizes,
                              f"one list of dilations per resblock kernel ({self.resblock_kernel_sizes})")
        if any(k % 2 == 0 or k < 1 for k in self.resblock_kernel_sizes):
            raise field_error(f"{where}.resblock_kernel_sizes", self.resblock_kernel_sizes,
                              "odd kernels ('same' padding keeps the length)")


@dataclass
class SpeakerConfig:
    """The ECAPA-TDNN speaker encoder (``xoron_dist.model.speech.speaker``) over a learned complex
    band-pass filterbank of the waveform (no mel spectrogram). Defaults: the paper's 512-channel model
    (C = 512, 3C = 1536) and its 192-d embedding."""

    sample_rate: int = 16_000
    filters: int = 80  # learned band-pass filters (the paper's 80 mel bands)
    filter_taps: int = 401  # 25 ms at 16 kHz; odd, so each filter is centred on its frame
    hop: int = 160  # samples per frame: 100 frames/s at 16 kHz
    channels: int = 512  # C of the TDNN and SE-Res2Net layers
    res2net_scale: int = 8  # channel groups of a Res2Net block
    dilations: list[int] = field(default_factory=lambda: [2, 3, 4])  # one SE-Res2Net block per dilation
    se_channels: int = 128  # squeeze-excitation bottleneck
    attention_channels: int = 128  # attentive pooling bottleneck
    embed_dim: int = 192
    min_low_hz: float = 50.0  # SincNet's floor on each filter's lower edge and width
    min_band_hz: float = 50.0

    def validate(self, where: str) -> None:
        for name in ("sample_rate", "filters", "filter_taps", "hop", "channels", "res2net_scale", "se_channels",
                     "attention_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise field_error(f"{where}.{name}", getattr(self, name), f"{name}={getattr(self, name)} must be >= 1")
        if self.filter_taps % 2 == 0:
            raise field_error(f"{where}.filter_taps", self.filter_taps,
                              f"must be odd (filters centred on their frame); use {self.filter_taps + 1}")
        if self.channels % self.res2net_scale:
            raise field_error(f"{where}.channels", self.channels,
                              f"must be divisible by res2net_scale={self.res2net_scale}")
        if not self.dilations or min(self.dilations) < 1:
            raise field_error(f"{where}.dilations", self.dilations, "dilations: a non-empty list of ints >= 1")
        if self.min_low_hz + self.min_band_hz >= self.sample_rate / 2:
            raise field_error(f"{where}.min_low_hz", self.min_low_hz,
                              f"min_low_hz + min_band_hz leaves no band below Nyquist ({self.sample_rate / 2} Hz)")


@dataclass
class SpeechConfig:
    """Speech generation (``xoron_dist.model.speech``): see the module docstring. ``flow_steps``: Euler
    steps of the TTS decoder at generation. ``speaker_dim``: width of the voice vector."""

    enabled: bool = False
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    text_encoder: ConformerConfig = field(default_factory=_small_conformer)
    decoder: ConformerConfig = field(default_factory=_small_conformer)
    flow_steps: int = 16
    # with a pitch code (``vocoder.pitch_levels``): the TTS learns and generates its two channels times this gain
    # (divided out before BigVGAN), so its flow loss weighs them gain² as much as a latent channel
    pitch_code_gain: float = 1.0
    # with a pitch code: the TTS learns its log-f0 position relative to the clip's mean over its voiced frames, and
    # generation adds the reference clip's mean: the voice's pitch level comes from the reference itself
    pitch_code_relative: bool = False
    # with a pitch code: generation takes its channels from the flow's sample ("flow"), the TTS prior's mean ("prior"),
    # the TTS's pitch regression head (``SpeechGenerator.predict_code``, "regression") or BigVGAN's pitch predictor
    # reading the generated latents and the voice ("vocoder", ``Vocoder.predicted_code``)
    pitch_code_from: Literal["flow", "prior", "regression", "vocoder"] = "flow"

    def validate(self, where: str) -> None:
        positive(self, where, "flow_steps", "pitch_code_gain")


__all__ = ["SpeakerConfig", "SpeechConfig", "VocoderConfig"]
