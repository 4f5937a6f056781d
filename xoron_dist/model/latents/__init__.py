"""The latent spaces of image and video generation (issue 13).

``image_vae``    ``ImageVAE``: KL autoencoder, (batch, 3, H, W) <-> (batch, C, H/8, W/8), LDM's AutoencoderKL layout
``video_vae``    ``VideoVAE``: 3D causal autoencoder, (batch, 3, 1 + 4k, H, W) <-> (batch, C, 1 + k, H/8, W/8);
                 an image is a one-frame video
``causal_conv``  ``CausalConv3d`` (pads only the past in time, streams through a ``ConvCache``), ``per_frame``
``losses``       ``VAELoss``: L1 + spectral + image-gradient + KL, PatchGAN with hinge or LSGAN objective
"""

from xoron_dist.model.latents.causal_conv import CausalConv3d, ConvCache, per_frame
from xoron_dist.model.latents.image_vae import DiagonalGaussian, ImageVAE, VAEOutput
from xoron_dist.model.latents.losses import PatchDiscriminator, VAELoss
from xoron_dist.model.latents.video_vae import VideoVAE

__all__ = [
    "CausalConv3d",
    "ConvCache",
    "DiagonalGaussian",
    "ImageVAE",
    "PatchDiscriminator",
    "VAELoss",
    "VAEOutput",
    "VideoVAE",
    "per_frame",
]
