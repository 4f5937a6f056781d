"""Rectified flow: the Euler sampler and noising against diffusers' FlowMatchEulerDiscreteScheduler, the
timestep density and shifts against diffusers, both samplers on velocity fields with a known endpoint,
determinism, and the loss against a hand derivation."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from xoron_dist.model.generation.flow import (
    euler_sample,
    flow_loss,
    heun_sample,
    interpolate,
    resolution_shift,
    sample_timesteps,
    sampling_times,
    shift_time,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _recording(velocity):
    """A velocity fn that records the (z, t) of every call."""
    calls = []

    def fn(z, t, cond, drop):
        calls.append((z.clone(), t.clone()))
        return velocity(z, t)

    return fn, calls


def _nonlinear_velocity(z, t):
    weight = _randn(z.shape[-1], z.shape[-1], seed=9) / math.sqrt(z.shape[-1])
    return torch.tanh(z @ weight) * (1 + t.view(-1, 1, 1)) + t.view(-1, 1, 1)


def _explicit_sigmas(steps):
    """diffusers' set_timesteps re-shifts its own last sigma (0.42.1, diffusers#13243): give it our grid."""
    return torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()


def test_euler_equals_diffusers_flow_match_euler_step_for_step():
    steps, shift = 8, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=_explicit_sigmas(steps))
    ours = sampling_times(steps, shift)
    torch.testing.assert_close(scheduler.sigmas, ours.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps, 1000 * ours[:-1].float(), rtol=0, atol=1e-4)

    noise = _randn(2, 3, 8, seed=1)
    fn, calls = _recording(_nonlinear_velocity)
    final = euler_sample(fn, noise.shape, None, generator=torch.Generator(), steps=steps, shift=shift, noise=noise)
    assert len(calls) == steps
    sample = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        z, t = calls[i]
        torch.testing.assert_close(z, sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(1000 * t, timestep.expand(2), rtol=0, atol=1e-4)
        sample = scheduler.step(_nonlinear_velocity(sample, t), timestep, sample).prev_sample
    torch.testing.assert_close(final, sample, rtol=0, atol=1e-6)


def test_noising_equals_diffusers_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=_explicit_sigmas(10))
    x0, eps = _randn(4, 3, 5, 5, seed=2), _randn(4, 3, 5, 5, seed=3)
    index = torch.tensor([0, 3, 7, 9])
    expected = scheduler.scale_noise(x0, scheduler.timesteps[index], eps)
    torch.testing.assert_close(interpolate(x0, eps, scheduler.sigmas[index]), expected, rtol=0, atol=1e-6)


