"""``SpeechHead``: Xoron's voice, the generator of the audio row (``model.speech``).

    training, per micro-batch (its audio clips, some of them generation targets):
      codec  every clip: a segment ─► the audio encoder's tokenizer + residual VQ ─► BigVGAN (+ the
             clip's voice vector, detached) ─► GAN + mel losses (``vocoder.py``): the tokenizer learns to
             keep what the waveform needs beyond the voice
      tts    every target clip: its codec latents (no gradient to the codec), a voice vector from
             the clip itself (speaker encoder), and the LLM's reading of the request (the states of
             the document's tokens before the clip: ``model.prompts``) ─► prior + MAS + durations +
             rectified-flow losses (``tts.py``)
    generation: request states + a reference clip ─► durations, Euler steps of the velocity field
             ─► latent frames ─► BigVGAN (+ the reference's voice vector) ─► 16 kHz samples

The speaker encoder learns through the TTS loss: the voice vector must tell the decoder what the
text does not (pitch, timbre, breath), and a pooled vector of one clip cannot carry its timing.
Inside Xoron its BatchNorm layers always use their stored statistics (an affine map): batch
statistics would differ between data-parallel ranks and between micro-batch cuts. Pretraining it
on labelled voices (``AAMSoftmaxHead``) is a separate, optional step before loading.

Every parameter takes part in every training forward: without clips, the codec runs on a blank
tenth of a second and the TTS on one blank clip with a zero request, both times zero.
"""

from __future__ import annotations

import torch
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.audio.codec import ResidualQuantizer
from xoron_dist.model.audio.encoder import AudioEncoder, batch_clips
from xoron_dist.model.common.noise import NoiseClock, blank_item
from xoron_dist.model.speech.speaker import SpeakerEncoder
from xoron_dist.model.speech.tts import SpeechGenerator
from xoron_dist.model.speech.vocoder import Vocoder, crop_segments
from xoron_dist.utils.host_syncs import host_list, mask_lengths, prefix_mask, upload

OBJECTIVES = ("codec", "tts")


