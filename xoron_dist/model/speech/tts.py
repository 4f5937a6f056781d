"""Speech generation: text (the LLM's hidden states) + a speaker -> the codec's latent frames.

    text hidden (n, L, D_llm) ─► text_in ─► + speaker ─► text encoder (Conformer, RMLA) ─► h (n, L, d)
        h ─► prior: mean μ, log σ per token (n, L, latent)         (Glow-TTS's Gaussian prior)
        h ─► duration predictor: log(1 + frames) per token          (trained on MAS's durations)
    training: target latents z (n, F, latent) from the codec ─► MAS on log N(z_j; μ_i, σ_i) ─► path
        prior loss  −mean log N(z; μ_path, σ_path)                 (pulls the prior onto the speech)
        duration loss  MSE(predicted log(1+d), log(1+d_MAS))       (text encoding detached, as VITS)
                       + a learned length scale fit to clip totals (``duration_loss``: no Jensen shortfall)
        flow loss  ‖v(x_t, t | μ_path, speaker) − (z − x₀)‖²      (rectified flow, x_t = (1−t)x₀ + t z)
    generation: durations from the predictor ─► μ expanded to frames ─► Euler steps of the velocity
        field from seeded noise ─► latent frames ─► the codec's BigVGAN decoder ─► 16 kHz waveform

Glow-TTS (Kim et al. 2020, arXiv:2005.11129) for the prior, MAS and durations; the decoder is a
rectified flow (Liu et al. 2022, arXiv:2209.03003; flow matching, Lipman et al. 2023) rather than
Glow-TTS's invertible flow: a velocity network over frames is a plain Conformer, trains with one
MSE, and samples in a handful of Euler steps, and the frames it produces are the codec's latents, so
BigVGAN (the codec's decoder) turns them into a waveform without any mel spectrogram. The speaker
embedding (``speaker.py``, from a reference clip: zero-shot cloning) is added to the text encoder's
input and to every frame of the velocity network's input.

With a pitch code (``model.speech.vocoder.pitch_levels``: the frames' last two channels, log-f0 position and
voicing) a regression head also predicts it per token (``predict_code``: from h plus a direct linear map of the
voice vector; ``code_loss``: L1 on the aligned frames, the position on voiced frames only), FastSpeech 2's pitch
predictor; ``generate(code_from=...)`` takes the code from the flow, the prior's mean or that head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import ConformerConfig
from xoron_dist.model.audio.conformer import ConformerEncoder
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.speech.alignment import alignment_mask, durations, gaussian_log_likelihood, maximum_path
from xoron_dist.utils.host_syncs import with_host_copy


@dataclass
class SpeechLosses:
    """Per-clip sums (n,) of the losses (prior NLL per frame and channel; duration: ``duration_loss``;
    flow MSE per frame and channel; with a pitch code, ``pitch``: ``SpeechGenerator.code_loss``), so the trainer
    can average them over a step's clips."""

    prior: torch.Tensor
    duration: torch.Tensor
    flow: torch.Tensor
    pitch: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        total = self.prior + self.duration + self.flow
        return total if self.pitch is None else total + self.pitch


