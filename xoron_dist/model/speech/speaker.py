"""Speaker embedding for zero-shot voice cloning: ECAPA-TDNN over a learned filterbank of the raw waveform.

    waveform (n, samples), 16 kHz, with lengths (n,) ─► RMS-normalised over each clip's own samples
      ─► learned complex band-pass filterbank, hop 160 (100 frames/s) ─► log |.|       (n, filters, T)
      ─► TDNN k5 ─► SE-Res2Net blocks, dilations 2, 3, 4 (each fed the sum of all before it)
      ─► concatenate the blocks' outputs (multi-layer feature aggregation) ─► TDNN k1  (n, 3C, T)
      ─► attentive statistics pooling (channel- and context-dependent) ─► BatchNorm     (n, 6C)
      ─► linear ─► L2-normalise                                                         (n, embed_dim)

ECAPA-TDNN: Desplanques et al. 2020 (arXiv:2005.07143), with speechbrain's layer order (conv, ReLU,
BatchNorm; tanh inside the attention). Its blocks read 80 mel filterbanks; Xoron keeps mel spectrograms
out of the model, so the front end is learned from the waveform instead:

Front end: SincNet-style parametrised band-pass filters (Ravanelli & Bengio 2018, arXiv:1808.00158),
two learned numbers per filter (lower edge, width), started on the mel scale as in SincNet and then
trained, each paired with its quadrature (sine) twin so the pair is one complex analytic filter
``h[n] = w[n] · 2B sinc(2B n) · exp(i 2π f_c n)``. Why this and not a free strided Conv1d: sampled
every 160 samples, a real filter's output is a random point of an oscillation at the band's frequency,
so ``log |.|`` of it jumps with the phase; the complex pair's magnitude is the band's envelope, which
does not. Two parameters per filter instead of 401 taps also keep the front end from overfitting a few
training voices, and every filter stays a band-pass a reader can plot.

Padding: a clip's embedding does not depend on the clips batched with it. Samples past a clip's length
are zeroed, frames past ``ceil(length / hop)`` are zeroed after every layer (so convolutions see the
zeros a lone clip's own padding would give), BatchNorm statistics use valid frames only, and the
squeeze-excitation means and the attentive pooling ignore padded frames.

``AAMSoftmaxHead`` (additive angular margin, ArcFace: Deng et al. 2019, arXiv:1801.07698; m = 0.2,
s = 30 as in ECAPA) classifies the training speakers; it is a separate module, dropped after training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.speech import SpeakerConfig
from xoron_dist.model.common.norm import BatchNorm1d
from xoron_dist.utils.host_syncs import host_list


def frame_mask(lengths: torch.Tensor, frames: int, hop: int) -> torch.Tensor:
    """(n, frames) bool, True for the ``ceil(length / hop)`` frames whose centre lies inside each clip."""
    return torch.arange(frames, device=lengths.device)[None] < (lengths[:, None] + hop - 1) // hop


def masked_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``norm`` over the valid frames only (training statistics included): x (n, C, T), mask (n, T) ->
    (n, C, T), zero at padded frames. With stored statistics the norm is a per-channel affine map, applied
    to every frame and masked after (the same values, no data-dependent gather: exportable, no host sync)."""
    if not (norm.training or norm.running_mean is None):
        return norm(x) * mask[:, None].to(x.dtype)
    out = x.new_zeros(x.shape[0], x.shape[2], x.shape[1])
    out[mask] = norm(x.transpose(1, 2)[mask])  # (valid frames, C): padding never enters the statistics
    return out.transpose(1, 2)