def test_logit_normal_timesteps_equal_diffusers_density():
    expected = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(3)
    )
    got = sample_timesteps(64, torch.Generator().manual_seed(3), logit_mean=0.3, logit_std=1.2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    shifted = sample_timesteps(64, torch.Generator().manual_seed(3), logit_mean=0.3, logit_std=1.2, shift=3.0)
    torch.testing.assert_close(shifted, 3 * expected / (1 + 2 * expected), rtol=0, atol=1e-6)


def test_resolution_shift_is_flux_dynamic_shifting():
    """Flux's mu is 0.5 at 256 tokens and 1.15 at 4096; its exponential time shift with mu equals the SD3
    shift with s = exp(mu) (diffusers' scheduler with use_dynamic_shifting)."""
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    tokens = 1024
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=_explicit_sigmas(6), mu=mu)
    torch.testing.assert_close(scheduler.sigmas, sampling_times(6, resolution_shift(tokens)).float(), atol=1e-6, rtol=0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert shift_time(t, 3.0)[0] == 0 and shift_time(t, 3.0)[-1] == 1 and torch.all(shift_time(t, 3.0) >= t)


M, S = 0.7, 0.5  # data ~ N(M, S²) per coordinate


def _gaussian_data_velocity(z, t, cond=None, drop=None):
    """The exact rectified-flow velocity for data N(M, S²): E[eps - x0 | z_t = z], affine in z. Its ODE
    carries z_1 = eps to z_0 = M + S·eps (z_t = (1-t)M + sigma_t·eps, sigma_t² = (1-t)²S² + t²)."""
    t = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    return -M + (t - (1 - t) * S**2) / var * (z - (1 - t) * M)


A = 1.5


def _linear_velocity(z, t, cond=None, drop=None):
    """v = A·z: integrated from t = 1 down to 0, z_0 = z_1·exp(-A)."""
    return A * z


def _errors(field, target, steps, shift, z1):
    out = {}
    for name, sampler in (("euler", euler_sample), ("heun", heun_sample)):
        z0 = sampler(field, z1.shape, None, generator=torch.Generator(), steps=steps, shift=shift, noise=z1)
        out[name] = (z0 - target).abs().max().item()
    return out


def test_samplers_integrate_a_constant_field_exactly():
    z1, c = _randn(3, 8, seed=4, dtype=torch.float64), _randn(3, 8, seed=5, dtype=torch.float64)
    errors = _errors(lambda z, t, cond, drop: c, z1 - c, steps=7, shift=3.0, z1=z1)
    assert max(errors.values()) < 1e-12, errors


@pytest.mark.parametrize(
    "field, shift, euler_max, heun_max",
    [
        # measured at 10 steps (20): gaussian, shift 1: euler 0.135 (0.069), heun 0.0033 (0.00099);
        # linear, shift 3: euler 0.079 (0.037), heun 0.0081 (0.0018)
        pytest.param(_gaussian_data_velocity, 1.0, 0.15, 0.005, id="gaussian-data"),
        pytest.param(_linear_velocity, 3.0, 0.1, 0.01, id="linear-in-z"),
    ],
)
def test_samplers_reach_the_known_endpoint_heun_far_closer(field, shift, euler_max, heun_max):
    z1 = _randn(4, 16, seed=6, dtype=torch.float64)
    target = M + S * z1 if field is _gaussian_data_velocity else z1 * math.exp(-A)
    coarse, fine = _errors(field, target, 10, shift, z1), _errors(field, target, 20, shift, z1)
    assert coarse["euler"] < euler_max and coarse["heun"] < heun_max, coarse
    assert coarse["heun"] < coarse["euler"] / 8, coarse
    # first order: doubling the steps about halves Euler's error; second order: Heun's falls ~4x
    assert 1.6 < coarse["euler"] / fine["euler"] < 2.6, (coarse, fine)
    assert coarse["heun"] / fine["heun"] > 3.0, (coarse, fine)


def test_guidance_combines_conditional_and_null_velocities():
    """v = v_null + g·(v_cond - v_null); the null call is the one with every sample dropped."""
    z1 = _randn(2, 5, seed=7, dtype=torch.float64)
    c_cond, c_null = 0.3, -0.2

    def field(z, t, cond, drop):
        if drop is None:
            return torch.full_like(z, c_cond)
        assert drop.all()
        return torch.full_like(z, c_null)

    for sampler in (euler_sample, heun_sample):
        z0 = sampler(field, z1.shape, None, generator=torch.Generator(), steps=3, guidance_scale=4.0, noise=z1)
        torch.testing.assert_close(z0, z1 - (c_null + 4.0 * (c_cond - c_null)))


def test_same_seed_same_sample():
    def sample(seed, sampler):
        gen = torch.Generator().manual_seed(seed)
        return sampler(_gaussian_data_velocity, (2, 6), None, generator=gen, steps=4, guidance_scale=2.0, shift=3.0)

    for sampler in (euler_sample, heun_sample):
        assert torch.equal(sample(11, sampler), sample(11, sampler))
        assert not torch.equal(sample(11, sampler), sample(12, sampler))


def test_loss_equals_the_hand_derivation():
    x0 = _randn(6, 2, 4, 4, seed=8)
    weight = _randn(4, 4, seed=10)

    def model_fn(z, t, cond, drop):
        return z @ weight * t.view(-1, 1, 1, 1) + cond * (~drop).view(-1, 1, 1, 1)

    losses = flow_loss(
        model_fn, x0, 0.5, torch.Generator().manual_seed(21), logit_mean=0.2, logit_std=0.8, shift=3.0, cfg_dropout=0.5
    )
    gen = torch.Generator().manual_seed(21)
    t = shift_time(torch.sigmoid(torch.randn(6, generator=gen) * 0.8 + 0.2), 3.0).view(-1, 1, 1, 1)
    eps, keep = torch.randn(x0.shape, generator=gen), (torch.rand(6, generator=gen) >= 0.5).view(-1, 1, 1, 1)
    z = (1 - t) * x0 + t * eps
    expected = ((z @ weight * t + 0.5 * keep) - (eps - x0)).pow(2).mean(dim=(1, 2, 3))
    assert losses.shape == (6,)
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-7)
    assert 0 < keep.sum() < 6  # both branches of the condition dropout are exercised
