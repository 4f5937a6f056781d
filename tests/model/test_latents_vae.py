"""Image KL autoencoder and 3D causal video autoencoder (xoron_dist.model.latents): shapes, the seeded posterior,
the KL formula, parity with diffusers (AutoencoderKL, CogVideoXCausalConv3d), causality, one-frame = image,
streaming = one shot, and a few training steps on synth scenes."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

from xoron_dist.config import ConfigError
from xoron_dist.config.latents import ImageVAEConfig, VAELossConfig, VideoVAEConfig
from xoron_dist.model.latents import CausalConv3d, DiagonalGaussian, ImageVAE, VAELoss, VideoVAE
from xoron_dist.model.latents.losses import kl_loss
from xoron_dist.synth.scenes import render_scene, sample_scene

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TINY_IMAGE = ImageVAEConfig(channels=8, channel_multipliers=[1, 2, 2, 2], blocks_per_level=1, latent_channels=4,
                            norm_groups=4)  # fmt: skip
TINY_VIDEO = VideoVAEConfig(channels=8, channel_multipliers=[1, 2, 2, 2], blocks_per_level=1, latent_channels=4,
                            norm_groups=4, temporal_factor=4)  # fmt: skip


def _video_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> VideoVAE:
    """A tiny video VAE whose temporal resamplers are random too (they start as frame copies), so no time tap is
    special and every equality below is a real one."""
    torch.manual_seed(seed)
    model = VideoVAE(TINY_VIDEO).to(dtype)
    for name, module in model.named_modules():
        if isinstance(module, CausalConv3d) and ".temporal" in name:
            torch.nn.init.normal_(module.conv.weight, std=0.2)
    return model.eval()


def _scenes(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) synth scenes (coloured shapes) as pixels in [-1, 1]."""
    rng = random.Random(seed)
    images = [np.array(render_scene(sample_scene(rng, size, size))) for _ in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- image VAE


def test_image_vae_shapes_and_seeded_sample() -> None:
    torch.manual_seed(0)
    model = ImageVAE(TINY_IMAGE)
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    posterior = model.encode(images)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 4, 3)
    assert model.quant_conv.bias[4:].tolist() == [TINY_IMAGE.initial_logvar] * 4  # the log-variance half
    z = posterior.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, posterior.mean + torch.exp(0.5 * posterior.logvar) * eps)
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(z, posterior.sample(torch.Generator().manual_seed(8)))
    assert model.decode(z).shape == (2, 3, 32, 24)
    out = model(images, generator=torch.Generator().manual_seed(7))
    assert out.reconstruction.shape == images.shape and torch.equal(out.latents, z)


def test_image_vae_names_the_sizes_that_do_not_divide() -> None:
    model = ImageVAE(TINY_IMAGE)
    with pytest.raises(ValueError, match="divisible by 8; got 30x32") as error:
        model.encode(torch.zeros(1, 3, 30, 32))
    assert "\n" not in str(error.value)


def test_kl_matches_the_hand_formula() -> None:
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    posterior = DiagonalGaussian(mean, logvar)
    by_hand = [0.5 * float((m**2 + lv.exp() - 1 - lv).sum()) for m, lv in zip(mean, logvar, strict=True)]
    torch.testing.assert_close(posterior.kl(), torch.tensor(by_hand))
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    reference = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), reference)
    torch.testing.assert_close(kl_loss(posterior, 300), reference.mean() / 300)
    assert float(DiagonalGaussian(torch.zeros(1, 4), torch.zeros(1, 4)).kl()) == 0.0  # q = prior