class DurationPredictor(nn.Module):
    """Two conv (k3) → ReLU → LayerNorm layers and a linear head: log(1 + frames) per token (FastSpeech 2 §2.3);
    ``log_rate``: a learned length scale for generation (``duration_loss``)."""

    def __init__(self, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.out = nn.Linear(hidden, 1)
        self.log_rate = nn.Parameter(torch.zeros(1))  # learned length scale e^r (``duration_loss``)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (n, L, hidden), mask (n, L) -> (n, L), zero at padding."""
        x = h * mask[..., None]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = norm(F.relu(conv(x.transpose(1, 2)).transpose(1, 2))) * mask[..., None]
        return self.out(x).squeeze(-1) * mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the learned length scale load as scale 1 (what they generated with)
        state_dict.setdefault(prefix + "log_rate", torch.zeros_like(self.log_rate))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def frames(self, h: torch.Tensor, mask: torch.Tensor, length_scale: float = 1.0) -> torch.Tensor:
        """Whole frames per token (n, L) for generation: round(e^r · length_scale · (exp(pred) − 1)), at least 1."""
        scale = torch.exp(self.log_rate) * length_scale
        return torch.clamp(torch.round(scale * torch.expm1(self(h, mask))), min=1).long()


def duration_loss(predicted: torch.Tensor, log_rate: torch.Tensor, frames: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Per-clip duration loss (n,): predicted (n, L) log(1 + frames) per token, ``log_rate`` (1,) the
    predictor's learned length scale, frames (n, L) MAS's durations, mask (n, L).

    The per-token term is FastSpeech 2's MSE of log(1 + d). Alone it under-predicts a clip's length: its
    optimum per token is E[log(1 + d)], and exp of that mean falls below E[1 + d] by Jensen's inequality, the
    more the less predictable the durations (a token of 1 or 20 frames, equally likely from the text, is
    predicted 5.5 frames, not 10.5). Xoron's generated clips came out 30 % short (``bench.audio_tts``: 42
    predicted vs 60 real frames per held-out clip). The second term fits the scalar ``log_rate`` r, a length
    scale as Glow-TTS's inference knob but learned, so that the scaled durations add up to the clip's T
    frames: (log(1 + e^r Σ_i d̂_i) − log(1 + T))², d̂ = exp(predicted) − 1 with the per-token predictions
    detached (each token keeps learning its own log-duration; the rate alone absorbs the shortfall). A clip's
    total, a sum of many tokens, varies far less than one token's duration, so the Jensen gap this log-domain
    term leaves is small; its gradient stays bounded like the per-token term's (a linear-domain or Poisson
    total would dwarf the other TTS gradients under one clipping norm).
    """
    mask_f = mask.to(predicted.dtype)
    target = torch.log1p(frames.to(predicted.dtype)) * mask_f
    per_token = ((predicted - target) ** 2 * mask_f).sum(1) / mask_f.sum(1).clamp(min=1)
    shape = (torch.expm1(predicted.detach().clamp(max=10.0)).clamp(min=0.0) * mask_f).sum(1)  # no overflow early on
    total = torch.log1p(torch.exp(log_rate) * shape) - torch.log1p((frames * mask).sum(1).to(predicted.dtype))
    return per_token + total**2


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (n, dim) of flow times t (n,) in [0, 1] (Transformer positions, times 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def expand_by_path(values: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Per-token values (n, L, c) spread over frames by an alignment path (n, L, F) -> (n, F, c)."""
    return torch.einsum("nlf,nlc->nfc", path.to(values.dtype), values)