def masked_statistics(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over time: x (n, C, T), weights (n, C or 1, T) summing to 1 over
    the valid frames (0 at padding) -> two (n, C): ECAPA's weighted mean and standard deviation."""
    mean = (weights * x).sum(-1)
    var = (weights * (x - mean[..., None]) ** 2).sum(-1)
    return mean, var.clamp(min=eps).sqrt()


def _hz_to_mel(hz: float) -> float:
    """The mel scale (O'Shaughnessy 1987): 2595 log10(1 + f / 700)."""
    return 2595.0 * math.log10(1.0 + hz / 700.0)


class ComplexSincFilterbank(nn.Module):
    """Learned analytic band-pass filters over the waveform; log magnitude every ``hop`` samples.

    Filter i passes [f1, f2] with f1 = min_low + |low_i|, f2 = min(f1 + min_band + |band_i|, rate / 2)
    (SincNet's parametrisation, Ravanelli & Bengio 2018, §2): a Hamming-windowed ideal
    low-pass of half-width B = (f2 - f1) / 2, shifted to the centre f_c = (f1 + f2) / 2 by cos and sin.
    """

    def __init__(self, cfg: SpeakerConfig) -> None:
        super().__init__()
        self.rate, self.hop, self.taps = cfg.sample_rate, cfg.hop, cfg.filter_taps
        self.min_low_hz, self.min_band_hz = cfg.min_low_hz, cfg.min_band_hz
        # Band edges start evenly spaced in mel from 30 Hz up, as SincNet's (then they are learned).
        top = cfg.sample_rate / 2 - (cfg.min_low_hz + cfg.min_band_hz)
        mel = torch.linspace(_hz_to_mel(30.0), _hz_to_mel(top), cfg.filters + 1, dtype=torch.float64)
        edges = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
        self.low_hz = nn.Parameter(edges[:-1].float())  # (filters,)
        self.band_hz = nn.Parameter(edges.diff().float())  # (filters,)
        offsets = torch.arange(self.taps, dtype=torch.float32) - self.taps // 2
        self.register_buffer("times", offsets / cfg.sample_rate, persistent=False)  # (taps,) seconds
        self.register_buffer("window", torch.hamming_window(self.taps, periodic=False), persistent=False)

    def kernels(self) -> torch.Tensor:
        """(2 · filters, 1, taps): the real (cos) filters, then their quadrature (sin) twins."""
        low = self.min_low_hz + self.low_hz.abs()
        high = torch.clamp(low + self.min_band_hz + self.band_hz.abs(), max=self.rate / 2)
        half_width, centre = (high - low)[:, None] / 2, (high + low)[:, None] / 2  # (filters, 1) Hz
        lowpass = 2 * half_width / self.rate * torch.sinc(2 * half_width * self.times) * self.window  # DC gain ~1
        angle = 2 * math.pi * centre * self.times
        return torch.cat((lowpass * torch.cos(angle), lowpass * torch.sin(angle)))[:, None]

    def forward(self, waveform: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """waveform (n, samples) -> log band magnitude (n, filters, ceil(samples / hop)); frame t is centred
        on sample t · hop, so the first frame of a clip is the same alone or batched."""
        # the filters are built in fp32 (buffers) and cast to the clip's dtype; the log magnitude is taken in fp32
        out = F.conv1d(waveform[:, None], self.kernels().to(waveform.dtype), stride=self.hop, padding=self.taps // 2)
        real, imag = out.float().chunk(2, dim=1)
        # log |analytic band signal| = 0.5 log(|z|² + eps), written as 0.5 (log eps + log1p(|z|² / eps)): torch's
        # ONNX exporter (onnxscript's optimizer) drops an ``x + 1e-8`` as adding zero, which turns near-silent
        # bands' log magnitudes into -20 instead of -9 in the exported graph (found by the ONNX parity test)
        return (0.5 * (math.log(eps) + torch.log1p((real**2 + imag**2) / eps))).to(waveform.dtype)


class TDNNBlock(nn.Module):
    """Conv1d (zero "same" padding: a lone clip's edge looks like a batched one's) -> ReLU -> BatchNorm."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.norm = BatchNorm1d(cout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n, cin, T), mask (n, T) -> (n, cout, T), zero at padding."""
        return masked_batch_norm(self.norm, F.relu(self.conv(x)), mask)


class SERes2NetBlock(nn.Module):
    """1x1 TDNN -> Res2Net (dilated k3 over channel groups) -> 1x1 TDNN -> squeeze-excitation, plus the input.

    Res2Net (Gao et al. 2019, arXiv:1904.01169): groups x_1..x_s; y_1 = x_1, y_2 = K_2(x_2),
    y_i = K_i(x_i + y_{i-1}), so later groups see ever wider contexts. Squeeze-excitation (Hu et al. 2018,
    arXiv:1709.01507; ECAPA's 1-D SE-Res2Block): channel gates sigmoid(W_2 ReLU(W_1 z)) from the clip's mean
    frame z.
    """

    def __init__(self, channels: int, scale: int, dilation: int, se_channels: int) -> None:
        super().__init__()
        self.scale = scale
        self.reduce = TDNNBlock(channels, channels, 1)
        width = channels // scale
        self.groups = nn.ModuleList(TDNNBlock(width, width, 3, dilation) for _ in range(scale - 1))
        self.expand = TDNNBlock(channels, channels, 1)
        self.se_down = nn.Conv1d(channels, se_channels, 1)
        self.se_up = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n, C, T), mask (n, T) -> (n, C, T), zero at padding."""
        chunks = self.reduce(x, mask).chunk(self.scale, dim=1)
        ys = [chunks[0]]
        for i, group in enumerate(self.groups, start=1):
            ys.append(group(chunks[i] if i == 1 else chunks[i] + ys[-1], mask))
        h = self.expand(torch.cat(ys, dim=1), mask)
        valid = mask[:, None].to(h.dtype)  # (n, 1, T)
        z = h.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)  # (n, C, 1): mean over valid frames
        return h * torch.sigmoid(self.se_up(F.relu(self.se_down(z)))) + x


class AttentiveStatisticsPooling(nn.Module):
    """ECAPA's channel- and context-dependent attentive statistics pooling.

    Each frame is scored per channel c from [h_t ; μ ; σ] (the clip's plain mean and deviation give the
    global context): e_{t,c} = v_c · tanh(W [h_t; μ; σ] + b) + k_c, α_{t,c} = softmax over the valid t;
    out = [Σ_t α h ; sqrt(Σ_t α h² − (Σ_t α h)²)].
    """

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.attend = TDNNBlock(3 * channels, attention_channels, 1)
        self.score = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n, C, T), mask (n, T) -> (n, 2C)."""
        valid = mask[:, None].to(x.dtype)  # (n, 1, T)
        mean, std = masked_statistics(x, valid / valid.sum(-1, keepdim=True))
        frames = x.shape[-1]
        context = torch.cat((x, mean[..., None].expand(-1, -1, frames), std[..., None].expand(-1, -1, frames)), 1)
        scores = self.score(torch.tanh(self.attend(context * valid, mask)))  # (n, C, T)
        alpha = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
        return torch.cat(masked_statistics(x, alpha), dim=1)


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN on the raw waveform: clips (n, samples) at ``cfg.sample_rate`` -> unit vectors (n, embed_dim),
    the reference-speaker input of ``tts.SpeechGenerator`` (its ``speaker_dim`` = ``embed_dim``)."""

    def __init__(self, cfg: SpeakerConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SpeakerConfig()
        cfg.validate("speaker encoder")
        self.cfg = cfg
        self.frontend = ComplexSincFilterbank(cfg)
        self.stem = TDNNBlock(cfg.filters, cfg.channels, 5)
        self.blocks = nn.ModuleList(SERes2NetBlock(cfg.channels, cfg.res2net_scale, d, cfg.se_channels)
                                    for d in cfg.dilations)
        aggregated = cfg.channels * len(cfg.dilations)
        self.aggregate = TDNNBlock(aggregated, aggregated, 1)
        self.pool = AttentiveStatisticsPooling(aggregated, cfg.attention_channels)
        self.pool_norm = BatchNorm1d(2 * aggregated)
        self.embed = nn.Linear(2 * aggregated, cfg.embed_dim)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """waveform (n, samples) zero-padded on the right, lengths (n,) valid samples (None: all) ->
        L2-normalised embeddings (n, embed_dim)."""
        if waveform.dim() != 2:
            raise ValueError(f"speaker encoder: waveform must be (clips, samples), got shape {tuple(waveform.shape)};"
                             " mix to mono and stack clips, padding them on the right")
        n, samples = waveform.shape
        if lengths is None:
            lengths = torch.full((n,), samples, device=waveform.device)
        else:  # checked on the host: from the lengths' host copy (batch_clips keeps one), else one read
            values = host_list(lengths)
            if min(values) < 1 or max(values) > samples:
                raise ValueError(f"speaker encoder: lengths must lie in [1, {samples}] (the padded width), got "
                                 f"{values}")
        return self.embed_clips(waveform, lengths)

    def embed_clips(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``forward`` without its checks (no host reads: the ONNX speaker graph traces this)."""
        samples = waveform.shape[1]
        sample_mask = torch.arange(samples, device=waveform.device)[None] < lengths[:, None]  # (n, samples)
        waveform = waveform * sample_mask
        # Loudness out: each clip scaled to unit RMS over its own samples, so gain is not a speaker cue. In fp32: a
        # clip's sum of squares passes fp16's 65504 within a second of speech (then inf / inf = NaN downstream).
        wave32 = waveform.float()
        rms = (wave32.pow(2).sum(-1, keepdim=True) / lengths[:, None]).sqrt()
        features = self.frontend((wave32 / (rms + 1e-8)).to(waveform.dtype))  # (n, filters, T)
        mask = frame_mask(lengths, features.shape[-1], self.cfg.hop)  # (n, T)
        x = self.stem(features * mask[:, None], mask)
        # ECAPA's residual summation: each block reads the sum of the stem's and all earlier blocks' outputs.
        total, outputs = x, []
        for block in self.blocks:
            outputs.append(block(total, mask))
            total = total + outputs[-1]
        h = self.aggregate(torch.cat(outputs, dim=1), mask)  # (n, 3C, T): multi-layer feature aggregation
        return F.normalize(self.embed(self.pool_norm(self.pool(h, mask))), dim=-1)


class AAMSoftmaxHead(nn.Module):
    """Additive angular margin softmax over the training speakers (ArcFace's loss, Deng et al. 2019).

    logits_j = s · cos θ_j for j ≠ y and s · cos(θ_y + m) for the true speaker y, where θ_j is the angle
    between the embedding and speaker j's learned centre. Past θ_y = π − m, cos(θ_y + m) would rise again,
    so there it becomes cos θ_y − m · sin m (ArcFace's fallback, as speechbrain's AdditiveAngularMargin).
    """

    def __init__(self, embed_dim: int, num_speakers: int, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        if num_speakers < 2:
            raise ValueError(f"AAM-softmax: num_speakers={num_speakers}; classification needs at least 2 speakers")
        self.margin, self.scale = margin, scale
        self.centres = nn.Parameter(torch.empty(num_speakers, embed_dim))
        nn.init.xavier_normal_(self.centres)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (n, embed_dim), labels (n,) speaker indices -> margin logits (n, num_speakers)."""
        cos = F.normalize(embeddings, dim=-1) @ F.normalize(self.centres, dim=-1).T
        sin = (1.0 - cos**2).clamp(min=1e-7).sqrt()
        shifted = cos * math.cos(self.margin) - sin * math.sin(self.margin)  # cos(θ + m)
        shifted = torch.where(cos > math.cos(math.pi - self.margin), shifted,
                              cos - math.sin(math.pi - self.margin) * self.margin)
        target = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(target, shifted, cos)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits: a scalar."""
        return F.cross_entropy(self.logits(embeddings, labels), labels)