def test_image_vae_equals_diffusers_autoencoder_kl() -> None:
    """Same module names: diffusers' state dict loads strictly, and encode/sample/decode agree in fp32."""
    torch.manual_seed(0)
    theirs = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                           norm_num_groups=4).eval()  # fmt: skip
    ours = ImageVAE(TINY_IMAGE).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        mine, ref = ours.encode(images), theirs.encode(images).latent_dist
        torch.testing.assert_close(mine.mean, ref.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.logvar, ref.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.kl(), ref.kl(), atol=1e-5, rtol=1e-5)
        z = mine.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, ref.sample(torch.Generator().manual_seed(3)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = ImageVAE(TINY_IMAGE)
    criterion = VAELoss(VAELossConfig())
    images = _scenes(8, 16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        out = model(images, generator=torch.Generator().manual_seed(step))
        loss, terms = criterion.generator_loss(images, out.reconstruction, out.posterior, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert set(terms) == {"l1", "spectral", "gradient", "kl"}
    assert losses[-1] < 0.7 * losses[0], losses


def test_configs_validate_and_name_the_field() -> None:
    ImageVAEConfig().validate("model.image_vae")
    VideoVAEConfig().validate("model.video_vae")
    with pytest.raises(ConfigError, match="model.image_vae.channel_multipliers"):
        ImageVAEConfig(channel_multipliers=[1, 2, 4]).validate("model.image_vae")
    with pytest.raises(ConfigError, match="model.video_vae.temporal_factor"):
        VideoVAEConfig(temporal_factor=3).validate("model.video_vae")
    with pytest.raises(ConfigError, match="model.video_vae.temporal_factor"):
        VideoVAEConfig(temporal_factor=16).validate("model.video_vae")  # only 3 downsamplings to ride on
    with pytest.raises(ConfigError, match="model.image_vae.norm_groups"):
        ImageVAEConfig(channels=24, norm_groups=32).validate("model.image_vae")
    with pytest.raises(ConfigError, match="model.image_vae.loss.kl_weight"):
        ImageVAEConfig(loss=VAELossConfig(kl_weight=-1.0)).validate("model.image_vae")


# --------------------------------------------------------------------------- video VAE


def test_changing_frame_k_leaves_the_latents_that_precede_it_bit_identical() -> None:
    """Latent frame j reads input frames <= 4j (Wan / CogVideoX test design): perturbing frame k leaves every latent
    j with 4j < k bit-identical and changes latent ceil(k / 4)."""
    model = _video_vae()
    video = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        base = model.encode(video)
        for k in (1, 4, 5, 8):
            changed = video.clone()
            changed[:, :, k] += 1.0
            post = model.encode(changed)
            first_seeing = -(-k // 4)
            for j in range(first_seeing):
                assert torch.equal(post.mean[:, :, j], base.mean[:, :, j]), (k, j)
                assert torch.equal(post.logvar[:, :, j], base.logvar[:, :, j]), (k, j)
            assert not torch.equal(post.mean[:, :, first_seeing], base.mean[:, :, first_seeing]), k


def test_decoded_frames_depend_only_on_earlier_latents() -> None:
    model = _video_vae()
    latents = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        base = model.decode(latents)
        changed = latents.clone()
        changed[:, :, 2] += 1.0
        out = model.decode(changed)
    assert torch.equal(out[:, :, :5], base[:, :, :5])  # frames 0..4 come from latents 0 and 1
    assert not torch.equal(out[:, :, 5], base[:, :, 5])


def test_one_frame_video_encodes_exactly_like_an_image() -> None:
    """The video VAE in one-frame mode: a (B, 3, 1, H, W) video through the 3D causal path, and the (B, 3, H, W)
    image through the same weights as 2D ops (each causal kernel summed over time), agree to float64 rounding;
    in both directions (encode and decode)."""
    model = _video_vae(dtype=torch.float64)
    image = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        as_video, as_image = model.encode(image[:, :, None]), model.encode(image)
        assert as_image.mean.shape == (2, 4, 2, 3) and as_video.mean.shape == (2, 4, 1, 2, 3)
        torch.testing.assert_close(as_image.mean, as_video.mean[:, :, 0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(as_image.logvar, as_video.logvar[:, :, 0], atol=1e-12, rtol=1e-12)
        decoded_video, decoded_image = model.decode(as_video.mean), model.decode(as_image.mean)
        assert decoded_video.shape == (2, 3, 1, 16, 24) and decoded_image.shape == (2, 3, 16, 24)
        torch.testing.assert_close(decoded_image, decoded_video[:, :, 0], atol=1e-12, rtol=1e-12)


def test_inflated_video_vae_starts_as_the_image_vae_on_every_fourth_frame() -> None:
    """``inflate_from``: 2D kernels on the last causal tap, temporal resamplers at their frame-copy init. Then latent
    frame j is the image VAE's latent of frame 4j, decoded frame i the image VAE's decoding of latent ceil(i / 4),
    and images encode identically through both."""
    torch.manual_seed(0)
    image_vae = ImageVAE(TINY_IMAGE).double().eval()
    model = VideoVAE(TINY_VIDEO).double().eval()
    model.inflate_from(image_vae)
    video = torch.randn(2, 3, 9, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        posterior = model.encode(video)
        for j in range(3):
            reference = image_vae.encode(video[:, :, 4 * j])
            torch.testing.assert_close(posterior.mean[:, :, j], reference.mean, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(posterior.logvar[:, :, j], reference.logvar, atol=1e-12, rtol=1e-12)
        decoded = model.decode(posterior.mean)
        for i in range(9):
            reference = image_vae.decode(posterior.mean[:, :, -(-i // 4)])
            torch.testing.assert_close(decoded[:, :, i], reference, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(model.encode(video[:, :, 0]).mean, image_vae.encode(video[:, :, 0]).mean)
    other = ImageVAE(dataclasses.replace(TINY_IMAGE, mid_attention=False))
    with pytest.raises(ValueError, match="inflate_from"):
        model.inflate_from(other)


def test_frame_count_rule_and_shapes() -> None:
    model = _video_vae()
    with torch.no_grad():
        for frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
            posterior = model.encode(torch.randn(1, 3, frames, 16, 8))
            assert posterior.mean.shape == (1, 4, latent_frames, 2, 1) == posterior.logvar.shape
            assert model.latent_frames(frames) == latent_frames
            assert model.decode(posterior.mean).shape == (1, 3, frames, 16, 8)
    for frames in (2, 6, 8):
        with pytest.raises(ValueError, match=rf"1 \+ 4·k frames \(1, 5, 9, ...\); got {frames} frames") as error:
            model.encode(torch.randn(1, 3, frames, 16, 16))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="divisible by 8; got 12x16"):
        model.encode(torch.randn(1, 3, 5, 12, 16))


def test_causal_conv_equals_diffusers_cogvideox_causal_conv3d() -> None:
    """One shot and streamed (CogVideoX's conv_cache against ours), kernel 3x3x3, copied weights, fp32."""
    torch.manual_seed(0)
    theirs = CogVideoXCausalConv3d(4, 6, kernel_size=3, pad_mode="constant")
    ours = CausalConv3d(4, 6)
    ours.conv.load_state_dict(theirs.conv.state_dict())
    video = torch.randn(2, 4, 7, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(video), theirs(video)[0], atol=1e-5, rtol=1e-5)
        cache, conv_cache = {}, None
        for chunk in (video[:, :, :3], video[:, :, 3:4], video[:, :, 4:]):
            reference, conv_cache = theirs(chunk, conv_cache=conv_cache)
            torch.testing.assert_close(ours(chunk, cache), reference, atol=1e-5, rtol=1e-5)


def test_strided_causal_conv_streams_and_reads_only_the_past() -> None:
    """Time stride 2: 1 + 2m frames -> 1 + m; output j reads frames 2j-2 .. 2j; a cache carries the window's tail."""
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, (3, 1, 1), (2, 1, 1))
    video = torch.randn(1, 3, 9, 4, 4)
    with torch.no_grad():
        whole = conv(video)
        assert whole.shape[2] == 5
        cache: dict = {}
        streamed = torch.cat(
            [conv(video[:, :, :1], cache), conv(video[:, :, 1:5], cache), conv(video[:, :, 5:], cache)], 2
        )
        torch.testing.assert_close(streamed, whole, atol=1e-6, rtol=1e-6)
        changed = video.clone()
        changed[:, :, 6] += 1
        moved = (conv(changed) - whole).flatten(3).abs().amax((0, 1, 3))
    assert moved.nonzero().flatten().tolist() == [3, 4]  # outputs reading frames 4..6 and 6..8


def test_streamed_encoding_and_decoding_equal_one_shot() -> None:
    """Streaming (first frame, then 4 frames per call, one ConvCache) is the same arithmetic as one shot; float64
    so that the conv backend's frame-count-dependent summation order stays below the tolerance."""
    model = _video_vae(dtype=torch.float64)
    video = torch.randn(1, 3, 13, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        one_shot, streamed = model.encode(video), model.encode_chunked(video)
        torch.testing.assert_close(streamed.mean, one_shot.mean, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(streamed.logvar, one_shot.logvar, atol=1e-12, rtol=1e-12)
        decoded = model.decode(one_shot.mean)
        torch.testing.assert_close(model.decode_chunked(one_shot.mean), decoded, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="groups of 4 frames; got 3"):
        cache: dict = {}
        model.encode(video[:, :, :1], cache)
        model.encode(video[:, :, 1:4], cache)
