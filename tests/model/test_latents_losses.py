"""Autoencoder losses (xoron_dist.model.latents.losses): spectral and gradient terms, the GAN objectives' signs,
the PatchGAN, and VAELoss switching its GAN term on at disc_start, on images and videos."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config.latents import VAELossConfig, VideoVAEConfig
from xoron_dist.model.latents import PatchDiscriminator, VAELoss, VideoVAE
from xoron_dist.model.latents.image_vae import DiagonalGaussian
from xoron_dist.model.latents.losses import (
    gradient_loss,
    hinge_d_loss,
    hinge_g_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    spectral_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


@pytest.mark.parametrize("loss", [spectral_loss, gradient_loss])
def test_spectral_and_gradient_losses_are_zero_only_for_identical_inputs(loss) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 12)
    assert float(loss(x, x.clone())) == 0.0
    assert float(loss(x + 0.1 * torch.randn_like(x), x)) > 0.0
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert float(loss(blurred, x)) > 0.0


def test_what_each_term_cannot_see_is_why_l1_stays() -> None:
    """|FFT| ignores circular shifts and differences ignore constant offsets; L1 sees both."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    shifted, offset = x.roll(3, dims=-1), x + 0.5
    assert float(spectral_loss(shifted, x)) < 1e-5 and float((shifted - x).abs().mean()) > 0.1
    assert float(gradient_loss(offset, x)) < 1e-6 and float((offset - x).abs().mean()) > 0.1


@pytest.mark.parametrize("d_loss, g_loss", [(hinge_d_loss, hinge_g_loss), (lsgan_d_loss, lsgan_g_loss)])
def test_gan_losses_have_the_right_sign(d_loss, g_loss) -> None:
    real_high, fake_low = torch.full((2, 1, 3, 3), 1.0), torch.full((2, 1, 3, 3), -1.0)
    fooled_real, fooled_fake = torch.full((2, 1, 3, 3), -1.0), torch.full((2, 1, 3, 3), 1.0)
    # The discriminator's loss is lowest when it scores real high and generated low (0 at the hinge margins).
    assert float(d_loss(real_high, fake_low)) == pytest.approx(0.5 if d_loss is lsgan_d_loss else 0.0)
    assert float(d_loss(fooled_real, fooled_fake)) > float(d_loss(real_high, fake_low))
    # The generator's loss falls as the discriminator scores its output as real.
    assert (
        float(g_loss(torch.full((4,), 1.0)))
        < float(g_loss(torch.full((4,), 0.0)))
        < float(g_loss(torch.full((4,), -1.0)))
    )


def test_a_discriminator_step_separates_real_from_generated() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=8, layers=2)
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4, 3, 32, 32)
    assert disc(real).shape == (4, 1, 6, 6)
    opt = torch.optim.SGD(disc.parameters(), lr=0.05)

    def scores() -> tuple[float, float]:  # (L_D, mean D(real) - mean D(fake))
        with torch.no_grad():
            real_logits, fake_logits = disc(real), disc(fake)
        return float(hinge_d_loss(real_logits, fake_logits)), float(real_logits.mean() - fake_logits.mean())

    loss_before, margin_before = scores()
    for _ in range(3):
        loss = hinge_d_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after, margin_after = scores()
    assert loss_after < loss_before and margin_after > margin_before


def test_vae_loss_gan_term_starts_at_disc_start_on_videos() -> None:
    torch.manual_seed(0)
    cfg = VideoVAEConfig(channels=8, channel_multipliers=[1, 2, 2, 2], blocks_per_level=1, latent_channels=4,
                         norm_groups=4, loss=VAELossConfig(discriminator=True, disc_start=2, disc_channels=8,
                                                           disc_layers=2))  # fmt: skip
    model, criterion = VideoVAE(cfg), VAELoss(cfg.loss)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    out = model(video, generator=torch.Generator().manual_seed(0))
    loss, terms = criterion.generator_loss(
        video, out.reconstruction, out.posterior, step=1, last_layer=model.last_layer
    )
    assert "gan" not in terms and criterion.discriminator_loss(video, out.reconstruction, step=1) is None
    loss, terms = criterion.generator_loss(
        video, out.reconstruction, out.posterior, step=2, last_layer=model.last_layer
    )
    assert {"gan", "gan_weight"} <= set(terms) and 0 < float(terms["gan_weight"]) <= 1e4
    loss.backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    d_loss = criterion.discriminator_loss(video, out.reconstruction, step=2)
    d_loss.backward()
    assert all(p.grad is not None for p in criterion.discriminator.parameters())
    with pytest.raises(ValueError, match="last_layer"):
        criterion.generator_loss(video, out.reconstruction.detach(), out.posterior, step=2)


def test_kl_term_is_per_pixel() -> None:
    """The KL term is divided by the pixels of one sample (C·T·H·W), so kl_weight keeps LDM's meaning."""
    criterion = VAELoss(VAELossConfig(l1_weight=0.0, spectral_weight=0.0, gradient_weight=1.0, kl_weight=1.0))
    posterior = DiagonalGaussian(torch.ones(2, 4, 2, 2, 2), torch.zeros(2, 4, 2, 2, 2))  # KL = 0.5 * 32 per sample
    video = torch.zeros(2, 3, 5, 16, 16)
    loss, terms = criterion.generator_loss(video, video, posterior)
    assert float(terms["kl"]) == pytest.approx(16.0 / (3 * 5 * 16 * 16))
    assert float(loss) == pytest.approx(float(terms["kl"]))
