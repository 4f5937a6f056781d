"""Autoencoder training terms: L1, spectral, image-gradient, KL, and a PatchGAN with a hinge or LSGAN objective.

x the input, x̂ the reconstruction (pixels in [-1, 1]), F the 2D FFT over (H, W) (orthonormal), ∂_h/∂_w
forward differences; every mean is over batch, channels and pixels (frames fold into the batch):

    L1        mean |x̂ - x|                                       (LDM's pixel term)
    spectral  mean | |F x̂| - |F x| |                               blind to circular shifts (|F| is)
    gradient  ½ (mean |∂_h x̂ - ∂_h x| + mean |∂_w x̂ - ∂_w x|)    blind to constant offsets
    KL        sum over latent elements of KL(q(z|x) || N(0, I)), mean over the batch, / pixels per image

L1 alone trains blurry decoders: the L1-optimal reconstruction of an uncertain edge is a smeared
one. The spectral term penalises the missing high-frequency magnitude and the gradient term the
missing edge contrast (both zero only when those match), while L1 pins what those two cannot see
(position and offset). The KL is normalised by pixels so ``kl_weight`` means what it means in LDM,
whose terms are both sums over pixels (its f8 models: 1e-6).

Discriminator: a PatchGAN (pix2pix, Isola et al. 2017, arXiv:1611.07004 §3.2.2; LDM's
``NLayerDiscriminator``) giving one logit per overlapping patch, with GroupNorm instead of BatchNorm
so a sample's logits never depend on the rest of the batch (or on data-parallel sharding).
Objective ``hinge`` (the default, as VQGAN and LDM; Lim & Ye 2017):

    L_D = ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))      L_G = -mean D(x̂)

or ``lsgan`` (Mao et al. 2017): L_D = ½ (mean (D(x) - 1)² + mean D(x̂)²), L_G = mean (D(x̂) - 1)².
From ``disc_start`` on, the generator adds ``disc_weight · λ · L_G``, with λ VQGAN's adaptive
weight ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4) at the decoder's last layer (Esser et al. 2021,
arXiv:2012.09841 eq. 7), clamped to [0, 1e4]; before it, the generator's loss has no GAN term.
Defaults (``VAELossConfig``): L1 1.0, spectral 0.1, gradient 0.5, KL 1e-6, GAN off (0.5 when on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.latents import VAELossConfig
from xoron_dist.model.latents.image_vae import DiagonalGaussian


def as_images(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, T, H, W) -> (batch·T, C, H, W); images pass unchanged."""
    return x if x.dim() == 4 else x.transpose(1, 2).flatten(0, 1)


def spectral_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean | |F pred| - |F target| | over the 2D (orthonormal, real) FFT of the last two dims."""
    pred_magnitude = torch.fft.rfft2(pred.float(), norm="ortho").abs()
    return (pred_magnitude - torch.fft.rfft2(target.float(), norm="ortho").abs()).abs().mean()


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½ (mean |∂_h pred - ∂_h target| + mean |∂_w pred - ∂_w target|), forward differences on the last two dims."""
    diff = pred - target
    return 0.5 * ((diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() + (diff[..., 1:] - diff[..., :-1]).abs().mean())


def kl_loss(posterior: DiagonalGaussian, pixels_per_sample: int) -> torch.Tensor:
    """Per-sample KL summed over latent elements, mean over the batch, divided by ``pixels_per_sample``."""
    return posterior.kl().mean() / pixels_per_sample


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def lsgan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((real_logits - 1.0).square().mean() + fake_logits.square().mean())


def lsgan_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return (fake_logits - 1.0).square().mean()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "lsgan": (lsgan_d_loss, lsgan_g_loss)}


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's λ = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4), clamped to [0, 1e4] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class PatchDiscriminator(nn.Module):
    """(batch, C, H, W) -> patch logits (batch, 1, H', W'): 4x4 convs, ``layers`` of them at stride 2
    (channels doubling up to 8x), then two at stride 1 (pix2pix's N-layer PatchGAN, 70x70 receptive field at 3)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            modules += [
                nn.Conv2d(width, out, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        modules.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class VAELoss(nn.Module):
    """The weighted terms of the module docstring; owns the discriminator when ``cfg.discriminator``.

    ``generator_loss`` trains the autoencoder, ``discriminator_loss`` the discriminator (call it with the
    same reconstruction; it detaches). Inputs are images (batch, C, H, W) or videos (batch, C, T, H, W).
    """

    def __init__(self, cfg: VAELossConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = (
            PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers) if cfg.discriminator else None
        )
        self.d_loss, self.g_loss = GAN_LOSSES[cfg.disc_loss]

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {term: value}) for the autoencoder; ``last_layer`` is needed for the adaptive GAN weight."""
        cfg = self.cfg
        x, y = as_images(target.float()), as_images(reconstruction.float())
        terms = {
            "l1": (y - x).abs().mean(),
            "spectral": spectral_loss(y, x),
            "gradient": gradient_loss(y, x),
            "kl": kl_loss(posterior, target[0].numel()),
        }
        rec = (
            cfg.l1_weight * terms["l1"]
            + cfg.spectral_weight * terms["spectral"]
            + cfg.gradient_weight * terms["gradient"]
        )
        total = rec + cfg.kl_weight * terms["kl"]
        if self.gan_active(step):
            terms["gan"] = self.g_loss(self.discriminator(y))
            weight = torch.ones((), device=y.device)
            if cfg.adaptive_disc_weight:
                if last_layer is None:
                    raise ValueError("VAELoss: adaptive_disc_weight needs the decoder's last_layer (model.last_layer)")
                weight = adaptive_gan_weight(rec, terms["gan"], last_layer)
            terms["gan_weight"] = weight
            total = total + cfg.disc_weight * weight * terms["gan"]
        return total, {name: value.detach() for name, value in terms.items()}

    def discriminator_loss(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        step: int = 0,
    ) -> torch.Tensor | None:
        """L_D on real ``target`` vs detached ``reconstruction``; None while the GAN is off."""
        if not self.gan_active(step):
            return None
        real = self.discriminator(as_images(target.float()))
        fake = self.discriminator(as_images(reconstruction.detach().float()))
        return self.d_loss(real, fake)
