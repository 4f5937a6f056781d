"""Video encoder: frames -> spatio-temporal patch tokens, 3D-RoPE, causal in time, motion-routed MoE.

    frames (T, H, W, 3) uint8 ─► [-1, 1], ≤ max_frames, longer side in [min_res, max_res], padded to p
        ─► per-frame p×p patches (T·h·w, 3p²) ─► patch_embed ─► x            (tokens, hidden)
        └► patch − same patch one frame back ─► motion_embed ─► m            (tokens, motion_dim)
    x ─► [ x += SelfAttn(norm(x); 3D-RoPE(t, y, x); block-causal) ; x += TemporalMoE(norm(x), m) ] × L ─► norm

* **Patches** are per frame (no tubelets), so "a frame never sees later frames" holds token by
  token: the attention mask lets a token of frame t attend to every token of frames ≤ t of its
  own video (block-causal: full within a frame, causal across frames).
* **3D-RoPE** (``xoron_dist.model.common.rope_nd``): each head's dims are split into three axial
  rotations by (frame, patch row, patch column), so attention depends on relative offsets in
  time and space only, and any frame count or resolution works.
* **Motion-aware expert routing**: the temporal MoE uses the DeepSeek-V3 router of
  ``xoron_dist.model.common.moe`` (sigmoid scores, top-k chosen with a load-balancing bias, combine
  weights from the unbiased scores) on ``[norm(x) ; norm(m)]``: the router sees how the patch
  changed since the previous frame (zero in the first frame) next to its content, so static
  and moving patches can go to different experts. ``m`` looks only backwards in time, so
  routing keeps the temporal causality. Routed + shared SwiGLU experts as in the LLM; the
  expert biases are balanced without an auxiliary loss, by the trainer's balancer with every other
  bias-routed MoE (router family ``video``, at ``video.bias_update_rate``).

Videos of different sizes share a batch: tokens are padded to the longest video and masked.
Output: features (batch, tokens, hidden) and a validity mask (batch, tokens), in frame-major
(t, y, x) order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import MoEConfig, VideoConfig
from xoron_dist.model.common.init import empty_linear, init_weights_
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.moe import ExpertBiasRouter, RoutedExperts
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope_nd import AxialRoPE, apply_axial_rope, grid_coords
from xoron_dist.utils.host_syncs import where_true


def frames_to_patches(video: torch.Tensor, cfg: VideoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H, W, 3) uint8 -> patches (T·h·w, 3·p²) in [-1, 1] and their coordinates (T·h·w, 3) = (t, y, x).

    More than ``max_frames`` frames are subsampled evenly (first and last kept); a longer side
    outside [min_resolution, max_resolution] is resized into it (bilinear, antialiased, aspect
    kept); height and width are then zero-padded up to multiples of the patch size.
    """
    if video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"a video is (frames, height, width, 3) uint8; got shape {tuple(video.shape)}")
    frames = video.shape[0]
    if frames > cfg.max_frames:
        keep = torch.linspace(0, frames - 1, cfg.max_frames, device=video.device).round().long()
        video = video[keep]
    x = video.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    height, width = x.shape[-2:]
    longest = max(height, width)
    target = min(max(longest, cfg.min_resolution), cfg.max_resolution)
    if target != longest:
        scale = target / longest
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    p = cfg.patch_size
    height, width = x.shape[-2:]
    rows, cols = math.ceil(height / p), math.ceil(width / p)
    x = F.pad(x, (0, cols * p - width, 0, rows * p - height))
    t = x.shape[0]
    patches = x.view(t, 3, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(t * rows * cols, 3 * p * p)
    return patches, grid_coords(t, rows, cols, device=x.device)


class VideoSelfAttention(nn.Module):
    """Multi-head self-attention with 3D-RoPE on q and k (heads split by tensor parallelism), over the
    middle axis of (groups, n, hidden): whole clips here, frames or per-patch time lines in the factorised
    encoder (``causal``: SDPA's ``is_causal``)."""

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = empty_linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = empty_linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = empty_linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = empty_linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (groups, n, hidden); rope cos/sin (groups, n, pairs); mask bool, broadcastable to
        (groups, 1, n, n), or None."""
        groups, n, _ = x.shape
        q, k, v = (proj(x).view(groups, n, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (groups, heads here, n, head_dim)
        q, k = apply_axial_rope(q, *rope), apply_axial_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(groups, n, -1))


class MotionAwareMoE(nn.Module):
    """Routed + shared SwiGLU experts; the router reads [norm(x) ; norm(motion)]."""

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        moe = MoEConfig(num_experts=cfg.temporal_experts, num_shared_experts=cfg.shared_experts,
                        top_k=cfg.temporal_top_k, expert_intermediate_size=cfg.expert_intermediate_size,
                        bias_update_rate=cfg.bias_update_rate)
        self.motion_norm = RMSNorm(cfg.motion_dim)
        self.router = ExpertBiasRouter(cfg.hidden_size + cfg.motion_dim, moe, family="video")
        self.experts = RoutedExperts(moe.num_experts, cfg.hidden_size, moe.expert_intermediate_size)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.expert_intermediate_size * cfg.shared_experts)
                       if cfg.shared_experts else None)

    def forward(self, x: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """x (tokens, hidden), motion (tokens, motion_dim) -> (tokens, hidden)."""
        chosen, weights = self.router(torch.cat((x, self.motion_norm(motion).to(x.dtype)), dim=-1))
        out = self.experts(x, chosen, weights)
        return out if self.shared is None else out + self.shared(x)


class VideoLayer(nn.Module):
    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = VideoSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size)
        self.ffn = MotionAwareMoE(cfg)

    def forward(self, x, rope, mask, real, motion) -> torch.Tensor:
        """x (batch, n, hidden); real (tokens,): the flat indices of the real tokens in x's (batch, n);
        motion (tokens, motion_dim)."""
        x = x + self.attn(self.attn_norm(x), rope, mask)
        # experts see only real tokens: padding neither costs compute nor counts as expert load
        flat = x.flatten(0, 1)
        update = self.ffn(self.ffn_norm(x).flatten(0, 1).index_select(0, real), motion)
        return flat.index_copy(0, real, flat.index_select(0, real) + update).view_as(x)


class VideoEncoder(nn.Module):
    """list of (T, H, W, 3) uint8 videos -> features (batch, tokens, hidden), mask (batch, tokens)."""

    def __init__(self, cfg: VideoConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.cfg, self.init_std = cfg, init_std
        patch_dim = 3 * cfg.patch_size**2
        self.patch_embed = empty_linear(patch_dim, cfg.hidden_size)
        self.motion_embed = empty_linear(patch_dim, cfg.motion_dim)
        self.rope = AxialRoPE(cfg.hidden_size // cfg.num_heads, axes=3, theta=cfg.rope_theta)
        self.layers = nn.ModuleList(VideoLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The routed experts are drawn after every other weight, layer by layer (the order the
        # seeds of existing runs depend on).
        init_weights_(self, self.init_std, skip=(RoutedExperts,))
        for layer in self.layers:
            layer.ffn.experts.init_weights(self.init_std)

    def forward(self, videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not videos:
            raise ValueError("VideoEncoder needs at least one video")
        dtype = self.patch_embed.weight.dtype
        patched = [frames_to_patches(v, self.cfg) for v in videos]
        n = max(p.shape[0] for p, _ in patched)
        batch, device = len(videos), patched[0][0].device
        patches = torch.zeros(batch, n, patched[0][0].shape[1], device=device)
        coords = torch.zeros(batch, n, 3, dtype=torch.long, device=device)
        valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
        motion = torch.zeros_like(patches)
        for i, ((p, c), video) in enumerate(zip(patched, videos, strict=True)):
            tokens = p.shape[0]
            per_frame = tokens // min(video.shape[0], self.cfg.max_frames)  # the frames frames_to_patches kept
            patches[i, :tokens], coords[i, :tokens], valid[i, :tokens] = p, c, True
            motion[i, per_frame:tokens] = p[per_frame:] - p[:-per_frame]  # same patch, one frame back
        frame = coords[..., 0]
        # block-causal in time within each video; padding keys are never seen (padding queries,
        # frame 0, see their video's first frame and are dropped by the mask the caller gets)
        mask = (valid[:, None, :] & (frame[:, None, :] <= frame[:, :, None]))[:, None]
        cos, sin = self.rope(coords)
        rope = (cos.to(dtype), sin.to(dtype))
        x = self.patch_embed(patches.to(dtype))
        real = where_true(valid, sum(p.shape[0] for p, _ in patched))  # host-known: no read of valid
        motion = self.motion_embed(motion.flatten(0, 1).index_select(0, real).to(dtype))
        for layer in self.layers:
            x = layer(x, rope, mask, real, motion)
        return self.norm(x), valid
