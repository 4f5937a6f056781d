"""Procedural audio: sequences of tones, beeps, chirps, noise bursts and vowels, and their transcripts.

A sequence of ``SoundEvent``s is the ground truth; ``render_events`` synthesises it with numpy
and ``transcript`` names it ("A rising chirp, then a long low tone, then the vowel a."). Events
are classes a listener (or a model) can tell apart: tones at 220 / 440 / 880 Hz, short (0.15 s)
against long (0.5 s), runs of 1500 Hz beeps, chirps sweeping 300 <-> 2000 Hz, white noise, and
vowels a e i o u made additively: every harmonic of a voice pitch f0 (100-180 Hz) gets the summed
gain of resonances at the vowel's first three formants (Peterson & Barney 1952, adult male means).

With ``espeak-ng`` on PATH and asked for (``--espeak``), ``speak`` turns short sentences into
real speech; its output depends on the installed espeak-ng version and voice data, so only
runs on the same machine (or the same espeak-ng build) are byte-identical.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from xoron_dist.synth.scenes import capitalize, number_word

TONES = {"low": 220.0, "middle": 440.0, "high": 880.0}
DURATIONS = {"short": 0.15, "long": 0.5}
BEEP_HZ = 1500.0  # beeps: 0.08 s each, 0.08 s apart, well above the highest tone
# vowel -> (F1, F2, F3) in Hz
FORMANTS = {
    "a": (730.0, 1090.0, 2440.0), "e": (530.0, 1840.0, 2480.0), "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0), "u": (300.0, 870.0, 2240.0),
}  # fmt: skip
EVENT_KINDS = ("tone", "beeps", "chirp", "vowel", "noise")


@dataclass(frozen=True)
class SoundEvent:
    """``kind``: tone (``pitch``, ``length``) | beeps (``count``) | chirp (``rising``) | vowel
    (``vowel``, glottal ``f0``) | noise. ``gap``: silence before it, seconds."""

    kind: str
    gap: float
    pitch: str = ""
    length: str = ""
    count: int = 0
    rising: bool = True
    vowel: str = ""
    f0: float = 0.0

    @property
    def words(self) -> str:
        if self.kind == "tone":
            return f"a {self.length} {self.pitch} tone"
        if self.kind == "beeps":
            return f"{number_word(self.count)} short beeps"
        if self.kind == "chirp":
            return f"a {'rising' if self.rising else 'falling'} chirp"
        if self.kind == "vowel":
            return f"the vowel {self.vowel}"
        return "a burst of noise"


def sample_events(rng: random.Random) -> list[SoundEvent]:
    """One to four events, with 0.05 - 0.15 s of silence before each."""
    events = []
    for _ in range(rng.choices((1, 2, 3, 4), weights=(2, 3, 3, 2))[0]):
        # Beeps never follow beeps: "two beeps, then three beeps" would sound like five.
        kind = rng.choice([k for k in EVENT_KINDS if not (k == "beeps" and events and events[-1].kind == "beeps")])
        gap = rng.uniform(0.05, 0.15)
        if kind == "tone":
            events.append(SoundEvent(kind, gap, pitch=rng.choice(tuple(TONES)), length=rng.choice(tuple(DURATIONS))))
        elif kind == "beeps":
            events.append(SoundEvent(kind, gap, count=rng.randint(2, 4)))
        elif kind == "chirp":
            events.append(SoundEvent(kind, gap, rising=rng.random() < 0.5))
        elif kind == "vowel":
            events.append(SoundEvent(kind, gap, vowel=rng.choice(tuple(FORMANTS)), f0=rng.uniform(100.0, 180.0)))
        else:
            events.append(SoundEvent(kind, gap))
    return events


def transcript(events: list[SoundEvent]) -> str:
    return capitalize(", then ".join(e.words for e in events)) + "."


def _envelope(n: int, rate: int, fade: float = 0.01) -> np.ndarray:
    """Flat with 10 ms linear fades, so events start and stop without clicks."""
    ramp = min(int(fade * rate), n // 2)
    env = np.ones(n)
    if ramp:
        env[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
        env[n - ramp:] = env[:ramp][::-1]
    return env


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.sin(2 * np.pi * freq * t) * _envelope(len(t), rate)


def _chirp(rising: bool, rate: int, seconds: float = 0.4) -> np.ndarray:
    """Exponential sweep 300 -> 2000 Hz (or back), capped below Nyquist."""
    f0, f1 = 300.0, min(2000.0, 0.45 * rate)
    if not rising:
        f0, f1 = f1, f0
    t = np.arange(int(seconds * rate)) / rate
    k = np.log(f1 / f0) / seconds
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return np.sin(phase) * _envelope(len(t), rate)


def _vowel(vowel: str, f0: float, rate: int, seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    harmonics = np.arange(1, int(min(4000.0, 0.45 * rate) / f0) + 1) * f0  # (harmonics,)
    gain = np.zeros_like(harmonics)
    for formant, bandwidth in zip(FORMANTS[vowel], (90.0, 110.0, 170.0), strict=True):
        gain += 1.0 / (1.0 + ((harmonics - formant) / bandwidth) ** 2)
    gain /= np.sqrt(harmonics / f0)  # glottal source tilt
    wave = (gain[:, None] * np.sin(2 * np.pi * harmonics[:, None] * t[None, :])).sum(axis=0)
    return wave / np.abs(wave).max() * _envelope(len(t), rate, fade=0.03)


def render_events(events: list[SoundEvent], rate: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float64 samples in [-1, 1]: (samples,). ``rng`` draws the noise and the loudness."""
    pieces = []
    for event in events:
        pieces.append(np.zeros(int(event.gap * rate)))
        if event.kind == "tone":
            pieces.append(_tone(TONES[event.pitch], DURATIONS[event.length], rate))
        elif event.kind == "beeps":
            for i in range(event.count):
                if i:
                    pieces.append(np.zeros(int(0.08 * rate)))
                pieces.append(_tone(BEEP_HZ, 0.08, rate))
        elif event.kind == "chirp":
            pieces.append(_chirp(event.rising, rate))
        elif event.kind == "vowel":
            pieces.append(_vowel(event.vowel, event.f0, rate))
        else:
            noise = rng.uniform(-1.0, 1.0, int(0.25 * rate))
            pieces.append(noise * _envelope(len(noise), rate))
    pieces.append(np.zeros(int(0.1 * rate)))
    return np.concatenate(pieces) * rng.uniform(0.3, 0.8)


