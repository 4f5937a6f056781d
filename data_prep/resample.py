"""Polyphase windowed-sinc resampling of audio, in numpy.

scipy (whose ``signal.resample_poly`` this follows) is not a dependency, and soundfile does not
resample, so this is ours. A rate change ``src -> dst`` is upsampling by ``up`` (zero stuffing),
a low-pass FIR at the lower of the two Nyquist frequencies, and downsampling by ``down``, where
``up / down = dst / src`` in lowest terms. Only the output samples are computed: output ``m``
needs the taps of one polyphase branch of the filter (Crochiere & Rabiner, *Multirate Digital
Signal Processing*, 1983, ch. 3), about ``2 * half_width * max(up, down) / up`` of them.

The filter is a Kaiser-windowed sinc: ``beta = 8`` puts the stopband about 80 dB down; the
cutoff at 0.95 of the lower Nyquist frequency keeps the transition band mostly below it, so
content above the new Nyquist frequency is suppressed rather than folded back (aliasing).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

HALF_WIDTH = 16  # filter half-length in samples of the slower of the two rates
KAISER_BETA = 8.0
CUTOFF = 0.95  # of the lower Nyquist frequency
_CHUNK = 1 << 15  # output samples per vectorised step (bounds the gather to ~_CHUNK * taps floats)


@lru_cache(maxsize=16)
def polyphase_filter(up: int, down: int) -> np.ndarray:
    """The low-pass filter split into its ``up`` branches: ``(up, taps_per_branch)`` float64.

    Branch ``p`` holds taps ``p, p + up, p + 2 up, ...`` of the prototype, whose length is
    ``2 * HALF_WIDTH * max(up, down) + 1`` and whose gain is ``up`` (each branch sums to ~1).
    """
    widest = max(up, down)
    half = HALF_WIDTH * widest
    n = np.arange(-half, half + 1, dtype=np.float64)
    # Ideal low-pass at CUTOFF / (2 * widest) of the upsampled rate, times the Kaiser window.
    prototype = np.sinc(CUTOFF * n / widest) * np.kaiser(n.size, KAISER_BETA)
    prototype *= up / prototype.sum()
    taps = math.ceil(prototype.size / up)
    padded = np.zeros(taps * up)
    padded[: prototype.size] = prototype
    return padded.reshape(taps, up).T.copy()


def resampled_length(samples: int, src_rate: int, dst_rate: int) -> int:
    """``ceil(samples * dst / src)``: the output spans the same time as the input."""
    return -(-samples * dst_rate // src_rate)


def resample_poly(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono ``x`` (samples,) from ``src_rate`` to ``dst_rate`` Hz; float64 (out_samples,).

    Output sample ``m`` sits at time ``m / dst_rate``, the same instant as input sample
    ``m * src_rate / dst_rate`` (zero-phase: the filter's delay is compensated).
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be > 0, got {src_rate} -> {dst_rate}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample_poly takes mono audio (samples,), got shape {x.shape}")
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    if up == down:
        return x.copy()
    branches = polyphase_filter(up, down)  # (up, taps)
    taps = branches.shape[1]
    half = HALF_WIDTH * max(up, down)
    out_len = resampled_length(x.size, src_rate, dst_rate)
    # Zero padding so every gathered index is valid: `taps` before, enough after.
    last_base = ((out_len - 1) * down + half) // up if out_len else 0
    xp = np.zeros(taps + max(x.size, last_base + 1))
    xp[taps : taps + x.size] = x
    lags = np.arange(taps)
    y = np.empty(out_len)
    for start in range(0, out_len, _CHUNK):
        m = np.arange(start, min(start + _CHUNK, out_len), dtype=np.int64)
        pos = m * down + half  # position in the upsampled signal, shifted by the filter delay
        phase, base = pos % up, pos // up
        window = xp[(base + taps)[:, None] - lags[None, :]]  # (chunk, taps): x[base - t]
        y[start : start + m.size] = np.einsum("mt,mt->m", branches[phase], window)
    return y
