"""MoE-DiT: the image generator, a velocity network v(z_t, t | text) trained by rectified flow (``flow.py``).

    latents (B, C, H, W) ─► p×p patches (B, h·w, C·p²) ─► patch_embed ─► img        (B, n, D)
    LLM states (B, L, cond_dim), mask (B, L) ─► RMSNorm ─► cond_proj ─► txt         (B, L, D)
                                             └► masked mean ─► pooled MLP ─┐
    t (B,) ─► sinusoid(1000·t, 256) ─► time MLP ──────────────────────────(+)─► c   (B, D)
    [img, txt] ─► DualStreamBlock × dual_layers ─► [txt ; img] ─► SingleStreamBlock × single_layers
        ─► img part ─► adaLN(c) ─► Linear(D, p²·C) ─► unpatchify ─► velocity (B, C, H, W)

* **Positions**: 2D axial RoPE (``xoron_dist.model.common.rope_nd``) over the patch (row, column);
  text tokens all sit at (0, 0), i.e. are not rotated (Flux's zero text ids), so text carries no
  position beyond what the LLM put into its states, and any resolution or aspect ratio works.
* **Conditioning**: adaLN-Zero vector c = time embedding + pooled text (SD3 §4, Flux), and the
  text tokens themselves in the joint attention; padded text tokens are masked out as keys.
* **Classifier-free guidance**: a sample marked ``drop`` has its text replaced by a *learned* null
  condition: one token ``null_cond`` (cond_dim, like DiT's extra "null class" embedding) with every
  other text position masked, so the unconditional model never sees the prompt's length.
* **MoE**: the image FFN of each dual-stream block and the FFN of each single-stream block are
  ``MoEFeedForward`` (DeepSeek-V3 router with the aux-loss-free expert bias, family ``image_gen``:
  ``xoron_dist.train.expert_balance`` finds and balances them with the LLM's); text FFNs of the
  dual-stream blocks are dense (HiDream-I1).
* **Init**: every weight N(0, init_std) and biases 0, then adaLN-Zero: every modulation and the
  final layer (its modulation and linear) zero, so the untrained model outputs v = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config.generation import DiTConfig
from xoron_dist.model.common.init import empty_linear, init_weights_
from xoron_dist.model.common.moe import RoutedExperts
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope_nd import AxialRoPE, grid_coords
from xoron_dist.model.generation.dit_blocks import DualStreamBlock, SingleStreamBlock, modulate, real_tokens
from xoron_dist.utils.host_syncs import prefix_mask, with_host_copy

TIME_FREQUENCIES = 256  # sinusoid width of the timestep embedding (DiT, Flux)
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000·t, the timestep scale of SD3/Flux


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)·(W/p), C·p·p), row-major patches, each (C, p, p) flattened (Flux's packing)."""
    batch, channels, height, width = latents.shape
    if height % patch or width % patch:
        raise ValueError(
            f"latents of {height}x{width} do not split into {patch}x{patch} patches: "
            f"pad or resize them to multiples of {patch}"
        )
    rows, cols = height // patch, width // patch
    x = latents.view(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, rows * cols, channels * patch * patch)


