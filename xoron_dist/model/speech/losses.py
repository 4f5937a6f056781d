"""Vocoder losses: LSGAN adversarial terms, feature matching, multi-resolution spectral distances.

Notation: D_k is the k-th sub-discriminator (all periods of the MPD, all resolutions of the MRD),
y the real waveform, y_hat the generated one, f_k^l the l-th feature map of D_k.

    discriminator_loss         L_D   = sum_k [ mean (1 - D_k(y))^2 + mean D_k(y_hat)^2 ]
    generator_adversarial_loss L_adv = sum_k mean (1 - D_k(y_hat))^2
    feature_matching_loss      L_fm  = 2 * sum_k sum_l mean |f_k^l(y) - f_k^l(y_hat)|

(least-squares GAN, Mao et al. 2017, arXiv:1611.04076; HiFi-GAN eqs. 1-3, Kong et al. 2020,
arXiv:2010.05646, whose code folds lambda_fm = 2 into the feature loss). These equal NVIDIA's
``bigvgan.loss.discriminator_loss / generator_loss / feature_loss`` (first return value).

Spectral losses (mels live here only, never in the model's input or output path):

    MultiResolutionSTFTLoss  Parallel WaveGAN's multi-resolution STFT loss (Yamamoto et al. 2020,
        arXiv:1910.11480 eqs. 4-6): mean over resolutions of w_sc * spectral convergence + w_log *
        mean |log |S(y_hat)| - log |S(y)||. Equals ``auraloss.freq.MultiResolutionSTFTLoss``.
    MultiScaleMelLoss        BigVGAN-v2's multi-scale mel L1 (from DAC, Kumar et al. 2023,
        arXiv:2306.06546 §3.4): sum over scales of mean |log10 max(M |S(y_hat)|, 1e-5) - log10 max(M |S(y)|, 1e-5)|,
        M a Slaney mel filterbank computed here (no torchaudio/librosa at run time).
        Equals ``bigvgan.loss.MultiScaleMelSpectrogramLoss``.

BigVGAN-v2 trains the generator on L_adv(MPD) + L_adv(MRD/CQT) + L_fm(both) + 15 * mel loss and the
discriminators on L_D (the weights are the trainer's, not this module's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STFT_RESOLUTIONS_16K = ((1024, 80, 400), (2048, 160, 800), (512, 32, 160))
MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BANDS = (5, 10, 20, 40, 80, 160, 320)


def stft(x: torch.Tensor, n_fft: int, hop: int, win: int, window: torch.Tensor, center: bool = True) -> torch.Tensor:
    """``torch.stft`` (complex) computed in fp32 at least, whatever ``x``'s dtype: cuFFT takes no bf16 (and fp16
    only at power-of-two sizes), so a bf16 model's spectral losses and discriminators would fail on a GPU
    (the CPU's FFT accepts bf16, hiding it). fp64 stays fp64; the caller casts what it feeds back to a layer."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.stft(x.to(dtype), n_fft, hop, win, window=window.to(dtype), center=center, return_complex=True)


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN discriminator loss L_D (module docstring); each list holds one (batch, n) tensor per sub-discriminator."""
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"discriminator_loss: {len(real_logits)} real vs {len(fake_logits)} generated logits; "
                         "pass the outputs of the same discriminator for both")
    return sum(((1 - r) ** 2).mean() + (g**2).mean() for r, g in zip(real_logits, fake_logits, strict=True))


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN generator loss L_adv (module docstring) on the discriminators' logits for generated audio."""
    return sum(((1 - g) ** 2).mean() for g in fake_logits)


def feature_matching_loss(real_fmaps: list[list[torch.Tensor]], fake_fmaps: list[list[torch.Tensor]]) -> torch.Tensor:
    """Feature-matching loss L_fm = 2 * sum mean |f_real - f_fake| over sub-discriminators and layers.

    Gradients reach the generator through ``fake_fmaps``; the real maps are targets (the caller may detach them).
    """
    if [len(f) for f in real_fmaps] != [len(f) for f in fake_fmaps]:
        raise ValueError("feature_matching_loss: real and generated feature maps differ in count; pass the outputs "
                         "of the same discriminator for both")
    return 2 * sum((r - g).abs().mean() for rs, gs in zip(real_fmaps, fake_fmaps, strict=True)
                   for r, g in zip(rs, gs, strict=True))


def _flatten_audio(x: torch.Tensor, who: str) -> torch.Tensor:
    """(batch, time) or (batch, channels, time) -> (batch * channels, time)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"{who} expects audio (batch, time) or (batch, channels, time), got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


class MultiResolutionSTFTLoss(nn.Module):
    """Multi-resolution STFT loss (Yamamoto et al. 2020, eqs. 4-6), as ``auraloss.freq.MultiResolutionSTFTLoss``.

    Per resolution r = (n_fft, hop, win), with |S| = sqrt(max(|STFT|^2, eps)) (Hann window of ``win``
    samples, centred reflect-padded frames):
        L_sc  = ||S(y) - S(y_hat)||_F / ||S(y)||_F        (over the whole batch)
        L_log = mean |log S(y_hat) - log S(y)|
    and the loss is the mean over resolutions of w_sc * L_sc + w_log_mag * L_log. Inputs
    (batch, [channels,] time); returns a scalar. Defaults: BigVGAN-v1's three resolutions at 16 kHz
    (see ``speech.discriminators``).
    """

    def __init__(self, resolutions: tuple[tuple[int, int, int], ...] = STFT_RESOLUTIONS_16K, w_sc: float = 1.0,
                 w_log_mag: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        if not resolutions or any(not (0 < hop <= win <= n_fft) for n_fft, hop, win in resolutions):
            raise ValueError(f"MultiResolutionSTFTLoss resolutions={resolutions}: give (n_fft, hop, win) triples "
                             "with 0 < hop <= win <= n_fft")
        self.resolutions = tuple(tuple(r) for r in resolutions)
        self.w_sc, self.w_log_mag, self.eps = w_sc, w_log_mag, eps
        for i, (_, _, win) in enumerate(self.resolutions):
            self.register_buffer(f"window{i}", torch.hann_window(win), persistent=False)

    def magnitude(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """(batch, time) -> sqrt(max(|STFT|^2, eps)) (batch, n_fft/2 + 1, frames) at resolution ``index``."""
        n_fft, hop, win = self.resolutions[index]
        spec = stft(x, n_fft, hop, win, getattr(self, f"window{index}"))
        return (spec.real**2 + spec.imag**2).clamp(min=self.eps).sqrt()

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y_hat, y (batch, [channels,] time) -> scalar loss."""
        y_hat, y = _flatten_audio(y_hat, "MultiResolutionSTFTLoss"), _flatten_audio(y, "MultiResolutionSTFTLoss")
        total = y_hat.new_zeros(())
        for i in range(len(self.resolutions)):
            mag_hat, mag = self.magnitude(y_hat, i), self.magnitude(y, i)
            if self.w_sc:
                total = total + self.w_sc * torch.linalg.norm(mag - mag_hat) / torch.linalg.norm(mag)
            if self.w_log_mag:
                total = total + self.w_log_mag * (mag_hat.log() - mag.log()).abs().mean()
        return total / len(self.resolutions)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (Auditory Toolbox; librosa's default): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular mel filters (n_mels, n_fft/2 + 1), float32.

    Equals ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (htk=False, norm="slaney"): band i is
    the triangle over mel points m_i, m_{i+1}, m_{i+2} (n_mels + 2 points equally spaced on the mel
    scale, mapped back to Hz), scaled by 2 / (f_{i+2} - f_i) so each filter has unit area in Hz.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel_filterbank: need 0 <= f_min ({f_min}) < f_max ({f_max}) <= sample_rate/2 "
                         f"({sample_rate / 2})")
    with torch.device("cpu"):  # a constant: computed on the CPU even while a model is built on "meta"
        return _mel_weights(sample_rate, n_fft, n_mels, f_min, f_max)


def _mel_weights(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                          float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2, dtype=torch.float64)
    hz = _mel_to_hz(mels)  # (n_mels + 2,)
    ramps = hz[:, None] - fft_freqs[None, :]  # (n_mels + 2, bins)
    widths = hz.diff()  # (n_mels + 1,)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights = weights * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.float()


class MultiScaleMelLoss(nn.Module):
    """BigVGAN-v2 multi-scale log-mel L1, as ``bigvgan.loss.MultiScaleMelSpectrogramLoss`` (defaults).

    Per scale s (window w_s, hop w_s/4, n_mels_s): M_s |STFT| with a periodic Hann window of w_s =
    n_fft samples, centred reflect-padded frames, ``mel_filterbank(sample_rate, w_s, n_mels_s)``; the
    loss is sum_s mean |log10 max(M_s|S(y_hat)|, clamp) - log10 max(M_s|S(y)|, clamp)|. Inputs
    (batch, [channels,] time); returns a scalar. BigVGAN-v2 weights it by 15 in the generator loss.
    """

    def __init__(self, sample_rate: int = 16000, window_lengths: tuple[int, ...] = MEL_WINDOWS,
                 n_mels: tuple[int, ...] = MEL_BANDS, clamp: float = 1e-5) -> None:
        super().__init__()
        if len(window_lengths) != len(n_mels) or not window_lengths:
            raise ValueError(f"MultiScaleMelLoss: window_lengths={window_lengths} and n_mels={n_mels} need the "
                             "same, non-zero length (one mel count per window)")
        self.window_lengths, self.clamp = tuple(window_lengths), clamp
        for i, (w, m) in enumerate(zip(window_lengths, n_mels, strict=True)):
            self.register_buffer(f"window{i}", torch.hann_window(w), persistent=False)
            self.register_buffer(f"mel{i}", mel_filterbank(sample_rate, w, m), persistent=False)

    def log_mel(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """(batch, time) -> log10 mel magnitude (batch, n_mels, frames) at scale ``index``."""
        w = self.window_lengths[index]
        mag = stft(x, w, w // 4, w, getattr(self, f"window{index}")).abs()
        mel = getattr(self, f"mel{index}").to(mag.dtype) @ mag
        return mel.clamp(min=self.clamp).log10()

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y_hat, y (batch, [channels,] time) -> scalar loss."""
        y_hat, y = _flatten_audio(y_hat, "MultiScaleMelLoss"), _flatten_audio(y, "MultiScaleMelLoss")
        return sum(F.l1_loss(self.log_mel(y_hat, i), self.log_mel(y, i)) for i in range(len(self.window_lengths)))
