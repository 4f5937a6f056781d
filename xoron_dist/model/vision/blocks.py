"""The vision transformer's blocks, shared by the tower (``tower.py``), the seed path's dual-stream
layers and compressor (``compressor.py``) and TiTok's encoder and decoder (``titok.py``, ``decoder.py``).

``VisionBlock``: SigLIP's pre-LN encoder block, its q/k/v/out projections and MLP with biases (HF
``SiglipEncoderLayer`` names), optionally two streams with their own weights attending jointly (the
MMDiT-style dual stream, see ``tower.py``'s docstring); ``VisionTransformer``: the stack with 2D-RoPE,
padding masks, optional latent tokens and the final LayerNorm. Kept apart from the tower so the
modules the tower owns (compressor, TiTok's decoder) can build on the blocks without importing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.common.rope_nd import AxialRoPE, apply_axial_rope
from xoron_dist.utils.host_syncs import on_host


def biased_linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised ``nn.Linear`` with a bias, the bias registered first: the parameter order of
    the tower's checkpoints so far, which DeepSpeed's flat optimizer partitions follow."""
    layer = empty_linear(in_features, out_features, bias=True)
    layer._parameters = {"bias": layer._parameters["bias"], "weight": layer._parameters["weight"]}
    return layer


class AttentionProjections(nn.Module):
    """SigLIP's q/k/v (column) and out (row) projections, all with biases."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = biased_linear(hidden, hidden)
        self.k_proj = biased_linear(hidden, hidden)
        self.v_proj = biased_linear(hidden, hidden)
        self.out_proj = biased_linear(hidden, hidden)


class VisionMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``, SigLIP's MLP."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = biased_linear(hidden, intermediate)
        self.fc2 = biased_linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StreamWeights(nn.Module):
    """One stream's weights in one block (names as HF ``SiglipEncoderLayer``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = AttentionProjections(cfg.hidden_size)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)


class VisionBlock(nn.Module):
    """A pre-LN encoder block over [patches; latents]; with ``dual`` the latents have their own
    weights and both streams attend jointly over the concatenation (MMDiT, see module docstring)."""

    def __init__(self, cfg: VisionConfig, dual: bool) -> None:
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.patch = StreamWeights(cfg)
        self.latent = StreamWeights(cfg) if dual else None

    def _streams(self, x: torch.Tensor, patches: int) -> list[tuple[StreamWeights, torch.Tensor]]:
        if self.latent is None or patches == x.shape[1]:
            return [(self.patch, x)]
        return [(self.patch, x[:, :patches]), (self.latent, x[:, patches:])]

    def forward(self, x: torch.Tensor, patches: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (batch, patches + latents, hidden); rope cos/sin (batch, n, pairs); mask (batch, 1, 1, n) keys."""
        streams = self._streams(x, patches)
        normed = [(w, w.layer_norm1(part)) for w, part in streams]

        def heads(proj: str) -> torch.Tensor:  # (batch, heads, n, head_dim), streams concatenated
            y = torch.cat([getattr(w.self_attn, proj)(h) for w, h in normed], dim=1)
            return y.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        if rope is not None:
            q, k = apply_axial_rope(q, *rope), apply_axial_rope(k, *rope)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        sizes = [part.shape[1] for _, part in streams]
        outputs = zip(streams, attended.split(sizes, dim=1), strict=True)
        x = x + torch.cat([w.self_attn.out_proj(o) for (w, _), o in outputs], dim=1)
        streams = self._streams(x, patches)
        return x + torch.cat([w.mlp(w.layer_norm2(part)) for w, part in streams], dim=1)


class VisionTransformer(nn.Module):
    """The block stack and final norm over patch tokens (+ optional latent tokens); shared by the
    tower and TiTok's encoder/decoder."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg, cfg.dual_stream) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.latent_post_layernorm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
                                      if cfg.dual_stream else None)
        self.rope = AxialRoPE(cfg.hidden_size // cfg.num_heads, axes=2, theta=cfg.rope_theta) if cfg.rope else None

    def forward(self, patches: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None,
                latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """patches (batch, n, hidden), coords (batch, n, 2) (row, col), mask (batch, n) True = real
        patch (None: all real), latents (batch, L, hidden) -> (patches, latents) outputs."""
        n = patches.shape[1]
        x = patches if latents is None else torch.cat([patches, latents], dim=1)
        rope = None
        if self.rope is not None:
            cos, sin = self.rope(coords)
            if latents is not None:  # latent tokens have no position: identity rotation
                cos = torch.cat([cos, cos.new_ones(cos.shape[0], latents.shape[1], cos.shape[2])], dim=1)
                sin = torch.cat([sin, sin.new_zeros(sin.shape[0], latents.shape[1], sin.shape[2])], dim=1)
            rope = (cos, sin)
        key_mask = None
        if mask is not None and not on_host(lambda m: bool(m.all()), mask):  # all real: no key mask
            if latents is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], latents.shape[1])], dim=1)
            key_mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, n, rope, key_mask)
        if latents is None:
            return self.post_layernorm(x), None
        latent_norm = self.post_layernorm if self.latent_post_layernorm is None else self.latent_post_layernorm
        return self.post_layernorm(x[:, :n]), latent_norm(x[:, n:])
