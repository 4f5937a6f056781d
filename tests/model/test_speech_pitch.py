"""The codec decoder's pitch path (``xoron_dist.model.speech.pitch``): YIN tracker (against ``librosa.yin`` and
the synth voices' known pitch), harmonic source, predictor loss, and BigVGAN's source-filter wiring."""

import math

import numpy as np
import pytest
import torch

from tests.model.test_speech_bigvgan import drawn_alike
from xoron_dist.model.speech.bigvgan import BigVGANConfig, BigVGANGenerator
from xoron_dist.model.speech.pitch import (
    HarmonicEnvelope,
    HarmonicSource,
    envelope_loss,
    harmonic_amplitudes,
    harmonic_sines,
    pitch_code,
    pitch_from_code,
    pitch_loss,
    track_pitch,
)
from xoron_dist.synth.sounds import SPEAKERS, _tone, _vowel

RATE, HOP = 16_000, 320
TINY = dict(in_channels=16, upsample_rates=(4, 5), upsample_kernel_sizes=(8, 11), upsample_initial_channel=32,
            resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),))


def _track(wave: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    f0, voiced = track_pitch(torch.from_numpy(wave).float()[None], HOP, RATE, 60.0, 1000.0)
    return f0[0], voiced[0]


def test_tracker_finds_every_synth_voice_pitch_and_agrees_with_librosa_yin():
    """Every vowel of every synth voice (85-320 Hz, jitter up to 2.5 %, breathiness up to 0.5): voiced in 80 % of
    its inner frames (40 % for the breathy baritone, jitter 2.5 % and breathiness 0.5: nearly aperiodic over a
    60 ms window), the median tracked pitch within 2 % of the voice's f0 and 95 % of frames within 5 % (60 % for
    the two breathy voices, whose other frames fall an octave off; over many draws 5-10 %); librosa's
    YIN on the same frames (frame 3 x hop, centred half a hop earlier) within 2 % on the median; tones at their
    frequency; noise and silence unvoiced."""
    import librosa

    for k, voice in enumerate(SPEAKERS):
        for vowel in "aeiou":
            f0 = float(np.random.default_rng(k).uniform(*voice.f0_range))
            wave = 0.5 * _vowel(vowel, f0, RATE, voice, np.random.default_rng(10 * k))
            tracked, voiced = _track(wave)
            breathy = voice.breathiness >= 0.45
            least = 0.4 if voice.jitter >= 0.02 and breathy else 0.8  # the breathy baritone: nearly aperiodic
            assert tracked.shape == (math.ceil(len(wave) / HOP),) and voiced[2:-2].float().mean() >= least, voice.name
            ratio = tracked[voiced].numpy() / f0
            near = 0.6 if breathy else 0.95  # breathy voices: some frames an octave low or high
            assert abs(np.median(ratio) - 1) < 0.02 and (abs(ratio - 1) < 0.05).mean() >= near, (voice.name, vowel)
            theirs = librosa.yin(wave, fmin=60.0, fmax=1000.0, sr=RATE, frame_length=3 * HOP, hop_length=HOP)
            theirs = theirs[: len(tracked)][voiced.numpy()]  # frame t of theirs is centred half a hop before ours
            assert abs(np.median(theirs) / np.median(tracked[voiced].numpy()) - 1) < 0.02
    for hz in (220.0, 440.0, 880.0):
        tracked, voiced = _track(0.5 * _tone(hz, 0.5, RATE))
        assert voiced.all() and abs(float(tracked.median()) / hz - 1) < 0.005, hz
    noise = np.random.default_rng(0).standard_normal(RATE) * 0.3
    assert not _track(noise)[1].any() and not _track(np.zeros(RATE))[1].any()
    with pytest.raises(ValueError, match="raise f0_min"):
        track_pitch(torch.zeros(1, 4000), HOP, RATE, 15.0, 1000.0)


def test_harmonic_source_rings_at_the_frame_pitch_with_a_continuous_phase():
    """One harmonic, merge weight 1: the excitation is tanh(a sin(2π φ)) at each voiced frame's pitch (its
    spectrum peaks there), zero in unvoiced frames, and its phase runs on across a pitch change (no jump larger
    than one sample's advance); length frames x hop; harmonics above Nyquist are silent."""
    source = HarmonicSource(1, HOP, RATE, lambda cls, *a, **k: cls(*a, **k, bias=False))
    with torch.no_grad():
        source.merge.weight.fill_(1.0)
    f0 = torch.tensor([[200.0] * 10 + [300.0] * 10 + [250.0] * 5])
    voiced = torch.ones_like(f0, dtype=torch.bool)
    voiced[0, 20:] = False
    out = source(f0, voiced)[0, 0]
    assert out.shape == (25 * HOP,) and out[20 * HOP:].abs().max() == 0
    for start, hz in ((0, 200.0), (10, 300.0)):
        spectrum = torch.fft.rfft(out[start * HOP: (start + 10) * HOP]).abs()
        assert abs(float(spectrum.argmax()) * RATE / (10 * HOP) - hz) <= RATE / (10 * HOP), hz
    assert (out[1:20 * HOP] - out[:20 * HOP - 1]).abs().max() <= source.amplitude * 2 * math.pi * 300 / RATE * 1.01
    high = HarmonicSource(4, HOP, RATE, lambda cls, *a, **k: cls(*a, **k))
    sines_seen = []
    high.merge.register_forward_hook(lambda m, inputs, out: sines_seen.append(inputs[0]))
    high(torch.full((1, 2), 3000.0), torch.ones(1, 2, dtype=torch.bool))
    assert sines_seen[0][0, :2].abs().max() > 0 and sines_seen[0][0, 2:].abs().max() == 0  # 9, 12 kHz > 8 kHz


def test_pitch_loss_is_per_item_and_counts_voiced_frames_only():
    """Per item: mean |log f0 - log f0_true| over its voiced frames + mean voicing BCE; an item without voiced
    frames has no pitch term, and the values do not depend on which items share the batch."""
    log_f0 = torch.log(torch.tensor([[100.0, 200.0, 50.0], [300.0, 300.0, 300.0]]))
    logits = torch.tensor([[5.0, 5.0, -5.0], [-5.0, -5.0, -5.0]])
    f0 = torch.tensor([[110.0, 200.0, 0.0], [0.0, 0.0, 0.0]])
    voiced = f0 > 0
    loss = pitch_loss(log_f0, logits, f0, voiced)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, voiced.float(), reduction="none").mean(-1)
    torch.testing.assert_close(loss, bce + torch.tensor([abs(math.log(100 / 110)) / 2, 0.0]))
    torch.testing.assert_close(pitch_loss(log_f0[1:], logits[1:], f0[1:], voiced[1:]), loss[1:])


