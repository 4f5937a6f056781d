"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3", arXiv:2403.03206): training loss and samplers.

Convention (SD3 / diffusers ``FlowMatchEulerDiscreteScheduler``): t = 0 is data, t = 1 is noise,

    z_t = (1 - t)·x0 + t·eps,        velocity  v = dz_t/dt = eps - x0,

and the model learns v(z_t, t). Sampling integrates dz/dt = v from t = 1 (pure noise) down to
t = 0, so each step *adds* (t_next - t)·v with t_next < t.

Timesteps: training draws t = sigmoid(u), u ~ N(logit_mean, logit_std) (SD3 §3.1 "logit-normal"),
and both training and sampling warp t by the shift s (SD3 §5.3.2, eq. 23):

    shift_time(t, s) = s·t / (1 + (s - 1)·t)

which spends more steps at high noise for s > 1. Flux's resolution-dependent "dynamic shifting"
(``time_shift_type="exponential"``: exp(mu) / (exp(mu) + 1/t - 1)) is this same map with
s = exp(mu), mu linear in the number of image tokens: ``resolution_shift`` gives that s. The
generator's default (``DiTConfig.time_shift: null``) is Flux's resolution-dependent shift; a number
there is SD3's fixed shift (3.0 in SD3 at 1024²).

Classifier-free guidance (Ho & Salimans 2022): in training a ``cfg_dropout`` share of the samples
is marked ``drop``, and the model replaces their condition by its *learned* null condition (see
``MoEDiT``); in sampling v = v_null + g·(v_cond - v_null).

A ``VelocityFn`` is called ``model_fn(z_t, t, cond, drop)``: z_t (batch, ...), t (batch,) in
[0, 1], ``cond`` passed through untouched, ``drop`` (batch,) bool or None (no sample dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t)·x0 + t·eps; t (batch,) broadcast over the other dims of x0 (diffusers' ``scale_noise``)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """dz_t/dt = eps - x0: the direction from data to noise (sampling walks it backwards)."""
    return eps - x0


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift s·t / (1 + (s - 1)·t): fixes 0 and 1, pushes t towards 1 (noise) for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_mu: float = 0.5, max_mu: float = 1.15
) -> float:
    """Flux's dynamic shift for ``tokens`` image tokens: s = exp(mu), mu linear through (base_tokens,
    base_mu) and (max_tokens, max_mu) (diffusers' ``calculate_shift``; extrapolated outside)."""
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return math.exp(base_mu + slope * (tokens - base_tokens))


def time_shift_for(tokens: int, time_shift: float | None) -> float:
    """The shift of a generator config: ``time_shift`` if set (SD3), else Flux's ``resolution_shift``."""
    return time_shift if time_shift is not None else resolution_shift(tokens)


def sample_timesteps(
    batch: int, generator: torch.Generator, *, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0
) -> torch.Tensor:
    """Training timesteps (batch,) fp32 on ``generator``'s device: shift_time(sigmoid(N(mean, std)), shift)."""
    u = torch.randn(batch, generator=generator, device=generator.device) * logit_std + logit_mean
    return shift_time(torch.sigmoid(u), shift)


def cfg_drop_mask(batch: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(batch,) bool: which samples train unconditionally (each with probability p). Always draws
    ``batch`` uniforms, so the random stream after it does not depend on p."""
    return torch.rand(batch, generator=generator, device=generator.device) < p


def flow_loss(
    model_fn: VelocityFn,
    x0: torch.Tensor,
    cond: Any,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    cfg_dropout: float = 0.0,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample rectified-flow loss (batch,) fp32: mean over each sample of (v_theta(z_t, t) - (eps - x0))².

    Draws from ``generator`` in this order: t (``sample_timesteps``), eps (x0's shape), the drop mask
    (``cfg_drop_mask``). A caller may give its own ``drop`` (batch,) bool instead, which is then used (the
    generator heads draw theirs on the host, which so knows the text tokens without reading the device); the
    mask is drawn all the same, so the stream is where it would be. Unweighted (SD3 puts its weighting into
    the t density, as here).
    """
    batch = x0.shape[0]
    t = sample_timesteps(batch, generator, logit_mean=logit_mean, logit_std=logit_std, shift=shift)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    drawn = cfg_drop_mask(batch, cfg_dropout, generator)
    drop = drawn.to(x0.device) if drop is None else drop
    t = t.to(x0.device)
    v = model_fn(interpolate(x0, eps, t), t, cond, drop)
    return (v.float() - velocity_target(x0, eps).float()).pow(2).flatten(1).mean(dim=1)


def sampling_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 down to 0: ``shift_time`` of a uniform grid (no clamp of the last
    step: diffusers' default grid stops at 1/1000 before its final 0, pass ``sigmas=`` to match)."""
    if steps < 1:
        raise ValueError(f"steps = {steps}: a sampler needs at least one step")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def guided_velocity(model_fn: VelocityFn, z: torch.Tensor, t: float, cond: Any, guidance_scale: float) -> torch.Tensor:
    """v_null + g·(v_cond - v_null) at time t for every sample; one conditional call when g == 1."""
    batch = z.shape[0]
    times = torch.full((batch,), t, dtype=torch.float32, device=z.device)  # fp32 even for bf16 z
    v_cond = model_fn(z, times, cond, None)
    if guidance_scale == 1.0:
        return v_cond
    v_null = model_fn(z, times, cond, torch.ones(batch, dtype=torch.bool, device=z.device))
    return v_null + guidance_scale * (v_cond - v_null)


def _initial_noise(shape: tuple[int, ...], generator: torch.Generator, noise: torch.Tensor | None) -> torch.Tensor:
    return noise if noise is not None else torch.randn(shape, generator=generator, device=generator.device)


@torch.no_grad()
def euler_sample(
    model_fn: VelocityFn,
    shape: tuple[int, ...],
    cond: Any,
    *,
    generator: torch.Generator,
    steps: int,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dz/dt = v from z_1 ~ N(0, I) (``shape``, drawn from ``generator``, or ``noise``) to t = 0
    with ``steps`` Euler steps z <- z + (t_next - t)·v on ``sampling_times(steps, shift)`` (one model
    call per step, two with guidance). Same generator state, same result."""
    z = _initial_noise(shape, generator, noise)
    times = sampling_times(steps, shift).tolist()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        z = z + (t_next - t) * guided_velocity(model_fn, z, t, cond, guidance_scale)
    return z


@torch.no_grad()
def heun_sample(
    model_fn: VelocityFn,
    shape: tuple[int, ...],
    cond: Any,
    *,
    generator: torch.Generator,
    steps: int,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """As ``euler_sample`` with Heun's second-order method (Karras et al. 2022, Alg. 1 without churn):
    an Euler predictor to t_next, then the mean of the two slopes. The last step too is corrected (a
    velocity is defined at t = 0, unlike an eps-prediction), so 2·steps model evaluations."""
    z = _initial_noise(shape, generator, noise)
    times = sampling_times(steps, shift).tolist()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = guided_velocity(model_fn, z, t, cond, guidance_scale)
        predicted = z + (t_next - t) * v
        v_next = guided_velocity(model_fn, predicted, t_next, cond, guidance_scale)
        z = z + (t_next - t) * 0.5 * (v + v_next)
    return z
