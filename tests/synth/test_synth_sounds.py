"""Synthetic audio: each event sounds like its name."""

import random

import numpy as np
import pytest

from xoron_dist.synth import sounds
from xoron_dist.synth.sounds import SoundEvent

RATE = 16_000


def _peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / RATE)[spectrum.argmax()])


@pytest.mark.parametrize("pitch", sorted(sounds.TONES))
def test_tone_is_at_its_pitch(pitch):
    event = SoundEvent("tone", gap=0.0, pitch=pitch, length="long")
    wave = sounds.render_events([event], RATE, np.random.default_rng(0))
    assert abs(_peak_hz(wave) - sounds.TONES[pitch]) < 5
    assert len(wave) == int(0.5 * RATE) + int(0.1 * RATE)  # the tone, then 0.1 s of tail silence


def test_chirp_direction():
    for rising in (True, False):
        wave = sounds.render_events([SoundEvent("chirp", 0.0, rising=rising)], RATE, np.random.default_rng(0))
        half = int(0.2 * RATE)
        first, second = _peak_hz(wave[:half]), _peak_hz(wave[half:2 * half])
        assert (second > first) == rising


def test_vowel_strongest_harmonic_is_near_its_first_formant():
    for vowel in ("a", "i", "u"):
        wave = sounds.render_events([SoundEvent("vowel", 0.0, vowel=vowel, f0=120.0)], RATE,
                                    np.random.default_rng(0))
        assert abs(_peak_hz(wave) - sounds.FORMANTS[vowel][0]) <= 120.0, vowel


def test_transcript_and_questions():
    events = [SoundEvent("chirp", 0.1, rising=True), SoundEvent("tone", 0.1, pitch="low", length="long"),
              SoundEvent("vowel", 0.1, vowel="a", f0=120.0), SoundEvent("beeps", 0.1, count=3)]
    expected = "A rising chirp, then a long low tone, then the vowel a, then three short beeps."
    assert sounds.transcript(events) == expected
    answers = dict(sounds.events_question(events, random.Random(i)) for i in range(30))
    assert answers == {"How many sounds are there?": "Four.", "What is the first sound?": "A rising chirp.",
                       "What is the last sound?": "Three short beeps."}


def test_samples_stay_in_range():
    rng = random.Random(3)
    for _ in range(50):
        events = sounds.sample_events(rng)
        assert all(not (a.kind == b.kind == "beeps") for a, b in zip(events[:-1], events[1:], strict=True))
        wave = sounds.render_events(events, RATE, np.random.default_rng(rng.getrandbits(64)))
        assert wave.ndim == 1 and 0 < np.abs(wave).max() <= 1.0
