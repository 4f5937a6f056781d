"""The polyphase resampler: frequencies kept, in phase, content above the new Nyquist removed."""

import numpy as np
import pytest

from data_prep.resample import resample_poly, resampled_length
from tests.data_prep.inputs import sine


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size), n=8 * x.size))
    return float(np.fft.rfftfreq(8 * x.size, 1 / rate)[spectrum.argmax()])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


@pytest.mark.parametrize(("src", "dst", "freq"), [(44_100, 16_000, 1000), (8000, 16_000, 440), (48_000, 16_000, 3000),
                                                  (22_050, 16_000, 5000), (16_000, 44_100, 2500)])
def test_sine_keeps_frequency_amplitude_and_phase(src, dst, freq):
    x = sine(freq, src, 0.5, amplitude=0.5)
    y = resample_poly(x, src, dst)
    assert y.size == resampled_length(x.size, src, dst)
    edge = 64  # the filter sees zeros beyond the ends
    inner = y[edge:-edge]
    assert peak_hz(inner, dst) == pytest.approx(freq, abs=2.0)
    assert rms(inner) == pytest.approx(0.5 / np.sqrt(2), rel=2e-3)
    # Zero phase: output sample m is the input signal at time m / dst.
    expected = 0.5 * np.sin(2 * np.pi * freq * np.arange(y.size) / dst)
    assert np.max(np.abs(inner - expected[edge:-edge])) < 5e-3


@pytest.mark.parametrize("freq", [9000, 12_000, 20_000])
def test_content_above_the_new_nyquist_is_suppressed_not_aliased(freq):
    y = resample_poly(sine(freq, 44_100, 0.5, amplitude=0.5), 44_100, 16_000)
    # A plain decimation would fold 9/12/20 kHz to 7/4/4 kHz at full level; the filter leaves < -70 dB.
    assert rms(y[64:-64]) < 0.5 / np.sqrt(2) * 10 ** (-70 / 20)


def test_equal_rates_copy_and_dc_gain_is_one():
    x = np.linspace(-1, 1, 1000)
    y = resample_poly(x, 16_000, 16_000)
    assert np.array_equal(x, y) and y is not x
    ones = resample_poly(np.ones(4410), 44_100, 16_000)
    assert np.allclose(ones[64:-64], 1.0, atol=1e-6)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rates must be > 0"):
        resample_poly(np.zeros(4), 0, 16_000)
    with pytest.raises(ValueError, match="mono"):
        resample_poly(np.zeros((4, 2)), 8000, 16_000)
