"""Vision understanding: ``tower`` (SigLIP-2 style ViT, 2D-RoPE, native resolution), ``compressor``
(the seed's dual-stream layers and TiTok-style compressor after the tower), ``titok`` (1D tokenizer),
``siglip`` (HF SigLIP import), ``sharding`` (tensor-parallel plan)."""

from xoron_dist.model.vision.siglip import SiglipImportError, load_siglip_vision
from xoron_dist.model.vision.tower import VisionOutput, VisionTower, prepare_images

__all__ = ["SiglipImportError", "VisionOutput", "VisionTower", "load_siglip_vision", "prepare_images"]
