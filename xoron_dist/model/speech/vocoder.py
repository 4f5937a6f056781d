"""The codec's decoder and its GAN training: quantised latent frames -> 16 kHz waveform.

    clip segment (n, S) ─► AudioEncoder.tokenizer ─► residual VQ ─► latents (n, S/hop, latent)
        ─► BigVGAN (+ the whole clip's voice vector) ─► y_hat (n, 1, S)
    generator terms   L_adv(MPD, MRD; D's weights detached) + fm · L_fm + mel · multi-scale log-mel L1
    discriminator     L_D(MPD, MRD) on y and y_hat.detach()
    quantiser         codebook + commitment losses of the residual VQ
    pitch             with the pitch source (``source_harmonics``): pitch_weight · (log-f0 L1 + voicing BCE) of
                      BigVGAN's pitch predictor against the pitch tracked on y, which also drives the harmonic
                      source of y_hat (``speech/pitch.py``); with its harmonic branch (``envelope_harmonics``)
                      also envelope_weight · the log-amplitude L1 of the branch's harmonics against y's;
                      with a pitch code (``pitch_levels``) the pitch tracked on y rides in two more latent channels
                      (``Vocoder.frames``) and drives the source, and the predictor learns the pitch from the
                      latents with those channels zeroed (so it can write the code of generated latents)

Both sides of the GAN are summed into one loss and trained by one backward and one optimizer step:
the discriminators see the generator's audio detached (no generator gradient from L_D), and the
generator's terms (L_adv, L_fm) take their gradient with respect to the generated audio at once and
hand it to the generator through a linear term (no discriminator gradient from them:
``Vocoder._generator_terms``), so each side gets exactly the gradient of its own loss, as in HiFi-GAN's
alternating steps taken from the same weights; and every discriminator weight is used through its
module, which ZeRO-3 needs.

Speaker conditioning (``VocoderConfig.speaker_conditioned``, default on): BigVGAN adds a 1x1 map of a
voice vector to its first layer's output at every frame (VITS's global conditioning of HiFi-GAN). At a
codec rate of a few hundred bits per second the latents keep what is said and the pitch contour but not
the timbre (measured: the speaker encoder finds the speaker in 0.09 of resyntheses against 0.64 of the
real clips, ``bench.audio_tts``), so the vocoder hears the voice from the speaker encoder instead: in
codec training its (detached) embedding of the whole clip the segment is cut from, at generation the
reference clip's. The speaker encoder itself learns from the TTS loss and its optional pretraining,
never from the codec's GAN. The unit vector is read times sqrt(dim) (unit RMS components).

The codec trains on one ``segment_samples`` crop per clip (as HiFi-GAN trains on 8192-sample
segments): equal lengths, so every loss is a mean over items and ``n ·`` it is their sum. The crop's
start is drawn per clip and step (``model.common.noise``), the same on every rank and layout, so a
data-parallel step equals the single-rank one. Clips shorter than a segment are zero-padded (the pad
is silence, which the codec must also reproduce).
"""

from __future__ import annotations

import torch
from torch import nn

