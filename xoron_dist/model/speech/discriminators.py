"""BigVGAN's discriminators: multi-period (MPD) and multi-resolution spectrogram (MRD).

Both take a waveform (batch, 1, time) and return, per sub-discriminator, the flattened logits
(batch, n) and the feature maps after every layer (for the feature-matching loss). Run real and
generated audio through separately (the generator's audio detached for the discriminator step):
no layer mixes batch items, so this equals NVIDIA's ``forward(y, y_hat)`` that runs both.

MPD (HiFi-GAN, Kong et al. 2020, arXiv:2010.05646 §2.2): for each period p the waveform is
reflect-padded to a multiple of p and folded to (batch, 1, time/p, p), so 2-D convs with (k, 1)
kernels see every p-th sample: one sub-discriminator per periodic structure. Periods 2, 3, 5, 7, 11
(primes, so the periods overlap as little as possible).

MRD (UnivNet, Jang et al. 2021, arXiv:2106.07889 §3.2; BigVGAN v1, arXiv:2206.04658 §3.3): for each
(n_fft, hop, win) the linear STFT magnitude (batch, 1, n_fft/2+1, frames) goes through 2-D convs.
As in NVIDIA's ``DiscriminatorR`` the STFT is reflect-padded by (n_fft - hop)/2, uncentred, and uses
no analysis window (a rectangular window of ``win`` samples, zero-padded to n_fft). BigVGAN v1's
resolutions [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]] are for 24 kHz; at 16 kHz we keep
the same window and hop *durations* (25/50/10 ms windows, hops scaled by 2/3 and rounded to a
divisor of the 320-sample frame) and the same n_fft: [[1024, 80, 400], [2048, 160, 800], [512, 32, 160]].
(BigVGAN-v2 replaced MRD by a CQT discriminator that needs nnAudio; not built here.)

Layers and names are NVIDIA's (``convs.{i}``, ``conv_post``, ``discriminators.{k}``), weight-normed by
torch's parametrization; ``speech.bigvgan.state_dict_from_nvidia`` renames NVIDIA's ``weight_g/v``.
Init: PyTorch's Conv default (as NVIDIA's discriminators), drawn in module order by ``reset_parameters``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.speech.bigvgan import make_conv, reset_conv_
from xoron_dist.model.speech.losses import stft

LEAKY_SLOPE = 0.1
MPD_PERIODS = (2, 3, 5, 7, 11)
MRD_RESOLUTIONS_16K = ((1024, 80, 400), (2048, 160, 800), (512, 32, 160))

Logits = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


def _check_waveform(x: torch.Tensor, who: str) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"{who} expects a waveform (batch, 1, time), got {tuple(x.shape)}: add the channel dim "
                         "with x.unsqueeze(1)")


class PeriodDiscriminator(nn.Module):
    """One MPD sub-discriminator (NVIDIA ``DiscriminatorP``): (batch, 1, time) -> logits (batch, n), 6 feature maps.

    Channels 32, 128, 512, 1024, 1024 (times ``channel_mult``), kernels (5, 1), strides 3 on the first
    four layers, then a (3, 1) conv to one channel; LeakyReLU(0.1) after every layer but the last.
    """

    def __init__(self, period: int, channel_mult: float = 1.0) -> None:
        super().__init__()
        self.period = period
        chans = [1] + [int(c * channel_mult) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList(
            make_conv(nn.Conv2d, cin, cout, (5, 1), (3, 1) if i < 4 else 1, padding=(2, 0), weight_norm=True)
            for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True))
        )
        self.conv_post = make_conv(nn.Conv2d, chans[-1], 1, (3, 1), 1, padding=(1, 0), weight_norm=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        x = x.view(b, c, -1, self.period)  # (batch, 1, time / period, period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LEAKY_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.flatten(1), fmap


class ResolutionDiscriminator(nn.Module):
    """One MRD sub-discriminator (NVIDIA ``DiscriminatorR``): (batch, 1, time) -> logits (batch, n), 6 feature maps.

    The STFT magnitude (batch, 1, freq, frames) goes through 32 * ``channel_mult`` channel convs with
    (3, 9) kernels (stride 2 along frames on layers 2-4), a (3, 3) conv, and a (3, 3) conv to one channel.
    """

    def __init__(self, resolution: tuple[int, int, int], channel_mult: float = 1.0) -> None:
        super().__init__()
        n_fft, hop, win = resolution
        if not (hop <= win <= n_fft):
            raise ValueError(f"MRD resolution (n_fft, hop, win)={resolution}: need hop <= win <= n_fft")
        self.resolution = resolution
        ch = int(32 * channel_mult)
        specs = [(1, (3, 9), 1, (1, 4))] + [(ch, (3, 9), (1, 2), (1, 4))] * 3 + [(ch, (3, 3), 1, (1, 1))]
        self.convs = nn.ModuleList(
            make_conv(nn.Conv2d, cin, ch, k, stride=s, padding=p, weight_norm=True) for cin, k, s, p in specs
        )
        self.conv_post = make_conv(nn.Conv2d, ch, 1, (3, 3), padding=(1, 1), weight_norm=True)
        self.register_buffer("window", torch.ones(win), persistent=False)  # rectangular, as NVIDIA's (no window)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, time) -> linear magnitude (batch, n_fft/2 + 1, frames), rectangular window (see module doc)."""
        n_fft, hop, win = self.resolution
        pad = (n_fft - hop) // 2
        x = F.pad(x, (pad, pad), mode="reflect").squeeze(1)
        return stft(x, n_fft, hop, win, self.window, center=False).abs().to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.spectrogram(x).unsqueeze(1)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(_strided_conv(conv, x), LEAKY_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.flatten(1), fmap


def _strided_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with an input of 1 or 2 frames zero-padded to 3 for a stride-2 conv and the output cut back:
    torch 2.13's CPU (oneDNN) bf16 conv2d returns garbage or NaN when a stride-2, width-9 kernel makes one output
    frame (measured: every trial at input widths 1 and 2, none at 3-9; fp32 exact). The zeros equal the conv's own
    padding, so the result is the same on every device, and short codec segments (80 ms) reach that width."""
    if conv.stride[-1] == 1 or x.shape[-1] >= 3:
        return conv(x)
    frames = (x.shape[-1] + 2 * conv.padding[-1] - conv.kernel_size[-1]) // conv.stride[-1] + 1
    return conv(F.pad(x, (0, 3 - x.shape[-1])))[..., :frames]


class _DiscriminatorSet(nn.Module):
    """Runs every sub-discriminator on one waveform: (batch, 1, time) -> (logits per sub-D, feature maps per sub-D)."""

    discriminators: nn.ModuleList

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                reset_conv_(m)

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        _check_waveform(x, type(self).__name__)
        outputs = [d(x) for d in self.discriminators]
        return [logits for logits, _ in outputs], [fmap for _, fmap in outputs]


class MultiPeriodDiscriminator(_DiscriminatorSet):
    """HiFi-GAN / BigVGAN MPD: one ``PeriodDiscriminator`` per period (default 2, 3, 5, 7, 11)."""

    def __init__(self, periods: tuple[int, ...] = MPD_PERIODS, channel_mult: float = 1.0) -> None:
        super().__init__()
        if not periods or min(periods) < 1:
            raise ValueError(f"MultiPeriodDiscriminator periods={periods}: give at least one period >= 1")
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channel_mult) for p in periods)
        self.reset_parameters()


class MultiResolutionDiscriminator(_DiscriminatorSet):
    """UnivNet / BigVGAN-v1 MRD: one ``ResolutionDiscriminator`` per (n_fft, hop, win), 16 kHz defaults."""

    def __init__(self, resolutions: tuple[tuple[int, int, int], ...] = MRD_RESOLUTIONS_16K,
                 channel_mult: float = 1.0) -> None:
        super().__init__()
        if not resolutions:
            raise ValueError("MultiResolutionDiscriminator resolutions=(): give at least one (n_fft, hop, win)")
        self.discriminators = nn.ModuleList(ResolutionDiscriminator(tuple(r), channel_mult) for r in resolutions)
        self.reset_parameters()