def path_from_durations(frames: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """A monotonic path (n, L, F) giving token i ``frames[:, i]`` consecutive frames (padding tokens none)."""
    frames = frames * text_mask
    ends = frames.cumsum(dim=1)
    starts = ends - frames
    grid = torch.arange(int(ends.max().item()) if ends.numel() else 0, device=frames.device)
    return ((grid[None, None] >= starts[..., None]) & (grid[None, None] < ends[..., None])).float()


class SpeechGenerator(nn.Module):
    """See the module docstring. ``text_dim``: the LLM's width; ``latent_dim``: the codec's latents (the last
    ``code_channels`` of them a pitch code, which a regression head also predicts per token: ``code_loss``)."""

    def __init__(self, text_dim: int, latent_dim: int, speaker_dim: int, encoder: ConformerConfig,
                 decoder: ConformerConfig, code_channels: int = 0) -> None:
        super().__init__()
        hidden = encoder.hidden_size
        self.latent_dim, self.code_channels = latent_dim, code_channels
        # the voice vector is unit-norm (components ~ 1/sqrt(speaker_dim)); its projections read it times this
        self.speaker_gain = 1.0
        self.text_in = empty_linear(text_dim, hidden, bias=True)
        self.speaker_in = empty_linear(speaker_dim, hidden, bias=True)
        self.encoder = ConformerEncoder(encoder, hidden)
        self.prior = empty_linear(hidden, 2 * latent_dim, bias=True)
        self.duration = DurationPredictor(hidden)
        self.time_in = nn.Sequential(nn.Linear(decoder.hidden_size, decoder.hidden_size), nn.SiLU(),
                                     nn.Linear(decoder.hidden_size, decoder.hidden_size))
        self.frame_speaker_in = empty_linear(speaker_dim, decoder.hidden_size, bias=True)
        # the velocity network reads [x_t ; prior ; time + speaker] per frame
        self.velocity = ConformerEncoder(decoder, 2 * latent_dim + decoder.hidden_size)
        self.velocity_out = empty_linear(decoder.hidden_size, latent_dim, bias=True)
        with torch.no_grad():
            for layer in (self.text_in, self.speaker_in, self.prior, self.frame_speaker_in, self.velocity_out):
                nn.init.normal_(layer.weight, std=encoder.init_std)
                nn.init.zeros_(layer.bias)
        self.code_head = self.code_speaker = None  # built last: without a code the other weights draw as before
        if code_channels:  # the pitch code per token: from the text encoding, and the voice's level read directly
            self.code_head = empty_linear(hidden, code_channels, bias=True)
            self.code_speaker = empty_linear(speaker_dim, code_channels, bias=False)
            with torch.no_grad():
                nn.init.normal_(self.code_head.weight, std=encoder.init_std)
                nn.init.zeros_(self.code_head.bias)
                nn.init.zeros_(self.code_speaker.weight)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor, speaker: torch.Tensor):
        """-> encoding h (n, L, hidden), prior mean and log std (n, L, latent_dim)."""
        x = self.text_in(text) + self.speaker_in(speaker * self.speaker_gain)[:, None]
        h = self.encoder(x, text_mask).hidden
        mean, log_std = self.prior(h).chunk(2, dim=-1)
        return h, mean, log_std.clamp(-7.0, 2.0)

    def predict_code(self, h: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """The pitch code per token (n, L, code_channels) from the text encoding h (n, L, hidden) plus a direct map of
        the voice vector (read at unit RMS): FastSpeech 2's pitch regression, with the voice's level one linear
        map away (through the text encoder a voice vector reaches the prior too weakly to set a pitch per voice
        in a short training: measured, ``bench.audio_tts``)."""
        unit = speaker * speaker.shape[-1] ** 0.5
        return self.code_head(h) + self.code_speaker(unit.to(h.dtype))[:, None]

    def code_loss(self, h: torch.Tensor, speaker: torch.Tensor, path: torch.Tensor, latents: torch.Tensor,
                  frame_mask: torch.Tensor) -> torch.Tensor:
        """Per clip (n,): the regressed code, expanded over each token's frames (``path``), against the target
        frames' code (the last ``code_channels`` of ``latents``; position, voicing): mean |position error| over
        the voiced frames + mean |voicing error| over all frames."""
        predicted = expand_by_path(self.predict_code(h, speaker), path).float()
        target = latents[..., -self.code_channels:].float()
        voiced = ((target[..., 1] > 0) & frame_mask).float()
        real = frame_mask.float()
        position = ((predicted[..., 0] - target[..., 0]).abs() * voiced).sum(1) / voiced.sum(1).clamp_min(1.0)
        voicing = ((predicted[..., 1] - target[..., 1]).abs() * real).sum(1) / real.sum(1).clamp_min(1.0)
        return position + voicing

    def velocity_field(self, x: torch.Tensor, t: torch.Tensor, prior: torch.Tensor, speaker: torch.Tensor,
                       frame_mask: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | prior frames, speaker): (n, F, latent) for x (n, F, latent), t (n,)."""
        cond = self.time_in(timestep_embedding(t, self.time_in[0].in_features).to(x.dtype))
        cond = (cond + self.frame_speaker_in(speaker * self.speaker_gain))[:, None].expand(-1, x.shape[1], -1)
        out = self.velocity(torch.cat((x, prior, cond), dim=-1), frame_mask).hidden
        return self.velocity_out(out) * frame_mask[..., None]

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, latents: torch.Tensor, frame_mask: torch.Tensor,
                speaker: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> SpeechLosses:
        """Training losses. text (n, L, text_dim), latents (n, F, latent_dim) the target speech's codec
        latents (no gradient reaches the codec through them), speaker (n, speaker_dim). The flow's
        ``noise`` (n, F, latent_dim) and times ``t`` (n,) are drawn from ``generator`` unless given."""
        latents = latents.detach()
        h, mean, log_std = self.encode_text(text, text_mask, speaker)
        # with the masks' host copies, MAS checks its input on the host, without a sync
        mask = with_host_copy(lambda t, f: alignment_mask(t.sum(1), f.sum(1), t.shape[1], f.shape[1]),
                              text_mask, frame_mask)
        with torch.no_grad():
            # no finite check (a read of the device): a non-finite likelihood comes from non-finite latents,
            # means or scales, and every valid frame and token enters the prior loss through the path, which
            # is then non-finite too; the trainer's numerics guard skips such a step
            path = maximum_path(gaussian_log_likelihood(latents, mean, log_std), mask, check_finite=False)
        frames = frame_mask.sum(1).clamp(min=1) * self.latent_dim
        mean_f, log_std_f = expand_by_path(mean, path), expand_by_path(log_std, path)
        nll = 0.5 * ((latents - mean_f) * torch.exp(-log_std_f)) ** 2 + log_std_f + 0.5 * math.log(2 * math.pi)
        prior = (nll * frame_mask[..., None]).sum((1, 2)) / frames
        duration = duration_loss(self.duration(h.detach(), text_mask), self.duration.log_rate, durations(path),
                                 text_mask)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if t is None:
            t = torch.rand(latents.shape[0], generator=generator, device=latents.device, dtype=latents.dtype)
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * latents
        v = self.velocity_field(x_t, t, mean_f.detach(), speaker, frame_mask)
        flow = (((v - (latents - noise)) ** 2) * frame_mask[..., None]).sum((1, 2)) / frames
        pitch = self.code_loss(h, speaker, path, latents, frame_mask) if self.code_channels else None
        return SpeechLosses(prior, duration, flow, pitch)

    @torch.no_grad()
    def generate(self, text: torch.Tensor, text_mask: torch.Tensor, speaker: torch.Tensor, steps: int = 16,
                 generator: torch.Generator | None = None, length_scale: float = 1.0,
                 code_from: str = "flow") -> tuple[torch.Tensor, torch.Tensor]:
        """-> latent frames (n, F, latent_dim) and their mask (n, F): durations from the predictor (times
        ``length_scale``: > 1 speaks slower), then ``steps`` Euler steps from seeded noise. ``code_from`` (with a
        pitch code): its channels from the flow's sample ("flow"), the prior's mean ("prior") or the regression
        head ("regression", ``predict_code``)."""
        if code_from not in ("flow", "prior", "regression") or (code_from == "regression" and not self.code_channels):
            raise ValueError(f"SpeechGenerator.generate: code_from={code_from!r}; use 'flow', 'prior' or (with a "
                             f"pitch code, code_channels > 0; here {self.code_channels}) 'regression'")
        h, mean, _ = self.encode_text(text, text_mask, speaker)
        frames = self.duration.frames(h, text_mask, length_scale)
        path = path_from_durations(frames, text_mask)
        frame_mask = path.sum(1) > 0
        prior = expand_by_path(mean, path)
        x = torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype)
        for k in range(steps):
            t = torch.full((x.shape[0],), k / steps, device=x.device, dtype=x.dtype)
            x = x + self.velocity_field(x, t, prior, speaker, frame_mask) / steps
        if self.code_channels and code_from != "flow":
            code = prior if code_from == "prior" else expand_by_path(self.predict_code(h, speaker), path)
            x = torch.cat([x[..., :-self.code_channels], code[..., -self.code_channels:].to(x.dtype)], dim=-1)
        return x * frame_mask[..., None], frame_mask


__all__ = ["DurationPredictor", "SpeechGenerator", "SpeechLosses", "duration_loss", "expand_by_path",
           "path_from_durations", "timestep_embedding"]
