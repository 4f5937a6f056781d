"""BigVGAN-v2 waveform decoder: the codec's latent frames -> a 16 kHz waveform.

BigVGAN (Lee et al. 2022, "BigVGAN: A Universal Neural Vocoder with Large-Scale Training",
arXiv:2206.04658) is HiFi-GAN's generator (Kong et al. 2020, arXiv:2010.05646: transposed-conv
upsampling, multi-receptive-field residual blocks averaged over kernel sizes) with every LeakyReLU
replaced by an *anti-aliased multi-periodicity* (AMP) activation (§3.2): a periodic Snake
activation (Ziyin et al. 2020, arXiv:2006.08195) evaluated at twice the sample rate between a
Kaiser-windowed sinc low-pass upsampler and downsampler (the alias-free recipe of StyleGAN3,
Karras et al. 2021, arXiv:2106.12423), so the harmonics Snake creates above Nyquist are filtered
instead of folding back into the band.

In Xoron the input is *not* a mel spectrogram: it is the waveform codec's latent frames,
``(batch, in_channels, frames)`` at 50 Hz, and the total upsampling ``prod(upsample_rates)`` is the
codec's hop (320 at 16 kHz). Mels exist only inside the spectral loss (``speech/losses.py``).

Data flow, ``C = upsample_initial_channel``::

    latents (B, in_channels, T) -> conv_pre k7 (+ voice offset) -> (B, C, T)
        [source_harmonics: -> PitchPredictor -> f0, voiced -> HarmonicSource -> excitation e (B, 1, T * hop)]
        [envelope_harmonics: -> HarmonicEnvelope(f0, voiced) -> harmonics h (B, 1, T * hop), added after conv_post]
    for stage i, rate u_i, kernel k_i:  ConvTranspose1d(C/2^i -> C/2^(i+1), k_i, stride u_i, pad (k_i-u_i)/2)
                                        [+ source_convs.i(e), a conv of stride hop / prod(u_0..u_i),
                                         no weight norm]
                                        -> mean over resblock kernels of AMPBlock(kernel, dilations)
    -> anti-aliased Snake -> conv_post k7 (C/2^n -> 1) [+ h] -> clamp(-1, 1) (v2) or tanh (v1)
    -> (B, 1, T * prod(u_i))

Parity with NVIDIA's ``bigvgan`` package (``bigvgan.bigvgan.BigVGAN``, torch activation path): the
module tree and parameter names are NVIDIA's except that (a) ``ups.{i}`` is the transposed conv
itself (NVIDIA wraps it in a one-element ``ModuleList``: ``ups.{i}.0``), (b) weight norm is torch's
parametrization (``parametrizations.weight.original0/1``, NVIDIA: the deprecated hook's
``weight_g/weight_v``; same g/v split, dim 0) or absent, and (c) the fixed Kaiser-sinc filters are
non-persistent buffers, not checkpoint entries. ``state_dict_from_nvidia`` does that renaming;
the forward is the same computation (equal to ~1e-7 in float32, tested). Only AMPBlock1 (two convs
per dilation) is built: every BigVGAN-v2 config uses it.

Initialisation is the vocoder's own (it does not use the LLM's ``init_std`` walk): layers are built
uninitialised and ``reset_parameters`` draws every conv in module order with PyTorch's Conv default
(weight kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), then sets weight norm's g = ||v||.
That is the init NVIDIA's released models actually trained from: their ``init_weights`` (N(0, 0.01))
writes into the ``weight`` that the weight-norm hook recomputes from g and v on the next forward,
so it never takes effect. Snake's alpha/beta start at 1 (log 0 with ``snake_logscale``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, skip_init

from xoron_dist.model.speech.pitch import (
    PITCH_CODE_CHANNELS,
    HarmonicEnvelope,
    HarmonicSource,
    PitchPredictor,
    pitch_from_code,
)

ACTIVATIONS = ("snake", "snakebeta")


@dataclass(frozen=True)
class BigVGANConfig:
    """Generator hyper-parameters (names as in NVIDIA's JSON configs where they exist).

    in_channels: latent channels per frame (the codec's latent width; NVIDIA's ``num_mels``).
    upsample_rates: stride of each transposed conv; their product is the hop, samples per frame
        (default 8*5*4*2 = 320, EnCodec's ratios: 50 Hz frames at 16 kHz).
    upsample_kernel_sizes: kernel of each transposed conv; ``None`` means 2 * rate for even rates and
        2 * rate + 1 for odd ones. A stage maps T frames to (T - 1) u - 2 floor((k - u) / 2) + k samples,
        which is exactly T * u only when k - u is even: NVIDIA's 2 * rate with an odd rate (5) would add
        one sample per stage.
    upsample_initial_channel: channels after conv_pre; halved by every upsampling stage.
    resblock_kernel_sizes / resblock_dilation_sizes: one AMP block per kernel (with its dilations) per
        stage, outputs averaged (HiFi-GAN's multi-receptive-field fusion).
    activation: "snakebeta" (v2: separate frequency alpha and magnitude beta) or "snake".
    snake_logscale: store alpha/beta as logs (init 0, exp'd in forward), as v2 does.
    use_tanh_at_final: tanh on the output (v1); False clamps to [-1, 1] (v2).
    use_bias_at_final: bias on conv_post (v1 True, v2 False).
    weight_norm: weight-normalise every conv (Salimans & Kingma 2016, arXiv:1602.07868), as trained;
        ``BigVGANGenerator.remove_weight_norm`` folds it for inference.
    sample_rate: output rate in Hz; only used to report the frame rate.
    cond_channels: width of a global conditioning vector (Xoron: the speaker embedding), 0 for none. When
        set, a 1x1 conv ``cond`` maps it to ``upsample_initial_channel`` and adds it to every frame of
        conv_pre's output (the multi-speaker HiFi-GAN of VITS, Kim et al. 2021, arXiv:2106.06103: its
        ``gin_channels``); NVIDIA's BigVGAN has none, so parity with it is at 0.
    source_harmonics: harmonics of the neural source-filter excitation (``xoron_dist.model.speech.pitch``), 0
        for none (NVIDIA's BigVGAN, parity at 0). When set, a ``PitchPredictor`` reads conv_pre's output (after
        the voice offset) for f0 and voicing per frame, a ``HarmonicSource`` turns them (or the pitch passed to
        ``forward``) into a harmonic excitation, and stage i adds its strided conv ``source_convs.{i}`` of it.
    envelope_harmonics: harmonics of the harmonic branch (``pitch.HarmonicEnvelope``, needs the source's pitch), 0
        for none: their per-frame amplitudes are read from conv_pre's output and their sum at the source's pitch
        is added to conv_post's output.
    pitch_code: the last ``pitch.PITCH_CODE_CHANNELS`` of the ``in_channels`` are a pitch code (``pitch.pitch_code``:
        a log-f0 level and the voicing per frame, a token stream of the codec's own), which drives the source when
        no pitch is passed; the ``PitchPredictor`` then reads the latents with the code's channels zeroed (what
        the other channels and the voice tell of the pitch: it can write the code where none was tracked). Needs
        the source.
    f0_min, f0_max: the pitch range in Hz of the predictor (its log f0 is a sigmoid between their logs) or the code.
    """

    in_channels: int = 128
    upsample_rates: tuple[int, ...] = (8, 5, 4, 2)
    upsample_kernel_sizes: tuple[int, ...] | None = None
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = False
    use_bias_at_final: bool = False
    weight_norm: bool = True
    sample_rate: int = 16000
    cond_channels: int = 0
    source_harmonics: int = 0
    envelope_harmonics: int = 0
    pitch_code: bool = False
    f0_min: float = 60.0
    f0_max: float = 1000.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BigVGANConfig.activation={self.activation!r}: use one of {ACTIVATIONS}")
        if self.cond_channels < 0:
            raise ValueError(f"BigVGANConfig.cond_channels={self.cond_channels}: use 0 (no conditioning) or the "
                             "width of the conditioning vector")
        if self.source_harmonics < 0 or not 0 < self.f0_min < self.f0_max < self.sample_rate / 2:
            raise ValueError(f"BigVGANConfig: source_harmonics={self.source_harmonics}, f0_min={self.f0_min}, "
                             f"f0_max={self.f0_max}: need source_harmonics >= 0 (0: no source) and "
                             f"0 < f0_min < f0_max < sample_rate / 2 = {self.sample_rate / 2}")
        if self.envelope_harmonics < 0 or (self.envelope_harmonics and not self.source_harmonics):
            raise ValueError(f"BigVGANConfig.envelope_harmonics={self.envelope_harmonics}: the harmonic branch is "
                             f"driven by the source's pitch; use 0, or set source_harmonics (now "
                             f"{self.source_harmonics}) too")
        if self.pitch_code and (not self.source_harmonics or self.in_channels <= PITCH_CODE_CHANNELS):
            raise ValueError(f"BigVGANConfig.pitch_code: a pitch code drives the source and takes the last "
                             f"{PITCH_CODE_CHANNELS} of the in_channels; needs source_harmonics > 0 (now "
                             f"{self.source_harmonics}) and in_channels > {PITCH_CODE_CHANNELS} (now "
                             f"{self.in_channels})")
        if self.in_channels < 1 or not self.upsample_rates or min(self.upsample_rates) < 1:
            raise ValueError(f"BigVGANConfig: in_channels={self.in_channels}, upsample_rates={self.upsample_rates}: "
                             "need in_channels >= 1 and at least one rate, every rate >= 1")
        if len(self.kernel_sizes) != len(self.upsample_rates):
            raise ValueError(f"BigVGANConfig.upsample_kernel_sizes={self.upsample_kernel_sizes} has "
                             f"{len(self.kernel_sizes)} entries for {len(self.upsample_rates)} upsample_rates: "
                             "give one kernel per rate, or None for the default")
        for u, k in zip(self.upsample_rates, self.kernel_sizes, strict=True):
            if k < u or (k - u) % 2:
                raise ValueError(f"BigVGANConfig: upsample kernel {k} for rate {u} would not give exactly "
                                 f"frames * {u} samples: use a kernel >= the rate with (kernel - rate) even, "
                                 "e.g. 2 * rate for an even rate, 2 * rate + 1 for an odd one")
        channels = self.upsample_initial_channel >> len(self.upsample_rates)
        if channels < 1 or self.upsample_initial_channel % (1 << len(self.upsample_rates)):
            raise ValueError(f"BigVGANConfig.upsample_initial_channel={self.upsample_initial_channel} must be "
                             f"divisible by 2**{len(self.upsample_rates)} (one halving per upsampling stage)")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise ValueError(f"BigVGANConfig: resblock_kernel_sizes={self.resblock_kernel_sizes} and "
                             f"resblock_dilation_sizes={self.resblock_dilation_sizes} need the same, non-zero length "
                             "(one dilation list per kernel)")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise ValueError(f"BigVGANConfig.resblock_kernel_sizes={self.resblock_kernel_sizes}: use odd kernels "
                             "so 'same' padding keeps the length")

    @property
    def kernel_sizes(self) -> tuple[int, ...]:
        """Upsampling kernels, ``upsample_kernel_sizes`` or 2 * rate (+1 for an odd rate)."""
        if self.upsample_kernel_sizes is not None:
            return tuple(self.upsample_kernel_sizes)
        return tuple(2 * u + u % 2 for u in self.upsample_rates)

    @property
    def hop_length(self) -> int:
        """Samples per latent frame: the product of the upsampling rates."""
        return math.prod(self.upsample_rates)

    @property
    def frame_rate(self) -> float:
        """Latent frames per second at ``sample_rate``."""
        return self.sample_rate / self.hop_length


def make_conv(cls: type[nn.Module], *args, weight_norm: bool, **kwargs) -> nn.Module:
    """An uninitialised conv of type ``cls`` (draw it with ``reset_conv_``), weight-normalised if asked."""
    conv = skip_init(cls, *args, device=torch.get_default_device(), **kwargs)
    return parametrizations.weight_norm(conv) if weight_norm else conv


@torch.no_grad()
def reset_conv_(conv: nn.Module) -> None:
    """PyTorch's Conv default init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))); with weight norm
    the drawn weight is assigned through the parametrization, which sets v = w and g = ||w|| (per dim 0)."""
    weight = torch.empty_like(conv.weight)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if parametrize.is_parametrized(conv, "weight"):
        conv.weight = weight
    else:
        conv.weight.copy_(weight)
    if conv.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(conv.bias, -bound, bound)


class Snake(nn.Module):
    """Snake (Ziyin et al. 2020, eq. 3) and BigVGAN's SnakeBeta, per channel on (batch, channels, time).

    snake:      y = x + 1/(alpha + 1e-9) * sin^2(alpha * x)
    snakebeta:  y = x + 1/(beta + 1e-9)  * sin^2(alpha * x)
    With ``logscale`` the parameters hold log(alpha), log(beta) (init 0) and are exp'd here.
    """

    def __init__(self, channels: int, beta: bool, logscale: bool) -> None:
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels)) if beta else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.alpha, self.beta):
            if p is not None:
                p.fill_(0.0 if self.logscale else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        beta = alpha if self.beta is None else self.beta[None, :, None]
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass, (kernel_size,), summing to 1.

    ``cutoff`` and ``half_width`` are in cycles per sample. The Kaiser beta comes from the
    attenuation A = 2.285 (N/2 - 1) pi (4 half_width) + 7.95 dB by Kaiser's formula, as in julius /
    alias-free-torch / BigVGAN's ``kaiser_sinc_filter1d`` (same numbers, so the oracle matches).
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    # Even kernels are centred between two taps (time -N/2 + 0.5 ... N/2 - 0.5).
    time = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return taps / taps.sum()


class AntiAliasedActivation1d(nn.Module):
    """BigVGAN's ``Activation1d`` (arXiv:2206.04658 §3.2): upsample x2 -> activation -> downsample x2.

    (batch, channels, time) -> same. Both resamplers use one Kaiser-sinc low-pass (cutoff 0.5/ratio,
    half width 0.6/ratio, ``kernel_size`` taps) applied depthwise with replicate padding: the upsampler
    is ``ratio * conv_transpose1d`` (zero-stuffing + interpolation), the downsampler a strided conv.
    """

    def __init__(self, activation: nn.Module, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.act, self.ratio, self.kernel_size = activation, ratio, kernel_size
        filt = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size)
        self.register_buffer("filter", filt, persistent=False)  # a constant, rebuilt from the config

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, ratio * T), band-limited interpolation."""
        r, k = self.ratio, self.kernel_size
        weight = self.filter.to(x.dtype).expand(x.shape[1], 1, k)
        pad = k // r - 1
        x = F.pad(x, (pad, pad), mode="replicate")
        x = r * F.conv_transpose1d(x, weight, stride=r, groups=x.shape[1])
        left, right = pad * r + (k - r) // 2, pad * r + (k - r + 1) // 2
        return x[..., left : x.shape[-1] - right]

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ratio * T) -> (B, C, T), low-pass then decimate."""
        k = self.kernel_size
        weight = self.filter.to(x.dtype).expand(x.shape[1], 1, k)
        x = F.pad(x, (k // 2 - (k % 2 == 0), k // 2), mode="replicate")
        return F.conv1d(x, weight, stride=self.ratio, groups=x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def _snake(channels: int, cfg: BigVGANConfig) -> AntiAliasedActivation1d:
    return AntiAliasedActivation1d(Snake(channels, beta=cfg.activation == "snakebeta", logscale=cfg.snake_logscale))


class AMPBlock(nn.Module):
    """AMP residual block (BigVGAN's AMPBlock1), (batch, channels, time) -> same.

    Per dilation d: x = x + conv_1(act(conv_d(act(x)))), where conv_d is a k-tap conv dilated by d and
    each act is a separate anti-aliased Snake (``activations`` alternates: act before conv_d, act
    before conv_1, as NVIDIA stores them).
    """

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], cfg: BigVGANConfig) -> None:
        super().__init__()

        def conv(d: int) -> nn.Module:
            return make_conv(nn.Conv1d, channels, channels, kernel_size, dilation=d,
                             padding=d * (kernel_size - 1) // 2, weight_norm=cfg.weight_norm)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations = nn.ModuleList(_snake(channels, cfg) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = zip(self.activations[::2], self.activations[1::2], strict=True)
        for c1, c2, (a1, a2) in zip(self.convs1, self.convs2, acts, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class BigVGANGenerator(nn.Module):
    """Latent frames (batch, in_channels, frames) -> waveform (batch, 1, frames * hop_length) in [-1, 1]."""

    def __init__(self, cfg: BigVGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        wn, c0 = cfg.weight_norm, cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = make_conv(nn.Conv1d, cfg.in_channels, c0, 7, padding=3, weight_norm=wn)
        self.ups = nn.ModuleList(
            make_conv(nn.ConvTranspose1d, c0 >> i, c0 >> (i + 1), k, stride=u, padding=(k - u) // 2, weight_norm=wn)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.kernel_sizes, strict=True))
        )
        # Flat, stage-major: stage i's blocks are resblocks[i * num_kernels : (i + 1) * num_kernels].
        self.resblocks = nn.ModuleList(
            AMPBlock(c0 >> (i + 1), k, tuple(d), cfg)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        out_channels = c0 >> len(cfg.upsample_rates)
        self.activation_post = _snake(out_channels, cfg)
        self.conv_post = make_conv(nn.Conv1d, out_channels, 1, 7, padding=3, bias=cfg.use_bias_at_final,
                                   weight_norm=wn)
        # Last in module order, so an unconditioned generator draws the same weights as before it existed.
        self.cond = make_conv(nn.Conv1d, cfg.cond_channels, c0, 1, weight_norm=False) if cfg.cond_channels else None
        self.pitch = self.source = self.source_convs = self.envelope = None  # source-filter parts, after the rest
        plain = partial(make_conv, weight_norm=False)
        if cfg.source_harmonics and not cfg.pitch_code:
            self.pitch = PitchPredictor(c0, cfg.f0_min, cfg.f0_max, plain)
        if cfg.source_harmonics:
            self.source = HarmonicSource(cfg.source_harmonics, cfg.hop_length, cfg.sample_rate, plain)
            self.source_convs = nn.ModuleList(_source_conv(c0 >> (i + 1), cfg.hop_length // math.prod(
                cfg.upsample_rates[: i + 1])) for i in range(len(cfg.upsample_rates)))
        if cfg.envelope_harmonics:
            self.envelope = HarmonicEnvelope(c0, cfg.envelope_harmonics, cfg.hop_length, cfg.sample_rate, plain)
        if cfg.pitch_code:  # last in module order, so the rest draws the weights it draws without the predictor
            self.pitch = PitchPredictor(c0, cfg.f0_min, cfg.f0_max, plain)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every weight in module order (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                reset_conv_(m)
            elif isinstance(m, Snake):
                m.reset_parameters()
        if self.envelope is not None:  # every amplitude starts at the branch's base (about 40 dB down)
            nn.init.zeros_(self.envelope.out.weight)
            nn.init.zeros_(self.envelope.out.bias)

    @property
    def hop_length(self) -> int:
        """Output samples per input frame."""
        return self.cfg.hop_length

    def forward(self, latents: torch.Tensor, cond: torch.Tensor | None = None,
                pitch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """latents (batch, in_channels, frames), cond (batch, cond_channels) when the generator is
        conditioned (``cfg.cond_channels``), else None; ``pitch``: (f0 Hz, voiced) each (batch, frames) to
        drive the source (``cfg.source_harmonics``; None: the latents' pitch code with ``cfg.pitch_code``, else the
        generator's own prediction) -> waveform (batch, 1, frames * hop_length)."""
        x = stem = self._stem(latents, cond)
        excitation, pitch = self._excitation(x, pitch, latents)
        for i, up in enumerate(self.ups):
            x = up(x)
            if excitation is not None:
                x = x + self.source_convs[i](excitation)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        if self.envelope is not None:
            x = x + self.envelope(stem, *pitch).to(x.dtype)
        return torch.tanh(x) if self.cfg.use_tanh_at_final else x.clamp(-1.0, 1.0)

    def predict_pitch(self, latents: torch.Tensor,
                      cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (and cond) as for ``forward`` -> the predictor's log f0 and voicing logits, (batch, frames) fp32:
        what the source plays when given no pitch, or with ``cfg.pitch_code`` what it reads with the code's channels
        zeroed (the code itself is what the source plays then)."""
        if self.pitch is None:
            raise ValueError("BigVGANGenerator.predict_pitch: this generator has no source (source_harmonics=0)")
        if self.cfg.pitch_code:
            latents = torch.cat([latents[:, :-PITCH_CODE_CHANNELS], torch.zeros_like(self._code(latents))], dim=1)
        return self.pitch(self._stem(latents, cond))

    def predict_envelope(self, latents: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """latents (and cond) as for ``forward`` -> the harmonic branch's ln amplitudes (batch, envelope_harmonics,
        frames) fp32 (its waveform silences unvoiced frames)."""
        if self.envelope is None:
            raise ValueError("BigVGANGenerator.predict_envelope: this generator has no harmonic branch "
                             "(envelope_harmonics=0)")
        return self.envelope.log_amplitudes(self._stem(latents, cond))

    def _stem(self, latents: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """conv_pre of the latents, plus the voice offset when conditioned: (batch, C, frames)."""
        if latents.dim() != 3 or latents.shape[1] != self.cfg.in_channels:
            raise ValueError(f"BigVGANGenerator expects latents (batch, {self.cfg.in_channels}, frames), got "
                             f"{tuple(latents.shape)}: transpose (batch, frames, channels) codec output first")
        x = self.conv_pre(latents)
        if self.cond is not None or cond is not None:
            x = x + self._condition(cond, latents.shape[0])
        return x

    def _code(self, latents: torch.Tensor) -> torch.Tensor:
        """The pitch code's channels of latents (batch, in_channels, frames): (batch, PITCH_CODE_CHANNELS, frames)."""
        return latents[:, -PITCH_CODE_CHANNELS:]

    def _excitation(self, x: torch.Tensor, pitch: tuple[torch.Tensor, torch.Tensor] | None, latents: torch.Tensor
                    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """The source's excitation (batch, 1, frames * hop) and the (f0, voiced) driving it, from ``pitch``, the
        latents' pitch code or the predictor; (None, None) without a source."""
        if self.source is None:
            if pitch is not None:
                raise ValueError("BigVGANGenerator: a pitch was given but this generator has no source "
                                 "(source_harmonics=0); build it with source_harmonics set, or pass none")
            return None, None
        if pitch is None and self.cfg.pitch_code:
            pitch = pitch_from_code(self._code(latents), self.cfg.f0_min, self.cfg.f0_max)
        elif pitch is None:
            log_f0, voicing = self.pitch(x)
            pitch = log_f0.exp(), voicing > 0
        f0, voiced = pitch
        if f0.shape != (x.shape[0], x.shape[-1]) or voiced.shape != f0.shape:
            raise ValueError(f"BigVGANGenerator: pitch needs f0 and voiced of shape ({x.shape[0]}, {x.shape[-1]}) "
                             f"(batch, frames), got {tuple(f0.shape)} and {tuple(voiced.shape)}")
        return self.source(f0, voiced), pitch

    def _condition(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """cond (batch, cond_channels) -> its per-channel offset (batch, C, 1), or a clear error."""
        if self.cond is None:
            raise ValueError("BigVGANGenerator: a conditioning vector was given but this generator has "
                             "cond_channels=0; build it with cond_channels set, or pass none")
        if cond is None or cond.shape != (batch, self.cfg.cond_channels):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"BigVGANGenerator (cond_channels={self.cfg.cond_channels}) needs cond of shape "
                             f"({batch}, {self.cfg.cond_channels}), one vector per item; got {got}")
        return self.cond(cond.to(self.cond.weight.dtype)[..., None])

    def remove_weight_norm(self) -> None:
        """Fold weight norm into plain weights (inference; the forward is unchanged)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def _source_conv(channels: int, rate: int) -> nn.Module:
    """(batch, 1, S) excitation -> (batch, channels, S / rate): kernel rate + 2 (rate // 2), stride rate,
    padding rate // 2, which gives exactly S / rate samples for odd and even rates (NSF-HiFiGAN's noise_convs).
    Without weight norm, as NSF-HiFiGAN's: at rate 1 each output channel's weight is one number, whose
    weight-norm direction has no gradient but rounding noise (a 2-rank step differed from one rank's there)."""
    return make_conv(nn.Conv1d, 1, channels, rate + 2 * (rate // 2), stride=rate, padding=rate // 2,
                     weight_norm=False)


def state_dict_from_nvidia(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an NVIDIA ``bigvgan`` state dict (generator or discriminator) to this package's names.

    ``ups.{i}.0.*`` -> ``ups.{i}.*``; the weight-norm hook's ``weight_g``/``weight_v`` -> the
    parametrization's ``parametrizations.weight.original0``/``original1`` (same tensors); the fixed
    resampling ``*.filter`` buffers are dropped (rebuilt here). Load into a module built with
    ``weight_norm=True`` when the source still has weight norm, ``False`` after its ``remove_weight_norm()``.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".filter"):
            continue
        key = re.sub(r"^ups\.(\d+)\.0\.", r"ups.\1.", key)
        key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key)
        key = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)
        out[key] = value
    return out