# --------------------------------------------------------------------------- espeak-ng


class EspeakError(RuntimeError):
    """espeak-ng was asked for but is missing or failed."""


def espeak_version() -> str | None:
    """The version line of ``espeak-ng`` on PATH, or None when there is none."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or exe


def speak(text: str, rate: int, rng: random.Random) -> np.ndarray:
    """``text`` spoken by espeak-ng (voice speed and pitch drawn from ``rng``), mono float64 at ``rate``."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakError("espeak-ng is not on PATH: install it (apt-get install espeak-ng) or drop --espeak")
    with tempfile.TemporaryDirectory(prefix="xoron-espeak-") as tmp:
        path = Path(tmp) / "speech.wav"  # a file, not --stdout: a piped WAV header has no length
        cmd = [exe, "-v", "en", "-s", str(rng.randint(140, 190)), "-p", str(rng.randint(30, 70)), "-w", str(path),
               text]
        result = subprocess.run(cmd, capture_output=True, check=False)
        if result.returncode != 0 or not path.is_file():
            stderr = result.stderr.decode(errors="replace").strip()
            raise EspeakError(f"{' '.join(cmd)} failed (exit {result.returncode}): {stderr}")
        wave, native = sf.read(path, dtype="float64", always_2d=True)
    wave = wave.mean(axis=1)
    if native != rate:  # linear interpolation: plenty for synthetic speech, and no extra dependency
        positions = np.arange(int(len(wave) * rate / native)) * native / rate
        wave = np.interp(positions, np.arange(len(wave)), wave)
    peak = np.abs(wave).max()
    return wave / peak * 0.8 if peak > 0 else wave


def events_question(events: list[SoundEvent], rng: random.Random) -> tuple[str, str]:
    """(question, answer) about a sequence; the answer is computed from the events."""
    kind = rng.choice(("count", "first", "last"))
    if kind == "first":
        return "What is the first sound?", capitalize(events[0].words) + "."
    if kind == "last":
        return "What is the last sound?", capitalize(events[-1].words) + "."
    return "How many sounds are there?", capitalize(number_word(len(events))) + "."