def unpatchify(x: torch.Tensor, patch: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, rows·cols, C·p·p) -> (B, C, rows·p, cols·p)."""
    batch = x.shape[0]
    channels = x.shape[-1] // (patch * patch)
    x = x.view(batch, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, rows * patch, cols * patch)


def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_FREQUENCIES, scale: float = TIME_SCALE) -> torch.Tensor:
    """(B,) -> (B, dim) fp32 [cos | sin] of scale·t at frequencies 10000^(-j/(dim/2)) (diffusers' ``Timesteps``
    with flip_sin_to_cos=True, downscale_freq_shift=0, as SD3 and Flux use it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = scale * t.float()[:, None] * freqs[None]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class EmbeddingMLP(nn.Module):
    """``Linear -> SiLU -> Linear``: the timestep and the pooled-text embedders (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = empty_linear(in_dim, hidden, bias=True)
        self.fc2 = empty_linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear(hidden, p²·C): (B, n, hidden), c (B, hidden) -> (B, n, p²·C)."""

    def __init__(self, hidden: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.mod = empty_linear(hidden, 2 * hidden, bias=True)
        self.linear = empty_linear(hidden, out_dim, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(F.silu(cond)).chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, self.eps))


def _dropped_text(mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The text mask of a dropped sample (``drop`` True): its first token only, the null condition."""
    first = torch.arange(mask.shape[1], device=mask.device) == 0
    return torch.where(drop[:, None], first[None], mask)


class MoEDiT(nn.Module):
    """Velocity network: ``forward(latents (B, C, H, W), t (B,), cond, drop) -> velocity (B, C, H, W)``.

    ``cond`` = (states (B, L, cond_dim), mask (B, L) bool or None = all valid): the LLM's hidden
    states of the prompt. ``drop`` (B,) bool: samples conditioned on the learned null condition
    instead. The signature is ``flow.VelocityFn``'s, so ``flow_loss(dit, x0, cond, generator)`` and
    the samplers take the module itself. Latents and states are cast to the weights' dtype and the
    velocity back to the latents' (a sampler may keep its state in fp32 under a bf16 model, as
    diffusers' schedulers do).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden, head_dim, patch_dim = cfg.hidden_size, cfg.attention_head_dim, cfg.latent_channels * cfg.patch_size**2
        self.patch_embed = empty_linear(patch_dim, hidden, bias=True)
        self.time_embed = EmbeddingMLP(TIME_FREQUENCIES, hidden)
        self.pooled_embed = EmbeddingMLP(cfg.cond_dim, hidden)
        self.cond_norm = RMSNorm(cfg.cond_dim, cfg.norm_eps)
        self.cond_proj = empty_linear(cfg.cond_dim, hidden, bias=True)
        self.null_cond = nn.Parameter(torch.empty(cfg.cond_dim))
        self.rope = AxialRoPE(head_dim, axes=2, theta=cfg.rope_theta)
        block_args = dict(moe=cfg.moe, ffn=cfg.ffn, qk_norm=cfg.qk_norm, eps=cfg.norm_eps)
        width = cfg.dense_intermediate_size
        self.dual_layers = nn.ModuleList(
            DualStreamBlock(hidden, cfg.num_heads, head_dim, width, **block_args) for _ in range(cfg.dual_layers)
        )
        self.single_layers = nn.ModuleList(
            SingleStreamBlock(hidden, cfg.num_heads, head_dim, width, **block_args) for _ in range(cfg.single_layers)
        )
        self.final = FinalLayer(hidden, patch_dim, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        init_weights_(self, std, skip=(RoutedExperts,))
        for module in self.modules():  # experts after the rest, in module order
            if isinstance(module, RoutedExperts):
                module.init_weights(std)
        nn.init.normal_(self.null_cond, std=std)
        blocks = [*self.dual_layers, *self.single_layers]
        for linear in [m for block in blocks for m in block.modulations()] + [self.final.mod, self.final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _text(
        self, states: torch.Tensor, mask: torch.Tensor | None, drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dropped samples' text -> [null_cond, masked...]; returns states (B, L, cond_dim), mask (B, L) or None."""
        if states.dim() != 3 or states.shape[-1] != self.cfg.cond_dim:
            raise ValueError(
                f"condition states are (batch, tokens, cond_dim = {self.cfg.cond_dim}); got shape {tuple(states.shape)}"
            )
        if drop is None:
            return states, mask
        batch, length, _ = states.shape
        if mask is None:
            mask = prefix_mask([length] * batch, length, states.device)
        states = torch.where(drop[:, None, None], self.null_cond.to(states.dtype), states)
        # known on the host when the mask and the drop are (the heads': ``real_tokens`` then reads no count)
        return states, with_host_copy(_dropped_text, mask, drop)

    def _conditioning(
        self, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text tokens (B, L, D) and the adaLN vector c (B, D)."""
        states = self.cond_norm(states)
        if mask is None:
            pooled = states.mean(dim=1)
        else:
            weights = mask.to(states.dtype)[..., None]
            pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        dtype = self.patch_embed.weight.dtype
        c = self.time_embed(timestep_sinusoid(t).to(dtype)) + self.pooled_embed(pooled)
        return self.cond_proj(states), c

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        if channels != self.cfg.latent_channels:
            raise ValueError(
                f"latents have {channels} channels; this generator was built for "
                f"latent_channels = {self.cfg.latent_channels}"
            )
        patch, dtype = self.cfg.patch_size, self.patch_embed.weight.dtype
        img = self.patch_embed(patchify(latents, patch).to(dtype))
        rows, cols = height // patch, width // patch
        states, mask = self._text(cond[0].to(dtype), cond[1], drop)
        txt, c = self._conditioning(t.expand(batch), states, mask)
        length, device = txt.shape[1], latents.device
        coords = torch.cat(
            (torch.zeros(length, 2, dtype=torch.long, device=device), grid_coords(rows, cols, device=device))
        )
        rope = self.rope(coords)  # fp32 tables: apply_axial_rope rotates in fp32
        valid = attn_mask = None
        if mask is not None:
            valid = with_host_copy(lambda m: torch.cat((m, m.new_ones(batch, rows * cols)), dim=1), mask)
            attn_mask = valid[:, None, None, :]  # padded text is never a key
        for block in self.dual_layers:
            img, txt = block(img, txt, c, rope, attn_mask)
        x = torch.cat((txt, img), dim=1)
        real = real_tokens(valid)
        for block in self.single_layers:
            x = block(x, c, rope, attn_mask, real)
        return unpatchify(self.final(x[:, length:], c), patch, rows, cols).to(latents.dtype)