class SpeechHead(nn.Module):
    def __init__(self, cfg: XoronConfig) -> None:
        super().__init__()
        speech, audio = cfg.model.speech, cfg.model.audio
        self.commitment, self.segment, self.flow_steps = audio.rvq_commitment, speech.vocoder.segment_samples, \
            speech.flow_steps
        self.clock = NoiseClock()  # crops and flow noise per clip and step (``model.common.noise``)
        self.vocoder = Vocoder(speech.vocoder, audio, speech.speaker.embed_dim)
        self.speaker = SpeakerEncoder(speech.speaker)
        self.code_channels, self.code_gain = self.vocoder.frame_dim - audio.latent_dim, speech.pitch_code_gain
        self.code_relative, self.code_from = speech.pitch_code_relative, speech.pitch_code_from
        self.tts = SpeechGenerator(cfg.llm.hidden_size, self.vocoder.frame_dim, speech.speaker.embed_dim,
                                   speech.text_encoder, speech.decoder, self.code_channels)
        self.train()  # the speaker's BatchNorm layers to stored statistics from the start

    def train(self, mode: bool = True) -> SpeechHead:
        super().train(mode)
        for module in self.speaker.modules():  # stored statistics only (see the module docstring)
            if isinstance(module, nn.BatchNorm1d):
                module.eval()
        return self

    def objective_sums(self, encoder: AudioEncoder, clips: list[torch.Tensor], is_target: torch.Tensor | None,
                       request: torch.Tensor, request_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ over this micro-batch's items of each objective's loss: ``codec`` over every clip, ``tts``
        over the targets (``is_target``), whose requests are ``request`` (n_targets, L, D) with
        ``request_mask`` (n_targets, L)."""
        flags = host_list(is_target) if is_target is not None else [False] * len(clips)
        targets = [clip for clip, target in zip(clips, flags, strict=True) if target]
        blank = blank_item((self.segment // 4,), torch.int16, request.device)
        codec = self.codec_sum(encoder, clips) if clips else 0.0 * self.codec_sum(encoder, [blank])
        if targets:
            tts = self.tts_sum(encoder, targets, request, request_mask)
        else:
            zeros = request.new_zeros(1, 1, request.shape[-1])
            tts = 0.0 * self.tts_sum(encoder, [blank], zeros, prefix_mask([1], 1, zeros.device))
        return {"codec": codec, "tts": tts}

    def codec_sum(self, encoder: AudioEncoder, clips: list[torch.Tensor]) -> torch.Tensor:
        """The codec loss summed over one segment of each clip (``vocoder.py``)."""
        device = encoder.tokenizer.conv_in.weight.device
        samples, lengths = batch_clips(clips, device)
        starts = [self.clock.host_random(clip).randrange(max(1, clip.shape[-1] - self.segment + 1)) for clip in clips]
        dtype = encoder.tokenizer.conv_in.weight.dtype
        segments = crop_segments(samples, lengths, self.segment, starts).to(dtype)
        latents = encoder.tokenizer(segments)  # (n, frames, latent), every frame real
        quantized = encoder.quantizer(latents)
        voice = None
        if self.vocoder.conditioned:  # the whole clip's voice; the codec does not train the speaker encoder
            with torch.no_grad():
                voice = self.speaker(samples.to(dtype), lengths)
        tracked = self.vocoder.track(segments, latents.shape[1]) if self.vocoder.pitched else None  # once per step
        frames = self.vocoder.frames(quantized.latents, segments, tracked)  # + the pitch code, when there is one
        pitch, source_term = None, 0.0
        if self.vocoder.pitched:  # the source reads the real segment's pitch (or its code); the predictor learns it
            source_term, pitch = self.vocoder.source_sum(frames, voice, segments, tracked)
        fake = self.vocoder.decode(frames, voice, pitch)[:, None]  # (n, 1, segment)
        vq = quantized.codebook_loss + self.commitment * quantized.commitment_loss
        total = self.vocoder.loss_sum(fake, segments[:, None], vq) + source_term
        if self.vocoder.cfg.speaker_weight:
            consistency = self.vocoder.speaker_consistency(self.speaker, fake, segments[:, None])
            total = total + self.vocoder.cfg.speaker_weight * consistency * len(clips)
        return total

    def tts_sum(self, encoder: AudioEncoder, targets: list[torch.Tensor], request: torch.Tensor,
                request_mask: torch.Tensor) -> torch.Tensor:
        """The TTS losses summed over the target clips. A request longer than its clip's latent frames
        keeps its last ``frames`` tokens (MAS needs a frame per token; the request ends with the text)."""
        samples, lengths = batch_clips(targets, encoder.device)
        latents, _, frame_mask = encoder.tokens(targets, (samples, lengths))
        frames = mask_lengths(frame_mask)  # the encoder's mask keeps its host copy
        request, request_mask = _fit_requests(request, request_mask, frames)
        latents = self.vocoder.frames(latents, samples) * frame_mask[..., None].to(latents.dtype)
        latents = self._to_tts(latents, self._voice_level(latents))
        voice = self.speaker(samples.to(latents.dtype), lengths)
        noise = latents.new_zeros(latents.shape)
        for i, draw in enumerate(self.clock.normal(targets, [(f, latents.shape[-1]) for f in frames], salt=1)):
            noise[i, : frames[i]] = draw.to(noise)
        t = self.clock.uniform(targets, salt=2).to(latents)
        losses = self.tts(request.to(latents.dtype), request_mask, latents, frame_mask, voice, noise=noise, t=t)
        return losses.total().sum()

    def tts_dtype(self) -> torch.dtype:
        """The dtype the TTS and speaker weights compute in (the model's: fp32, or bf16 after a cast)."""
        return next(self.tts.parameters()).dtype

    @torch.no_grad()
    def generate(self, request: torch.Tensor, request_mask: torch.Tensor, speaker_audio: list[torch.Tensor],
                 steps: int | None = None, seed: int = 0, length_scale: float = 1.0,
                 snap_to: ResidualQuantizer | None = None) -> list[torch.Tensor]:
        """Requests (n, L, D) + mask, one reference clip per request (int16 or float samples) -> n float
        waveforms in [-1, 1] at the codec's rate, each ``frames · hop`` samples. Same seed, same output.
        ``length_scale`` multiplies the predicted durations; ``snap_to`` (the codec's quantiser): the
        generated latents are quantised again before BigVGAN (``bench.audio_tts --snap`` measures it)."""
        if len(speaker_audio) != request.shape[0]:
            raise ValueError(f"{request.shape[0]} requests but {len(speaker_audio)} speaker clips: give one "
                             "reference clip per request")
        device = request.device
        samples, lengths = batch_clips(speaker_audio, device)
        dtype = self.tts_dtype()  # the weights' (bf16 after a bf16 cast of the model), as in training
        voice = self.speaker(samples.to(dtype), lengths)
        generator = torch.Generator(device=device).manual_seed(seed)
        latents, frame_mask = self.tts.generate(request.to(dtype), request_mask, voice, steps or self.flow_steps,
                                                generator, length_scale,
                                                "flow" if self.code_from == "vocoder" else self.code_from)
        level = None  # the reference clip's voice level (model.speech.pitch_code_relative)
        if self.code_channels and self.code_relative:
            tracked = self.vocoder.track(samples, -(-samples.shape[1] // self.vocoder.hop))
            level = self._voice_level(self.vocoder.pitch_channels(*tracked))
        latents = self._from_tts(latents, level)
        if self.code_channels and self.code_from == "vocoder":  # BigVGAN's predictor writes the code
            latents = self.vocoder.predicted_code(latents, voice if self.vocoder.conditioned else None)
            latents = latents * frame_mask[..., None].to(latents.dtype)
        if snap_to is not None:  # the codec's latents only, not a pitch code's channels after them
            width = snap_to.in_proj[0].in_features
            snapped = snap_to(latents[frame_mask][:, :width]).latents
            latents = latents.index_put((frame_mask,), torch.cat([snapped, latents[frame_mask][:, width:]], -1))
        waves = self.vocoder.decode(latents, voice if self.vocoder.conditioned else None)
        hop = self.vocoder.hop
        return [waves[i, : int(frame_mask[i].sum()) * hop] for i in range(waves.shape[0])]

    def _voice_level(self, frames: torch.Tensor) -> torch.Tensor | None:
        """With ``model.speech.pitch_code_relative``: the mean log-f0 position of the voiced frames of each clip
        (n,) (0 with none), read from frames (n, F, >= 2) whose last two channels are a pitch code; else None."""
        if not (self.code_channels and self.code_relative):
            return None
        position, voiced = frames[..., -2].float(), (frames[..., -1] > 0).float()
        return (position * voiced).sum(1) / voiced.sum(1).clamp_min(1.0)

    def _to_tts(self, frames: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        """Codec frames (n, F, frame_dim) -> the TTS's view: the pitch code's position less the clip's voice
        level (``_voice_level``; 0 where unvoiced), and both code channels times ``model.speech.pitch_code_gain``.
        Unchanged without a code."""
        if not self.code_channels:
            return frames
        position, voicing = frames[..., -2], frames[..., -1]
        if level is not None:
            position = (position - level[:, None].to(position.dtype)) * (voicing > 0).to(position.dtype)
        code = torch.stack([position, voicing], dim=-1) * self.code_gain
        return torch.cat([frames[..., :-self.code_channels], code], dim=-1)

    def _from_tts(self, frames: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        """The TTS's frames -> codec frames (the inverse of ``_to_tts`` on voiced frames; ``level``: the reference
        clip's voice level)."""
        if not self.code_channels:
            return frames
        position, voicing = frames[..., -2] / self.code_gain, frames[..., -1] / self.code_gain
        if level is not None:
            position = position + level[:, None].to(position.dtype)
        return torch.cat([frames[..., :-self.code_channels], torch.stack([position, voicing], dim=-1)], dim=-1)


def _fit_requests(request: torch.Tensor, mask: torch.Tensor, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-trim each request to at most ``frames`` tokens (see ``SpeechHead.tts_sum``). The lengths are
    read on the mask's host copy (``prompt_states`` keeps one); the trimmed mask keeps its own."""
    lengths = mask_lengths(mask)
    keep = [min(length, max(frame, 1)) for length, frame in zip(lengths, frames, strict=True)]  # an empty one stays
    if keep == lengths:
        return request, mask
    width = request.shape[1]
    new_mask = prefix_mask(keep, width, request.device)
    dropped = upload([length - kept for length, kept in zip(lengths, keep, strict=True)], device=request.device)
    index = (torch.arange(width, device=request.device)[None] + dropped[:, None]).clamp(max=width - 1)
    trimmed = torch.gather(request, 1, index[..., None].expand(-1, -1, request.shape[-1]))
    return trimmed * new_mask[..., None].to(request.dtype), new_mask


__all__ = ["OBJECTIVES", "SpeechHead"]