from xoron_dist.config import AudioConfig
from xoron_dist.config.speech import VocoderConfig
from xoron_dist.model.speech.bigvgan import BigVGANConfig, BigVGANGenerator
from xoron_dist.model.speech.discriminators import MultiPeriodDiscriminator, MultiResolutionDiscriminator
from xoron_dist.model.speech.losses import (
    MultiScaleMelLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from xoron_dist.model.speech.pitch import (
    PITCH_CODE_CHANNELS,
    envelope_loss,
    harmonic_amplitudes,
    pitch_code,
    pitch_loss,
    track_pitch,
)
from xoron_dist.utils.host_syncs import host_list


def bigvgan_config(cfg: VocoderConfig, audio: AudioConfig, voice_dim: int) -> BigVGANConfig:
    """The generator for ``model.audio``'s codec: latent_dim in (+ the pitch code's channels with
    ``cfg.pitch_levels``), the codec's strides reversed as rates, conditioned on a ``voice_dim`` vector when
    ``cfg.speaker_conditioned``."""
    code = PITCH_CODE_CHANNELS if cfg.pitch_levels else 0
    return BigVGANConfig(in_channels=audio.latent_dim + code, upsample_rates=tuple(reversed(audio.codec_strides)),
                         upsample_initial_channel=cfg.channels,
                         resblock_kernel_sizes=tuple(cfg.resblock_kernel_sizes),
                         resblock_dilation_sizes=tuple(tuple(d) for d in cfg.resblock_dilation_sizes),
                         activation=cfg.activation, sample_rate=audio.sample_rate,
                         cond_channels=voice_dim if cfg.speaker_conditioned else 0,
                         source_harmonics=cfg.source_harmonics,
                         envelope_harmonics=cfg.envelope_harmonics, pitch_code=bool(code), f0_min=cfg.f0_min,
                         f0_max=cfg.f0_max)


# BigVGAN options whose size a saved generator's tensors tell: option -> (tensor under the generator, the dimension
# holding it); no such tensor: the option was off. What was saved before an option's default changed does not name it.
SIZED_BY_TENSOR = {"source_harmonics": ("source.merge.weight", 1), "envelope_harmonics": ("envelope.out.weight", 0)}


def saved_vocoder_sizes(state: dict[str, torch.Tensor], prefix: str = "speech.vocoder.generator.") -> dict[str, int]:
    """``SIZED_BY_TENSOR``'s options as the BigVGAN saved under ``prefix`` in ``state`` has them, {} when none is."""
    if not any(key.startswith(prefix) for key in state):
        return {}
    return {option: state[prefix + name].shape[dim] if prefix + name in state else 0
            for option, (name, dim) in SIZED_BY_TENSOR.items()}


def crop_segments(samples: torch.Tensor, lengths: torch.Tensor, segment: int, starts: list[int]) -> torch.Tensor:
    """samples (n, longest) float, lengths (n,) -> (n, segment): clip i from ``starts[i]`` (clamped to
    the clip), zero-padded when the clip is shorter than a segment."""
    out = samples.new_zeros(samples.shape[0], segment)
    for i, (length, start) in enumerate(zip(host_list(lengths), starts, strict=True)):
        start = max(0, min(start, length - segment))
        take = min(segment, length)
        out[i, :take] = samples[i, start: start + take]
    return out


class Vocoder(nn.Module):
    """BigVGAN generator + both discriminators + the mel loss (see the module docstring)."""

    def __init__(self, cfg: VocoderConfig, audio: AudioConfig, voice_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = BigVGANGenerator(bigvgan_config(cfg, audio, voice_dim))
        self.mpd = MultiPeriodDiscriminator(channel_mult=cfg.discriminator_scale)
        self.mrd = MultiResolutionDiscriminator(channel_mult=cfg.discriminator_scale)
        self.mel = MultiScaleMelLoss(audio.sample_rate)

    @property
    def hop(self) -> int:
        return self.generator.hop_length

    @property
    def conditioned(self) -> bool:
        """Whether the generator reads a voice vector (``VocoderConfig.speaker_conditioned``)."""
        return self.generator.cond is not None

    @property
    def pitched(self) -> bool:
        """Whether the generator has the source-filter excitation (``VocoderConfig.source_harmonics``)."""
        return self.generator.source is not None

    @property
    def frame_dim(self) -> int:
        """Channels of a latent frame as BigVGAN and the TTS see it: the codec's latents + the pitch code's."""
        return self.generator.cfg.in_channels

    def track(self, samples: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``pitch.track_pitch`` of ``samples`` (n, S) zero-padded or cut to frames · hop samples: f0 and voiced,
        (n, frames), one value per latent frame, over the vocoder's pitch range."""
        hop, cfg = self.hop, self.cfg
        samples = samples[:, : frames * hop]
        padded = torch.nn.functional.pad(samples.float(), (0, frames * hop - samples.shape[1]))
        return track_pitch(padded, hop, self.generator.cfg.sample_rate, cfg.f0_min, cfg.f0_max)

    def frames(self, latents: torch.Tensor, samples: torch.Tensor,
               tracked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The codec's latents (n, F, latent_dim) of the clips ``samples`` (n, S) -> the frames BigVGAN decodes and
        the TTS generates (n, F, ``frame_dim``): the latents, and with a pitch code (``cfg.pitch_levels``) its
        channels of the pitch tracked on the clips (``track``, or ``tracked`` when the caller has it)."""
        if not self.cfg.pitch_levels:
            return latents
        f0, voiced = tracked if tracked is not None else self.track(samples, latents.shape[1])
        return torch.cat([latents, self.pitch_channels(f0, voiced).to(latents.dtype)], dim=-1)

    def pitch_channels(self, f0: torch.Tensor, voiced: torch.Tensor) -> torch.Tensor:
        """f0 (Hz) and voiced (n, frames) -> the pitch code's channels (n, frames, 2) fp32 in ``cfg.pitch_levels``
        levels (``pitch.pitch_code``)."""
        return pitch_code(f0, voiced, self.cfg.pitch_levels, self.cfg.f0_min, self.cfg.f0_max)[1]

    def predicted_code(self, frames: torch.Tensor, voice: torch.Tensor | None) -> torch.Tensor:
        """Frames (n, F, frame_dim) with a pitch code -> the same frames with the code's channels written from
        BigVGAN's pitch predictor (reading the other channels and the voice: ``BigVGANGenerator.predict_pitch``),
        where a TTS does not make the code itself (``model.speech.pitch_code_from=vocoder``)."""
        log_f0, voicing = self.predict_pitch(frames, voice)
        code = self.pitch_channels(log_f0.exp(), voicing > 0)
        return torch.cat([frames[..., :-PITCH_CODE_CHANNELS], code.to(frames.dtype)], dim=-1)

    def decode(self, latents: torch.Tensor, voice: torch.Tensor | None = None,
               pitch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """latents (n, frames, frame_dim) (``frames``), voice (n, voice_dim) unit vectors when ``conditioned``
        (None otherwise) -> waveform (n, frames · hop) in [-1, 1]. The voice is read at unit RMS per component.
        ``pitch``: (f0, voiced) (n, frames) to drive the source (codec training); None: the latents' pitch code
        or BigVGAN's prediction."""
        return self.generator(latents.transpose(1, 2), _unit_rms(voice), pitch).squeeze(1)

    def source_sum(self, latents: torch.Tensor, voice: torch.Tensor | None, real: torch.Tensor,
                   tracked: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The source's losses on latents (n, frames, frame_dim) against the real segments (n, S), summed over
        them: pitch_weight · the pitch predictor's (``pitch.pitch_loss``, against the pitch tracked on them; with a
        pitch code the predictor reads the latents without it) and, with the harmonic branch, envelope_weight · its
        amplitudes' (``pitch.envelope_loss``, against the segments' harmonic amplitudes at that pitch). Returns (loss,
        (f0, voiced)) so the caller can drive the source with the same tracked pitch (None with a pitch code: the
        latents carry it). ``tracked``: the pitch of ``real`` when the caller has tracked it already (``track``)."""
        sample_rate = self.generator.cfg.sample_rate
        f0, voiced = tracked if tracked is not None else self.track(real, latents.shape[1])
        total = latents.new_zeros((), dtype=torch.float32)
        if self.generator.pitch is not None:
            total = total + self.cfg.pitch_weight * pitch_loss(*self.predict_pitch(latents, voice), f0, voiced).sum()
        if self.generator.envelope is not None and self.cfg.envelope_weight:
            target, counts = harmonic_amplitudes(real, f0, voiced, self.cfg.envelope_harmonics, self.hop, sample_rate)
            predicted = self.generator.predict_envelope(latents.transpose(1, 2), _unit_rms(voice))
            total = total + self.cfg.envelope_weight * envelope_loss(predicted, target, counts).sum()
        return total, None if self.cfg.pitch_levels else (f0, voiced)

    def predict_pitch(self, latents: torch.Tensor,
                      voice: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (n, frames, frame_dim) and voice as for ``decode`` -> BigVGAN's predicted log f0 (Hz) and voicing
        logits, (n, frames) fp32: the pitch ``decode`` gives its source when none is passed (with a pitch code, what
        the predictor reads in the latents with the code zeroed; the code itself drives the source)."""
        return self.generator.predict_pitch(latents.transpose(1, 2), _unit_rms(voice))

    def gan_losses(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """fake, real (n, 1, S) -> the batch-mean terms: ``mel``, ``adversarial``, ``feature``, ``discriminator``."""
        terms = {"mel": self.mel(fake, real)}
        if not self.cfg.adversarial:
            return terms
        adversarial, feature, critic = 0.0, 0.0, 0.0
        for disc in (self.mpd, self.mrd):
            real_logits, real_maps = disc(real)
            fake_logits_d, _ = disc(fake.detach())
            critic = critic + discriminator_loss(real_logits, fake_logits_d)
            adv, feat = self._generator_terms(disc, fake, [[m.detach() for m in maps] for maps in real_maps])
            adversarial, feature = adversarial + adv, feature + feat
        terms.update(adversarial=adversarial, feature=feature, discriminator=critic)
        return terms

    def _generator_terms(self, disc: nn.Module, fake: torch.Tensor,
                         real_maps: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """L_adv and L_fm of one discriminator set on ``fake``, whose gradient reaches the generator only.

        The discriminator runs on a detached copy of ``fake``; the gradient of L_adv + fm · L_fm with
        respect to that copy is taken at once, and a linear term fake · g (value 0, gradient g) carries it
        to the generator in the one backward. The discriminator's weights are ordinary module weights all
        the way, so ZeRO-3 gathers them as for any call (detached weight copies handed to
        ``torch.func.functional_call``, the obvious alternative, bypass its gathering)."""
        probe = fake.detach().requires_grad_(torch.is_grad_enabled())
        logits, maps = disc(probe)
        adversarial, feature = generator_adversarial_loss(logits), feature_matching_loss(real_maps, maps)
        if not torch.is_grad_enabled():
            return adversarial, feature
        (grad,) = torch.autograd.grad(adversarial + self.cfg.fm_weight * feature, probe)
        link = (fake * grad).sum()
        return adversarial.detach() + (link - link.detach()), feature.detach()

    def speaker_consistency(self, speaker: nn.Module, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Batch mean of 1 - cos(speaker(fake), speaker(real)) over (n, 1, S) segments (YourTTS's speaker
        consistency loss, Casanova et al. 2022, arXiv:2112.02418), its gradient reaching the generator only:
        the speaker encoder is the fixed judge, as the discriminators are for ``_generator_terms``, and is
        trained the same way (a detached probe, the gradient taken at once and carried by a linear term)."""
        with torch.no_grad():
            target = speaker(real.squeeze(1))
        probe = fake.detach().squeeze(1).requires_grad_(torch.is_grad_enabled())
        loss = (1 - (speaker(probe) * target).sum(-1)).mean()
        if not torch.is_grad_enabled():
            return loss
        (grad,) = torch.autograd.grad(loss, probe)
        link = (fake.squeeze(1) * grad).sum()
        return loss.detach() + (link - link.detach())

    def loss_sum(self, fake: torch.Tensor, real: torch.Tensor, quantizer_loss: torch.Tensor) -> torch.Tensor:
        """The codec objective summed over the n segments: n · (mel · L_mel + L_adv + fm · L_fm + L_D + VQ)."""
        terms = self.gan_losses(fake, real)
        total = self.cfg.mel_weight * terms["mel"] + quantizer_loss
        if self.cfg.adversarial:
            total = total + terms["adversarial"] + self.cfg.fm_weight * terms["feature"] + terms["discriminator"]
        return total * fake.shape[0]


def _unit_rms(voice: torch.Tensor | None) -> torch.Tensor | None:
    """A unit voice vector (n, d) -> unit RMS per component (x sqrt(d)), as BigVGAN reads it."""
    return None if voice is None else voice * voice.shape[-1] ** 0.5


__all__ = ["SIZED_BY_TENSOR", "Vocoder", "bigvgan_config", "crop_segments", "saved_vocoder_sizes"]