def test_generator_source_follows_the_pitch_given_and_leaves_the_plain_generator_alone():
    """source_harmonics > 0: the generator's other weights are the ones it drew without a source (drawn
    last), a pitch given drives the excitation (two pitches, two waveforms), without one it predicts its own
    (log f0 within [f0_min, f0_max]); zeroed source convs give the plain generator's waveform exactly; a pitch
    for a sourceless generator, or of the wrong shape, is an error naming the fix."""
    plain, pitched = drawn_alike(5, BigVGANConfig(**TINY),
                                 BigVGANConfig(**TINY, source_harmonics=4, f0_min=60.0, f0_max=500.0))
    latents = torch.randn(1, 16, 6)
    voiced = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        low, high = (pitched(latents, pitch=(torch.full((1, 6), hz), voiced)) for hz in (100.0, 300.0))
        assert low.shape == (1, 1, 6 * 20) and not torch.allclose(low, high, atol=1e-4)
        log_f0, voicing = pitched.predict_pitch(latents)
        assert log_f0.shape == voicing.shape == (1, 6)
        assert (log_f0 >= math.log(60.0)).all() and (log_f0 <= math.log(500.0)).all()
        torch.testing.assert_close(pitched(latents), pitched(latents, pitch=(log_f0.exp(), voicing > 0)))
        for conv in pitched.source_convs:
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(pitched(latents, pitch=(torch.full((1, 6), 100.0), voiced)), plain(latents),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="no source"):
        plain(latents, pitch=(torch.full((1, 6), 100.0), voiced))
    with pytest.raises(ValueError, match=r"pitch needs f0 and voiced of shape \(1, 6\)"):
        pitched(latents, pitch=(torch.full((1, 5), 100.0), voiced[:, :5]))
    with pytest.raises(ValueError, match="f0_min"):
        BigVGANConfig(**TINY, source_harmonics=4, f0_min=600.0, f0_max=500.0)


