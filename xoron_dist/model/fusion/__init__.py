"""Gated cross-attention fusion of text with the media of its own document (``layers``), and its
tensor-parallel plan (``sharding``)."""

from xoron_dist.model.fusion.layers import FusionLayers, GatedCrossAttentionLayer, MediaContext

__all__ = ["FusionLayers", "GatedCrossAttentionLayer", "MediaContext"]
