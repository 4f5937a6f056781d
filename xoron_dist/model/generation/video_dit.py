"""Video MoE-DiT: the image generator's blocks over a causal VAE's latents, causal over chunks of frames.

    latents (B, C, T, H, W) ─► per-frame p×p patches (B, T·h·w, C·p²) ─► patch_embed ─► img   (B, N, D)
                            └► patch − same patch one frame back ─► motion_embed ─► m      (B, N, motion_dim)
    prompt ─► text stream through every block, attending to text only ─► text K/V per block
    t (B, K): one time per chunk ─► c_k = time_embed(t_k) + pooled text          (B, K, D)
    img ─► DualStreamBlock × dual_layers ─► SingleStreamBlock × single_layers ─► adaLN(c_k) ─► velocity

* **Blocks**: ``dit_blocks.DualStreamBlock`` and ``SingleStreamBlock``, the image generator's own
  modules (same names, so the image plan ``generation.sharding`` and an image checkpoint apply).
  Their ``forward`` takes one adaLN vector per sample; a video has one per chunk, and generation
  needs the keys and values of past chunks, so ``video_dual_step`` / ``video_single_step`` run the
  blocks' own sub-modules with per-chunk modulation and a key/value prefix. With one time for every
  chunk and no prefix they compute what ``forward`` computes with the block-causal mask (tested).
* **Block-causal attention** (CausVid, Yin et al. 2024, arXiv:2412.07772; MAGI-1, arXiv:2505.13211):
  patches are per frame (1 in time), frame f is in chunk f // chunk_frames, and a video token of
  chunk q sees every video token of chunks k <= q (full attention within a chunk), CausVid's
  ``kv_idx < ends[q_idx]``. Text: every video token sees every (valid) text token, and **text
  attends to text only**: the text stream then depends on the prompt alone, so its keys and values
  are computed once per prompt and shared by every chunk (as Wan/CausVid's cross-attention keys
  are), and no text token can carry a later chunk into an earlier one.
* **3D RoPE** (``rope_nd``): axial over (frame, patch row, patch column); text sits at (0, 0, 0)
  (not rotated). Each axis rotates 2·(D//6) of a head's D dims (time first, the rest unrotated). In
  frame 0 the time dims are not rotated, and (row, col) get exactly the image generator's 2D rope of
  a head of 4·(D//6) dims, on head dims [2·(D//6), 6·(D//6)) (tested).
* **Per-chunk time** (Diffusion Forcing, Chen et al. 2024; MAGI-1): each chunk k has its own t_k,
  and its tokens are modulated by c_k; the text stream is modulated as at t = 0 (a fixed vector per
  prompt, so the text keys stay valid for every chunk and step).
* **Motion-aware experts** (the video encoder's ``MotionAwareMoE``): every MoE is a
  ``MotionRoutedMoE``, whose router reads [token ; RMSNorm(m)], m the embedded difference between a
  latent patch and the same patch one frame earlier (zero in the first frame and for text). It
  looks only backwards, so routing keeps the causality. Router family ``video_gen``: the trainer's
  ``ExpertBalancer`` balances it at ``moe.bias_update_rate``.
* **Training** (``video_flow_loss``): rectified flow per chunk (``flow.py``'s convention: t = 0
  data, t = 1 noise, target eps − x0). A ``context_clean_prob`` share of samples is teacher-forced:
  a random prefix of 1..K−1 chunks is clean (t = 0), as the past is when generating, and gives no
  loss; every other chunk has its own logit-normal t (diffusion forcing: also a noisy past).
* **Generation** (``generate_video``; the cache: ``video_cache``): chunk by chunk with a KV cache;
  a finished chunk is re-encoded at t = 0 from its clean latents (CausVid) and its keys/values
  appended. A generated chunk equals the full forward pass over [clean past at t = 0 ; this chunk
  at t] (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import MoEConfig
from xoron_dist.config.video_generation import VideoDiTConfig
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.common.moe import ExpertBiasRouter, MoEFeedForward
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope_nd import AxialRoPE, apply_axial_rope, grid_coords
from xoron_dist.model.generation.dit import MoEDiT, patchify, timestep_sinusoid, unpatchify
from xoron_dist.model.generation.dit_blocks import DualStreamBlock, SingleStreamBlock, attend, modulate, real_tokens
from xoron_dist.model.generation.flow import (
    cfg_drop_mask,
    euler_sample,
    heun_sample,
    sample_timesteps,
    time_shift_for,
    velocity_target,
)
from xoron_dist.model.generation.video_cache import ChunkKVCache, KeyValues

ROUTER_FAMILY = "video_gen"  # the expert balancer's family: updated at model.video_gen.moe.bias_update_rate
Rope = tuple[torch.Tensor, torch.Tensor]


def check_video_shape(shape: tuple[int, ...], cfg: VideoDiTConfig) -> tuple[int, int, int]:
    """(B, C, T, H, W) -> (frames, patch rows, patch cols), or a one-line ValueError naming the sizes."""
    if len(shape) != 5:
        raise ValueError(f"video latents are (batch, channels, frames, height, width); got shape {tuple(shape)}")
    _, channels, frames, height, width = shape
    chunk_frames = cfg.chunk_frames
    if channels != cfg.latent_channels:
        raise ValueError(
            f"latents have {channels} channels; this generator was built for latent_channels = {cfg.latent_channels}"
        )
    if frames < 1 or frames % chunk_frames:
        nearest = max(chunk_frames, frames // chunk_frames * chunk_frames)
        raise ValueError(
            f"latents have {frames} frames: not a whole number of chunks of chunk_frames = {chunk_frames} "
            f"latent frames; use a multiple of {chunk_frames} (e.g. {nearest})"
        )
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(
            f"latent frames of {height}x{width} do not split into {p}x{p} patches: "
            f"pad or resize them to multiples of {p}"
        )
    return frames, height // p, width // p


def video_patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T·h·w, C·p²): each frame patchified as an image (``dit.patchify``), frame-major."""
    batch, channels, frames, height, width = latents.shape
    images = latents.transpose(1, 2).reshape(batch * frames, channels, height, width)
    return patchify(images, patch).reshape(batch, frames * (height // patch) * (width // patch), -1)


def video_unpatchify(x: torch.Tensor, patch: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``video_patchify``: (B, T·rows·cols, C·p²) -> (B, C, T, rows·p, cols·p)."""
    batch = x.shape[0]
    images = unpatchify(x.reshape(batch * frames, rows * cols, -1), patch, rows, cols)
    return images.view(batch, frames, *images.shape[1:]).transpose(1, 2).contiguous()


def frame_motion(patches: torch.Tensor, per_frame: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """patches (B, F·m, P) -> (B, F·m, P): each patch minus the same patch one frame earlier. The first
    frame's earlier frame is ``previous`` (B, m, P), the last frame of the chunk before; none: zero."""
    first = torch.zeros_like(patches[:, :per_frame]) if previous is None else patches[:, :per_frame] - previous
    return torch.cat((first, patches[:, per_frame:] - patches[:, :-per_frame]), dim=1)


def block_causal_mask(
    chunk_ids: torch.Tensor, text_valid: torch.Tensor | None, text_len: int, past: int
) -> torch.Tensor:
    """Which keys each video query sees: (B or 1, 1, n, text_len + past + n) bool, True = may attend.

    Keys are [text ; ``past`` tokens of earlier chunks ; the n queries' own tokens]; ``chunk_ids`` (n,)
    is the chunk of each query. Text: the valid tokens (``text_valid`` (B, L); None: all); past: all;
    own tokens: CausVid's rule, chunk of key <= chunk of query.
    """
    n, device = chunk_ids.shape[0], chunk_ids.device
    own = chunk_ids[None, :] <= chunk_ids[:, None]  # (n, n)
    text = torch.ones(1, 1, text_len, dtype=torch.bool, device=device) if text_valid is None else text_valid[:, None]
    rows = text.shape[0]
    parts = (text.expand(rows, n, text_len), own.new_ones(rows, n, past), own.expand(rows, n, n))
    return torch.cat(parts, dim=-1)[:, None]


def modulate_chunks(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``dit_blocks.modulate`` per chunk: x (B, K·m, D) of K chunks of m tokens, shift/scale (B, K, D)."""
    batch, n, dim = x.shape
    chunks = shift.shape[1]
    normed = F.layer_norm(x, (dim,), eps=eps).view(batch, chunks, n // chunks, dim)
    return (normed * (1 + scale[:, :, None]) + shift[:, :, None]).view(batch, n, dim)


def gate_chunks(gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """gate (B, K, D) times update (B, K·m, D), chunk by chunk."""
    batch, n, dim = update.shape
    chunks = gate.shape[1]
    return (gate[:, :, None] * update.view(batch, chunks, n // chunks, dim)).view(batch, n, dim)


class MotionRoutedMoE(MoEFeedForward):
    """``MoEFeedForward`` whose router reads [x ; RMSNorm(motion)] (the video encoder's ``MotionAwareMoE``);
    the experts see x alone. ``motion`` None (text tokens, or a block's own ``forward``): zero motion."""

    def __init__(self, hidden: int, motion_dim: int, cfg: MoEConfig, eps: float = 1e-6) -> None:
        super().__init__(hidden, cfg, eps, ROUTER_FAMILY)  # its router (hidden wide) is replaced: it reads motion too
        self.router = ExpertBiasRouter(hidden + motion_dim, cfg, eps, ROUTER_FAMILY)
        self.motion_norm = RMSNorm(motion_dim, eps)

    def forward(self, x: torch.Tensor, motion: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., hidden), motion (..., motion_dim) or None -> (..., hidden)."""
        flat = x.reshape(-1, x.shape[-1])
        if motion is None:
            seen = flat.new_zeros(flat.shape[0], self.motion_norm.weight.shape[0])  # RMSNorm(0) = 0
        else:
            seen = self.motion_norm(motion.reshape(flat.shape[0], -1)).to(flat.dtype)
        chosen, weights = self.router(torch.cat((flat, seen), dim=-1))
        out = self.experts(flat, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)


def text_dual_step(
    block: DualStreamBlock, txt: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, KeyValues]:
    """The text stream of a dual-stream block, attending to text only: txt (B, L, D), cond (B, D),
    mask (B, 1, 1, L) or None -> txt, (k, v) (B, heads, L, head_dim) for the video queries."""
    mod = block.txt_mod(F.silu(cond)).chunk(6, dim=-1)
    q, k, v = block.txt_attn.qkv(modulate(txt, mod[0], mod[1], block.eps))
    txt = txt + mod[2][:, None] * block.txt_attn.out_proj(attend(q, k, v, None, mask))
    txt = txt + mod[5][:, None] * block.txt_ffn(modulate(txt, mod[3], mod[4], block.eps))
    return txt, (k, v)


def text_single_step(
    block: SingleStreamBlock, txt: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor | None,
    real: torch.Tensor | None,
) -> tuple[torch.Tensor, KeyValues]:
    """A single-stream block on the text tokens alone (``valid`` (B, L): the keys; ``real``, its flat
    indices (``real_tokens``): the tokens the experts see)."""
    shift, scale, gate = block.mod(F.silu(cond)).chunk(3, dim=-1)
    h = modulate(txt, shift, scale, block.eps)
    q, k, v = block.attn.qkv(h)
    update = block.attn.out_proj(attend(q, k, v, None, None if valid is None else valid[:, None, None]))
    return txt + gate[:, None] * block.add_ffn(update, h, real), (k, v)


def _attend_after(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope, prefix: list[KeyValues], mask: torch.Tensor
) -> tuple[torch.Tensor, KeyValues]:
    """Rotate q, k; attend to [prefix keys (text, past chunks) ; k] -> (B, n, heads·hd), rotated (k, v)."""
    q, k = apply_axial_rope(q, *rope), apply_axial_rope(k, *rope)
    keys = torch.cat([kv[0] for kv in prefix] + [k], dim=2)
    values = torch.cat([kv[1] for kv in prefix] + [v], dim=2)
    return attend(q, keys, values, None, mask), (k, v)


def video_dual_step(
    block: DualStreamBlock, img: torch.Tensor, cond: torch.Tensor, motion: torch.Tensor,
    rope: Rope, prefix: list[KeyValues], mask: torch.Tensor,
) -> tuple[torch.Tensor, KeyValues]:  # fmt: skip
    """The video stream of a dual-stream block: img (B, K·m, D) tokens of K whole chunks, cond (B, K, D)
    per-chunk adaLN vectors, motion (B, K·m, motion_dim), rope tables of these tokens, ``prefix`` the
    (k, v) of the text and of past chunks, mask (B|1, 1, K·m, keys) -> img, this block's rotated (k, v)."""
    mod = block.img_mod(F.silu(cond)).chunk(6, dim=-1)
    q, k, v = block.img_attn.qkv(modulate_chunks(img, mod[0], mod[1], block.eps))
    out, kv = _attend_after(q, k, v, rope, prefix, mask)
    img = img + gate_chunks(mod[2], block.img_attn.out_proj(out))
    img = img + gate_chunks(mod[5], block.img_ffn(modulate_chunks(img, mod[3], mod[4], block.eps), motion))
    return img, kv


def video_single_step(
    block: SingleStreamBlock, img: torch.Tensor, cond: torch.Tensor, motion: torch.Tensor,
    rope: Rope, prefix: list[KeyValues], mask: torch.Tensor,
) -> tuple[torch.Tensor, KeyValues]:  # fmt: skip
    """A single-stream block on the video tokens (arguments as ``video_dual_step``)."""
    shift, scale, gate = block.mod(F.silu(cond)).chunk(3, dim=-1)
    h = modulate_chunks(img, shift, scale, block.eps)
    out, kv = _attend_after(*block.attn.qkv(h), rope, prefix, mask)
    update = block.attn.out_proj(out) + block.ffn(h, motion)
    return img + gate_chunks(gate, update), kv


class VideoMoEDiT(MoEDiT):
    """Velocity network ``forward(latents (B, C, T, H, W), t (B,) or (B, K), cond, drop) -> velocity``.

    ``t``: one time per sample, or one per chunk (K = T / chunk_frames). ``cond``/``drop`` as in
    ``MoEDiT`` (the image generator this extends: its embedders, learned null condition, blocks and
    final layer). Generation: ``start_cache`` / ``cached_velocity`` / ``commit_chunk`` (driven by
    ``generate_video``).
    """

    def __init__(self, cfg: VideoDiTConfig) -> None:
        super().__init__(cfg)
        self.cfg: VideoDiTConfig = cfg
        self.rope = AxialRoPE(cfg.attention_head_dim, axes=3, theta=cfg.rope_theta)
        self.motion_embed = empty_linear(cfg.latent_channels * cfg.patch_size**2, cfg.motion_dim)
        for block in self.dual_layers:
            block.img_ffn = MotionRoutedMoE(cfg.hidden_size, cfg.motion_dim, cfg.moe, cfg.norm_eps)
        for block in self.single_layers:
            block.ffn = MotionRoutedMoE(cfg.hidden_size, cfg.motion_dim, cfg.moe, cfg.norm_eps)
        # drawn again: ``MoEDiT.__init__`` drew the weights of the image experts just replaced
        self.reset_parameters()

    def video_grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(frames, patch rows, patch cols) of latents of ``shape`` (B, C, T, H, W), or a one-line ValueError."""
        return check_video_shape(tuple(shape), self.cfg)

    def _blocks(self) -> list[tuple[nn.Module, Callable[..., tuple[torch.Tensor, KeyValues]]]]:
        return [(b, video_dual_step) for b in self.dual_layers] + [(b, video_single_step) for b in self.single_layers]

    def _chunk_cond(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """t (B, K), pooled text embedding (B, D) -> adaLN vectors (B, K, D) = time_embed(t_k) + pooled."""
        batch, chunks = t.shape
        times = self.time_embed(timestep_sinusoid(t.reshape(-1)).to(pooled.dtype)).view(batch, chunks, -1)
        return times + pooled[:, None]

    def _encode_prompt(
        self, cond: tuple[torch.Tensor, torch.Tensor | None], drop: torch.Tensor | None
    ) -> tuple[list[KeyValues], torch.Tensor | None, torch.Tensor]:
        """-> every block's text (k, v), the text validity (B, L) or None, and the pooled text embedding (B, D)."""
        dtype = self.patch_embed.weight.dtype
        states, mask = self._text(cond[0].to(dtype), cond[1], drop)
        states = self.cond_norm(states)
        if mask is None:
            pooled = states.mean(dim=1)
        else:
            weights = mask.to(states.dtype)[..., None]
            pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        pooled = self.pooled_embed(pooled)
        txt, c_txt = self.cond_proj(states), self._chunk_cond(pooled.new_zeros(states.shape[0], 1), pooled)[:, 0]
        kv, attn_mask = [], None if mask is None else mask[:, None, None]
        for block in self.dual_layers:
            txt, layer_kv = text_dual_step(block, txt, c_txt, attn_mask)
            kv.append(layer_kv)
        real = real_tokens(mask)
        for block in self.single_layers:
            txt, layer_kv = text_single_step(block, txt, c_txt, mask, real)
            kv.append(layer_kv)
        return kv, mask, pooled

    def _video_pass(
        self, patches: torch.Tensor, previous: torch.Tensor | None, grid: tuple[int, int, int], first_frame: int,
        cond: torch.Tensor, text_kv: list[KeyValues], past_kv: list[KeyValues] | None, mask: torch.Tensor,
    ) -> tuple[torch.Tensor, list[KeyValues]]:  # fmt: skip
        """patches (B, F·m, C·p²) of whole chunks from frame ``first_frame`` on, ``previous`` (B, m, C·p²) the
        frame before them, grid (F, rows, cols), cond (B, K, D) -> final tokens (B, F·m, D), every block's (k, v)."""
        frames, rows, cols = grid
        img = self.patch_embed(patches)
        motion = self.motion_embed(frame_motion(patches, rows * cols, previous))
        coords = grid_coords(frames, rows, cols, device=patches.device)
        coords[:, 0] += first_frame
        rope = self.rope(coords)  # fp32 tables: apply_axial_rope rotates in fp32
        new_kv = []
        for i, (block, step) in enumerate(self._blocks()):
            prefix = [text_kv[i]] + ([] if past_kv is None else [past_kv[i]])
            img, kv = step(block, img, cond, motion, rope, prefix, mask)
            new_kv.append(kv)
        return img, new_kv

    def _velocity(self, img: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Final layer per chunk, unpatchified: (B, F·m, D), cond (B, K, D) -> (B, C, F, H, W)."""
        shift, scale = self.final.mod(F.silu(cond)).chunk(2, dim=-1)
        out = self.final.linear(modulate_chunks(img, shift, scale, self.final.eps))
        return video_unpatchify(out, self.cfg.patch_size, *grid)

    def chunk_times(self, t: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
        """t () / (B,) / (B, K) -> (B, K) fp32, or a one-line ValueError naming the shapes."""
        if t.dim() <= 1 and t.numel() in (1, batch):
            return t.reshape(-1, 1).expand(batch, chunks).float()
        if tuple(t.shape) != (batch, chunks):
            raise ValueError(
                f"t has shape {tuple(t.shape)}; expected (batch,) = ({batch},) or (batch, chunks) = ({batch}, "
                f"{chunks}): one time per chunk of chunk_frames = {self.cfg.chunk_frames} latent frames"
            )
        return t.float()

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        grid = self.video_grid(latents.shape)
        batch, frames, dtype = latents.shape[0], grid[0], self.patch_embed.weight.dtype
        t = self.chunk_times(t, batch, frames // self.cfg.chunk_frames)
        text_kv, text_valid, pooled = self._encode_prompt(cond, drop)
        cond_k = self._chunk_cond(t.to(latents.device), pooled)
        chunk_ids = torch.arange(frames, device=latents.device).repeat_interleave(grid[1] * grid[2])
        mask = block_causal_mask(chunk_ids // self.cfg.chunk_frames, text_valid, text_kv[0][0].shape[2], 0)
        patches = video_patchify(latents, self.cfg.patch_size).to(dtype)
        img, _ = self._video_pass(patches, None, grid, 0, cond_k, text_kv, None, mask)
        return self._velocity(img, cond_k, grid).to(latents.dtype)

    # ------------------------------------------------------------------ generation with a KV cache

    def start_cache(self, cond: tuple[torch.Tensor, torch.Tensor | None], null: bool = False) -> ChunkKVCache:
        """The prompt's text keys/values (or the learned null condition's, ``null``), no chunk yet."""
        batch = cond[0].shape[0]
        drop = torch.ones(batch, dtype=torch.bool, device=cond[0].device) if null else None
        return ChunkKVCache(*self._encode_prompt(cond, drop))

    def _cached_pass(
        self, z: torch.Tensor, t: torch.Tensor, cache: ChunkKVCache
    ) -> tuple[torch.Tensor, torch.Tensor, list[KeyValues], torch.Tensor]:
        grid = self.video_grid(z.shape)
        if grid[0] != self.cfg.chunk_frames:
            raise ValueError(f"a cached step takes one chunk of {self.cfg.chunk_frames} latent frames; got {grid[0]}")
        patches = video_patchify(z, self.cfg.patch_size).to(self.patch_embed.weight.dtype)
        cond = self._chunk_cond(t.reshape(-1, 1).expand(z.shape[0], 1).float(), cache.pooled)
        chunk_ids = torch.zeros(patches.shape[1], dtype=torch.long, device=z.device)
        mask = block_causal_mask(chunk_ids, cache.text_valid, cache.text_len, cache.past_len)
        img, new_kv = self._video_pass(
            patches, cache.last_patches, grid, cache.frames, cond, cache.text_kv, cache.past_kv, mask
        )
        return img, cond, new_kv, patches

    def cached_velocity(self, z: torch.Tensor, t: torch.Tensor, cache: ChunkKVCache) -> torch.Tensor:
        """The next chunk's velocity: z (B, C, chunk_frames, H, W) at t (B,), seeing the prompt and the committed
        chunks; equals ``forward`` on [committed chunks at t = 0 ; z at t], restricted to z's chunk."""
        img, cond, _, _ = self._cached_pass(z, t, cache)
        return self._velocity(img, cond, self.video_grid(z.shape)).to(z.dtype)

    def commit_chunk(self, x0: torch.Tensor, cache: ChunkKVCache) -> None:
        """Append a finished chunk x0 (B, C, chunk_frames, H, W): its keys/values re-encoded at t = 0 (CausVid)."""
        _, _, new_kv, patches = self._cached_pass(x0, x0.new_zeros(x0.shape[0]), cache)
        per_frame = patches.shape[1] // self.cfg.chunk_frames
        cache.append(new_kv, patches[:, -per_frame:], self.cfg.chunk_frames)


def chunk_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """z = (1 − t_k)·x0 + t_k·eps on the frames of chunk k: x0, eps (B, C, T, H, W), t (B, K) -> (B, C, T, H, W)
    (``flow.interpolate`` with one t per frame; diffusers' ``scale_noise`` applied chunk by chunk)."""
    t = t.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None].to(x0.dtype)  # (B, 1, T, 1, 1)
    return (1 - t) * x0 + t * eps


def context_prefix(batch: int, chunks: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, K) bool, True = clean context chunk: a ``p`` share of samples (when K > 1) get a clean prefix of
    1..K−1 chunks. Draws ``batch`` uniforms then ``batch`` prefix lengths, whatever p and K."""
    forced = torch.rand(batch, generator=generator, device=generator.device) < p
    length = torch.randint(1, max(chunks, 2), (batch,), generator=generator, device=generator.device)
    prefix = torch.arange(chunks, device=generator.device)[None] < length[:, None]
    return prefix & (forced[:, None] & (chunks > 1))


def video_flow_loss(
    model: VideoMoEDiT, x0: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor | None], generator: torch.Generator,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample per-chunk rectified-flow loss (B,) fp32: the mean of (v − (eps − x0))² over the noisy chunks.

    Draws from ``generator`` in this order: t (B·K, ``sample_timesteps`` with the config's logit-normal and
    shift), eps (x0's shape), the CFG drop mask (a caller's ``drop`` replaces it, as in ``flow_loss``), the
    clean-context prefix (``context_prefix``). Clean
    chunks get t = 0, are the context of the later ones and give no loss (their target, eps − x0,
    cannot be known from x0).
    """
    cfg = model.cfg
    batch, frames = x0.shape[0], x0.shape[2]
    rows, cols = model.video_grid(x0.shape)[1:]
    chunks = frames // cfg.chunk_frames
    shift = time_shift_for(cfg.chunk_frames * rows * cols, cfg.time_shift)
    t = sample_timesteps(
        batch * chunks, generator, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, shift=shift
    ).view(batch, chunks)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    drawn = cfg_drop_mask(batch, cfg.cfg_dropout, generator)  # drawn even when the caller gives ``drop``
    drop = drawn.to(x0.device) if drop is None else drop
    clean = context_prefix(batch, chunks, cfg.context_clean_prob, generator).to(x0.device)
    t = torch.where(clean, 0.0, t.to(x0.device))
    v = model(chunk_noise(x0, eps, t, cfg.chunk_frames), t, cond, drop)
    err = (v.float() - velocity_target(x0, eps).float()).pow(2)
    per_chunk = err.view(batch, -1, chunks, cfg.chunk_frames, *x0.shape[3:]).transpose(1, 2).flatten(2).mean(-1)
    weight = (~clean).float()
    return (per_chunk * weight).sum(dim=1) / weight.sum(dim=1)


@torch.no_grad()
def generate_video(
    model: VideoMoEDiT,
    shape: tuple[int, ...],
    cond: tuple[torch.Tensor, torch.Tensor | None],
    *,
    generator: torch.Generator,
    steps: int,
    guidance_scale: float = 1.0,
    sampler: Literal["euler", "heun"] = "euler",
    shift: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents (B, C, T, H, W) generated chunk by chunk with the KV cache, from ``noise`` or N(0, I) of
    ``shape`` drawn at once from ``generator`` (so the same seed gives the same clip). Each chunk takes
    ``steps`` steps of ``sampler`` on ``sampling_times(steps, shift)``; ``shift`` None: the config's
    (``time_shift``, or Flux's shift for the tokens of one chunk). ``cond`` as ``MoEDiT``'s."""
    cfg = model.cfg
    _, rows, cols = model.video_grid(shape)
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler = {sampler!r}: use 'euler' or 'heun'")
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    shift = shift if shift is not None else time_shift_for(cfg.chunk_frames * rows * cols, cfg.time_shift)
    caches = {False: model.start_cache(cond)}
    if guidance_scale != 1.0:
        caches[True] = model.start_cache(cond, null=True)

    def velocity(z: torch.Tensor, t: torch.Tensor, _cond: Any, drop: torch.Tensor | None) -> torch.Tensor:
        # the samplers' guidance asks for the null branch with drop = all True, the prompt's with None
        return model.cached_velocity(z, t, caches[drop is not None])

    sample = euler_sample if sampler == "euler" else heun_sample
    chunks = []
    for chunk in noise.split(cfg.chunk_frames, dim=2):
        x = sample(velocity, tuple(chunk.shape), None, generator=generator, steps=steps,
                   guidance_scale=guidance_scale, shift=shift, noise=chunk)  # fmt: skip
        for cache in caches.values():
            model.commit_chunk(x, cache)
        chunks.append(x)
    return torch.cat(chunks, dim=2)