def test_pitch_code_keeps_log_f0_within_half_a_level_and_the_voicing():
    """``pitch_code``: ids 0 unvoiced, 1..levels rising with f0; decoded, a voiced pitch inside the range comes back
    within half a level (in log f0), level centres exactly, pitches outside at the range's ends; generated channels
    past [-1, 1] play the range's ends; fewer than two levels is an error."""
    levels, low, high = 16, 60.0, 1000.0
    step = math.log(high / low) / (levels - 1)
    f0 = torch.cat([torch.logspace(math.log10(low), math.log10(high), 101), torch.tensor([30.0, 2000.0])])[None]
    voiced = torch.ones_like(f0, dtype=torch.bool)
    voiced[0, ::7] = False
    ids, code = pitch_code(f0, voiced, levels, low, high)
    assert code.shape == (1, f0.shape[1], 2) and ids.dtype == torch.long
    assert (ids[~voiced] == 0).all() and ids[voiced].min() >= 1 and ids[voiced].max() <= levels
    assert (ids[0, :101][voiced[0, :101]].diff() >= 0).all() and code[..., 0].abs().max() <= 1
    back, back_voiced = pitch_from_code(code.transpose(1, 2), low, high)
    assert torch.equal(back_voiced, voiced)
    inside = voiced[0, :101]
    error = (back[0, :101] / f0[0, :101]).log().abs()[inside]
    assert error.max() <= step / 2 + 1e-5 and error.max() > step / 4  # rounded, not exact
    assert back[0, 101:].tolist() == pytest.approx([low, high], rel=1e-5)
    centres = torch.exp(math.log(low) + step * torch.arange(levels, dtype=torch.float32))[None]
    exact, _ = pitch_from_code(pitch_code(centres, torch.ones_like(centres, dtype=torch.bool), levels, low,
                                          high)[1].transpose(1, 2), low, high)
    torch.testing.assert_close(exact, centres, rtol=1e-5, atol=0)
    wild, _ = pitch_from_code(torch.tensor([[[3.0, -5.0], [1.0, 1.0]]]), low, high)
    assert wild[0].tolist() == pytest.approx([high, low], rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 levels"):
        pitch_code(f0, voiced, 1, low, high)


def test_generator_with_a_pitch_code_plays_the_code_and_predicts_without_it():
    """pitch_code: the last two input channels drive the source (the same waveform as that pitch passed
    explicitly), a change of those channels alone changes the pitch played, and the predictor reads the latents
    with them zeroed (what it predicts does not depend on them); without the source, or without room for the
    code, the config names the fix."""
    cfg = BigVGANConfig(**dict(TINY, in_channels=18), source_harmonics=4, pitch_code=True, f0_min=60.0, f0_max=500.0)
    torch.manual_seed(0)
    generator = BigVGANGenerator(cfg)
    assert generator.pitch is not None and generator.source is not None
    # built last: placed before the source it shifted the draws of the source's weights, and the bench codec broke
    assert list(dict(generator.named_children()))[-1] == "pitch"
    voiced = torch.ones(1, 6, dtype=torch.bool)
    voiced[0, 4:] = False

    def frames(hz: float) -> torch.Tensor:
        return torch.cat([latents, pitch_code(torch.full((1, 6), hz), voiced, 64, 60.0, 500.0)[1].transpose(1, 2)], 1)

    latents = torch.randn(1, 16, 6)
    with torch.no_grad():
        low = generator(frames(150.0))
        decoded = pitch_from_code(frames(150.0)[:, -2:], 60.0, 500.0)
        torch.testing.assert_close(low, generator(frames(150.0), pitch=decoded), rtol=0, atol=0)
        predicted = generator.predict_pitch(frames(150.0))
        blank = torch.cat([latents, torch.zeros(1, 2, 6)], 1)
        for got, want in zip(predicted, generator.pitch(generator._stem(blank, None)), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for got, want in zip(generator.predict_pitch(frames(300.0)), predicted, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.allclose(low, generator(frames(300.0)), atol=1e-4)
    with pytest.raises(ValueError, match="needs source_harmonics > 0"):
        BigVGANConfig(**dict(TINY, in_channels=18), pitch_code=True)
    with pytest.raises(ValueError, match="in_channels > 2"):
        BigVGANConfig(**dict(TINY, in_channels=2), source_harmonics=4, pitch_code=True)


def test_harmonic_envelope_plays_each_harmonic_at_its_frame_amplitude():
    """The DDSP branch: amplitudes set through its output bias ring at k f0 with exactly those amplitudes (a
    steady frame's spectrum), are silent in unvoiced frames and above Nyquist, ramp linearly between frame
    centres, and start at the branch's base amplitude (zeroed output conv)."""
    branch = HarmonicEnvelope(4, 3, HOP, RATE, lambda cls, *a, **k: cls(*a, **k))
    frames = 20
    x = torch.randn(1, 4, frames)
    f0, voiced = torch.full((1, frames), 250.0), torch.ones(1, frames, dtype=torch.bool)
    voiced[0, 15:] = False
    with torch.no_grad():
        branch.out.weight.zero_()
        branch.out.bias.zero_()
        torch.testing.assert_close(branch.amplitudes(x, voiced)[0, :, 0], torch.full((3,), branch.base))
        wanted = torch.tensor([0.5, 0.2, 0.05])
        branch.out.bias.copy_((wanted / branch.base).log() / branch.gain)
        out = branch(x, f0, voiced)[0, 0]
    assert out.shape == (frames * HOP,) and out[15 * HOP + HOP // 2:].abs().max() == 0
    steady = out[2 * HOP: 12 * HOP]  # 10 frames, a whole number of 250 Hz periods (64 samples each)
    spectrum = torch.fft.rfft(steady).abs() * 2 / steady.shape[0]
    for k, amplitude in enumerate(wanted.tolist(), start=1):
        assert float(spectrum[k * 250 * steady.shape[0] // RATE]) == pytest.approx(amplitude, abs=1e-4)
    assert spectrum[4 * 250 * steady.shape[0] // RATE] < 1e-4  # no fourth harmonic built
    ramp = branch.amplitudes(x, voiced).detach()[:, :1]  # the first harmonic's amplitude falls to 0 over frame 14 -> 15
    upsampled = torch.nn.functional.interpolate(ramp, scale_factor=HOP, mode="linear", align_corners=False)[0, 0]
    assert upsampled[14 * HOP + HOP // 2] == pytest.approx(0.5, abs=2e-3) and upsampled[15 * HOP + HOP // 2] == 0
    high, all_voiced = torch.full((1, frames), 5000.0), torch.ones(1, frames, dtype=torch.bool)
    with torch.no_grad():  # only the first harmonic (5 kHz) is below Nyquist: 10 and 15 kHz are silent
        branch.out.bias.zero_()
        first = branch.base * harmonic_sines(high, all_voiced, branch.multiples[:1], HOP, RATE)[0]
        torch.testing.assert_close(branch(x, high, all_voiced)[0], first)


def test_generator_envelope_branch_adds_its_harmonics_to_the_output_and_needs_the_source():
    """envelope_harmonics > 0: the other weights are those drawn without it (built last), its output is added
    after conv_post (the generator without it plus the branch's own waveform at the same pitch), it follows the
    pitch given, and without the source it is a config error that names the fix."""
    cfg = dict(TINY, source_harmonics=4, f0_min=60.0, f0_max=500.0, use_tanh_at_final=False)
    source_only, both = drawn_alike(5, BigVGANConfig(**cfg), BigVGANConfig(**cfg, envelope_harmonics=6))
    latents, voiced = torch.randn(1, 16, 6), torch.ones(1, 6, dtype=torch.bool)
    pitch = (torch.full((1, 6), 150.0), voiced)
    with torch.no_grad():
        both.envelope.out.bias.fill_(0.3)
        branch = both.envelope(both._stem(latents, None), *pitch)
        expected = (source_only(latents, pitch=pitch) + branch).clamp(-1.0, 1.0)
        torch.testing.assert_close(both(latents, pitch=pitch), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(both(latents, pitch=(torch.full((1, 6), 300.0), voiced)), expected, atol=1e-3)
    with pytest.raises(ValueError, match="set source_harmonics"):
        BigVGANConfig(**TINY, envelope_harmonics=4)


def test_harmonic_amplitudes_read_a_known_spectrum_and_the_envelope_loss_counts_what_counts():
    """Two sinusoids at 200 and 400 Hz (amplitudes 0.5, 0.1) read 0.5, 0.1 and ~0 at f0 = 200 Hz in a whole
    window; the same signal decoded by a branch with those amplitudes reads the same (its output is on the
    targets' scale); harmonics above Nyquist and unvoiced frames do not count; the loss is the mean log
    error over what counts, per item."""
    t = torch.arange(RATE) / RATE
    wave = 0.5 * torch.sin(2 * math.pi * 200 * t + 0.3) + 0.1 * torch.sin(2 * math.pi * 400 * t + 1.0)
    f0, voiced = torch.full((1, 50), 200.0), torch.ones(1, 50, dtype=torch.bool)
    voiced[0, 40:] = False
    f0[0, 45:] = 5000.0
    amps, counts = harmonic_amplitudes(wave[None], f0, voiced, 3, HOP, RATE)
    assert amps.shape == counts.shape == (1, 3, 50)
    torch.testing.assert_close(amps[0, :, 25], torch.tensor([0.5, 0.1, 0.0]), rtol=0, atol=1e-4)
    assert counts[0, :, :40].all() and not counts[0, :, 40:].any()
    _, high = harmonic_amplitudes(wave[None], f0, torch.ones_like(voiced), 3, HOP, RATE)
    assert high[0, 0, 45:].all() and not high[0, 1:, 45:].any()  # 10 and 15 kHz are above Nyquist
    branch = HarmonicEnvelope(4, 3, HOP, RATE, lambda cls, *a, **k: cls(*a, **k))
    with torch.no_grad():
        branch.out.weight.zero_()
        branch.out.bias.copy_((torch.tensor([0.5, 0.1, 1e-6]) / branch.base).log() / branch.gain)
        played = branch(torch.zeros(1, 4, 40), f0[:, :40], voiced[:, :40])[0]
    torch.testing.assert_close(harmonic_amplitudes(played, f0[:, :40], voiced[:, :40], 3, HOP, RATE)[0][0, :, 20],
                               torch.tensor([0.5, 0.1, 0.0]), rtol=0, atol=1e-4)
    exact = (amps + 1e-3).log()
    predicted = exact.clone()
    predicted[0, 0, :10] += 1.0  # one harmonic in 10 of the 40 counted frames, ln-error 1 each
    predicted[0, :, 40:] = 7.0  # frames that do not count
    loss = envelope_loss(torch.cat([predicted, exact]), torch.cat([amps, amps]), torch.cat([counts, counts]))
    assert loss.shape == (2,) and loss[0].item() == pytest.approx(10 / 120, rel=1e-5) and loss[1] == 0
    far = torch.full_like(exact, -30.0).requires_grad_()  # a branch far below the floor still learns
    envelope_loss(far, amps, counts).sum().backward()
    assert (far.grad[counts] < 0).all()
