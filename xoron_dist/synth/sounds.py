"""Procedural audio: sequences of tones, beeps, chirps, noise bursts and vowels, and their transcripts.

A sequence of ``SoundEvent``s is the ground truth; ``render_events`` synthesises it with numpy
and ``transcript`` names it ("A rising chirp, then a long low tone, then the vowel a."). Events
are classes a listener (or a model) can tell apart: tones at 220 / 440 / 880 Hz, short (0.15 s)
against long (0.5 s), runs of 1500 Hz beeps, chirps sweeping 300 <-> 2000 Hz, white noise, and
vowels a e i o u made additively: every harmonic of a voice pitch f0 gets the summed gain of
resonances at the vowel's first three formants (Peterson & Barney 1952, adult male means).

Vowels are spoken by a ``Voice``: one of the eight synthetic ``SPEAKERS`` (or ``NEUTRAL_VOICE``).
A voice fixes what stays the same whatever it says: its pitch range, its vocal-tract length
(formants scaled), its spectral tilt, its breathiness and its jitter; the vowel only picks the
formant pattern. So clips of one speaker share a timbre across vowels and speakers differ, which
is what the speaker encoder (``xoron_dist.model.speech.speaker``) is trained to tell apart. Tones,
beeps, chirps and noise are not voiced and sound the same for every speaker.

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
FORMANT_BANDWIDTHS = (90.0, 110.0, 170.0)  # Hz, for the neutral vocal tract
EVENT_KINDS = ("tone", "beeps", "chirp", "vowel", "noise")
VOICED_TOP_HZ = 4000.0  # highest harmonic synthesised (below 0.45 x the rate at 8 kHz and up)


@dataclass(frozen=True)
class Voice:
    """A synthetic speaker: the parameters that stay the same whatever vowels it says.

    ``f0_range``: (low, high) glottal pitch in Hz; each vowel's f0 is drawn uniformly in it.
    ``formant_scale``: the vocal-tract transfer function stretched along frequency by this factor
    (formants and their bandwidths times it). Formants go as 1 / tract length, so 1.18 is a tract
    15 % shorter: the adult female / male ratio; children reach ~1.3 (Peterson & Barney 1952).
    ``tilt``: harmonic k of the glottal source has amplitude k^-tilt (the source's spectral slope,
    Fant 1960): 0.3 is a bright, pressed voice, 1.0 a dark, soft one.
    ``breathiness``: RMS of aspiration noise (white noise through the same vocal tract and tilt)
    relative to the RMS of the voiced part.
    ``jitter``: standard deviation of each glottal cycle's frequency, as a fraction of f0 (cycle to
    cycle perturbation; healthy voices have 0.5 - 1 %, Titze 1994).
    """

    name: str
    f0_range: tuple[float, float]
    formant_scale: float
    tilt: float
    breathiness: float
    jitter: float


NEUTRAL_VOICE = Voice("neutral", (100.0, 180.0), 1.0, 0.5, 0.0, 0.0)  # the voice before speakers existed
# Eight speakers: pitch ranges overlap within the male (0-3) and female (4-6) groups, so telling those
# apart needs the timbre (tract length, tilt, breathiness), not the pitch alone.
SPEAKERS = (
    Voice("bass", (85.0, 105.0), 0.90, 0.9, 0.03, 0.005),
    Voice("tenor", (125.0, 155.0), 1.00, 0.6, 0.05, 0.010),
    Voice("bright baritone", (100.0, 130.0), 1.06, 0.3, 0.02, 0.004),
    Voice("breathy baritone", (105.0, 135.0), 0.98, 0.75, 0.50, 0.025),
    Voice("alto", (170.0, 210.0), 1.12, 0.7, 0.10, 0.008),
    Voice("soprano", (220.0, 270.0), 1.20, 0.45, 0.05, 0.006),
    Voice("breathy alto", (180.0, 225.0), 1.16, 0.95, 0.45, 0.015),
    Voice("child", (260.0, 320.0), 1.32, 0.5, 0.08, 0.010),
)  # fmt: skip


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


def sample_events(rng: random.Random, voice: Voice = NEUTRAL_VOICE) -> list[SoundEvent]:
    """One to four events, with 0.05 - 0.15 s of silence before each; vowels at a pitch in ``voice``'s range."""
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
            events.append(SoundEvent(kind, gap, vowel=rng.choice(tuple(FORMANTS)), f0=rng.uniform(*voice.f0_range)))
        else:
            events.append(SoundEvent(kind, gap))
    return events


def sample_vowels(rng: random.Random, voice: Voice, count: int) -> list[SoundEvent]:
    """``count`` vowels (any of a e i o u, repeats allowed) at pitches in ``voice``'s range, 0.05 - 0.15 s
    apart: an utterance for training or testing a speaker encoder."""
    return [SoundEvent("vowel", rng.uniform(0.05, 0.15), vowel=rng.choice(tuple(FORMANTS)),
                       f0=rng.uniform(*voice.f0_range)) for _ in range(count)]


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


def _vocal_tract_gain(freqs: np.ndarray, vowel: str, scale: float) -> np.ndarray:
    """Summed resonance gains (same shape as ``freqs``) of ``vowel``'s three formants, the transfer
    function stretched along frequency by ``scale`` (a vocal tract 1 / ``scale`` as long)."""
    gain = np.zeros_like(freqs)
    for formant, bandwidth in zip(FORMANTS[vowel], FORMANT_BANDWIDTHS, strict=True):
        gain += 1.0 / (1.0 + ((freqs - scale * formant) / (scale * bandwidth)) ** 2)
    return gain


def _vowel(vowel: str, f0: float, rate: int, voice: Voice, rng: np.random.Generator,
           seconds: float = 0.4) -> np.ndarray:
    """(samples,) peak-normalised: harmonics k·f0 of a jittered glottal source with amplitude k^-tilt
    through ``voice``'s vocal tract, plus aspiration noise through the same tract."""
    n = int(seconds * rate)
    k = np.arange(1, int(min(VOICED_TOP_HZ, 0.45 * rate) / f0) + 1)  # harmonic numbers, (harmonics,)
    # Jitter: one frequency per nominal glottal cycle, integrated into the phase (in cycles of f0).
    cycle_f0 = f0 * (1.0 + voice.jitter * rng.standard_normal(int(seconds * f0) + 1))
    phase = np.cumsum(cycle_f0[(np.arange(n) * f0 / rate).astype(int)]) / rate  # (samples,)
    gain = _vocal_tract_gain(k * f0, vowel, voice.formant_scale) * k ** -voice.tilt
    voiced = (gain[:, None] * np.sin(2 * np.pi * k[:, None] * phase[None, :])).sum(axis=0)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum *= _vocal_tract_gain(freqs, vowel, voice.formant_scale) * (np.maximum(freqs, f0) / f0) ** -voice.tilt
    spectrum[freqs > min(VOICED_TOP_HZ, 0.45 * rate)] = 0.0
    breath = np.fft.irfft(spectrum, n)
    breath *= voice.breathiness * np.sqrt(np.mean(voiced**2) / np.mean(breath**2))
    wave = voiced + breath
    return wave / np.abs(wave).max() * _envelope(n, rate, fade=0.03)


def render_events(events: list[SoundEvent], rate: int, rng: np.random.Generator,
                  voice: Voice = NEUTRAL_VOICE) -> np.ndarray:
    """Mono float64 samples in [-1, 1]: (samples,), vowels spoken by ``voice``. ``rng`` draws the
    noise, the voice's jitter and breath, and the loudness."""
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
            pieces.append(_vowel(event.vowel, event.f0, rate, voice, rng))
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
