"""Conformer encoder (Gulati et al. 2020, arXiv:2005.08100) with RMLA for Xoron's audio understanding.

Input: the waveform tokenizer's latent frames (batch, frames, input_dim) and a frame mask;
output: (batch, frames, hidden) features and the same mask. One block (§2, fig. 1)::

    x = x + ½·FFN(LN(x))                 macaron half-step FFN (Lu et al. 2019), Swish
    x = x + Attention(LN(x))             RMLA (default) or rotary MHA, non-causal, key padding mask
    x = x + Conv(x)                      LN -> pointwise 2C -> GLU -> depthwise k -> norm -> Swish -> pointwise
    x = x + ½·FFN(LN(x))
    y = LN(x)

The block norms are LayerNorms, as in the paper and in wav2vec2-conformer (so HF's layer is an
exact oracle); the depthwise conv's norm is ``conv_norm``: ``"layer"`` (default: a LayerNorm over
channels per frame; no statistics across frames, clips or data-parallel ranks, so padding and the
batch layout cannot change a clip's output) or ``"batch"`` (the paper's BatchNorm, statistics over
the real frames only; what HF's layer uses).

**RMLA, the formulation chosen** (``RotaryLatentAttention``): DeepSeek-V2's Multi-head Latent
Attention (arXiv:2405.04434, §2.1.2-2.1.3) used non-causally. Per frame t and head i::

    c_t      = RMSNorm(W_DKV x_t)                         latent, kv_rank numbers
    k^R_t    = RoPE(W_KR x_t, t)                          decoupled rope key, rope_dim, shared by all heads
    q_{t,i}  = [W_Q,i^nope x_t ; RoPE(W_Q,i^rope x_t, t)]
    k_{t,i}  = [W_UK,i c_t ; k^R_t],    v_{t,i} = W_UV,i c_t
    o_{t,i}  = softmax_s(q_{t,i}·k_{s,i} / sqrt(nope + rope) over real frames s) v_{s,i}

Positions enter only through RoPE on q's rope part and the shared rope key (Su et al. 2021,
arXiv:2104.09864), so scores depend on frame offsets alone: the "relative positions" the paper
asks of Conformer attention, with no relative-position table to grow with clip length. Per frame
and layer the cache holds kv_rank + rope_dim numbers instead of MHA's 2·heads·head_dim, and
because RoPE never touches W_UK c_t, W_UK folds into the query and W_UV into the output (eq.
10-11): ``attend_cached`` attends against the latents without ever expanding per-head keys and
values. The seed's RMLA instead rotates the up-projected keys (``kv_b_proj`` -> RoPE): the
rotation then sits between W_UK and c_t and depends on the key's position, W_UK cannot be
absorbed, and a cache must hold (or recompute) every head's full keys: no compression.

``attention="mha_rope"`` (``RotarySelfAttention``) is plain rotary MHA with the same interface: the
RMLA identity test folds RMLA's latent projections into it, and with ``rope_on="input"`` (RoPE on the
block input before the q/k projections, as fairseq's and HF's wav2vec2-conformer do; scores are
then *not* functions of offsets only) the whole block equals HF's ``Wav2Vec2ConformerEncoderLayer``.

Padding: padded frames are never keys, are zeroed before the depthwise conv (its window would
otherwise reach them) and take no part in BatchNorm statistics; the encoder zeroes them in its
output. Tensor parallelism (``sharding.py``) splits heads and FFNs; attention modules read their
local head count off their weights, and ``rope_key_entry``/``latent_entry`` are where tensors every
rank holds whole enter the head-split computation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from xoron_dist.config import ConformerConfig
from xoron_dist.model.common.init import empty_linear, init_weights_
from xoron_dist.model.common.norm import BatchNorm1d, RMSNorm
from xoron_dist.model.common.rope_nd import AxialRoPE
from xoron_dist.model.common.sharding import SplitEntry

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin (batch, frames, rope_dim / 2)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (RoFormer eq. 34) on ``x`` (..., rope_dim) in the half layout of GPT-NeoX and wav2vec2-
    conformer: dim j pairs with j + rope_dim/2. ``cos``/``sin`` broadcastable to (..., rope_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _heads(rope: Rope) -> Rope:
    """(batch, frames, pairs) tables -> (batch, frames, 1, pairs), to rotate (batch, frames, heads, dim)."""
    return rope[0][:, :, None], rope[1][:, :, None]


class LatentCache(NamedTuple):
    """RMLA's per-frame cache: ``latent`` (batch, frames, kv_rank), the normed c_kv; ``rope_key``
    (batch, frames, rope_dim), rotated, shared by every head; ``key_mask`` (batch, frames), True = a
    real frame. Built whole or chunk by chunk as frames arrive (``extend``)."""

    latent: torch.Tensor
    rope_key: torch.Tensor
    key_mask: torch.Tensor

    def extend(self, more: LatentCache) -> LatentCache:
        """This cache followed by ``more``'s frames (the frames' positions were set when compressed)."""
        return LatentCache(*(torch.cat((mine, theirs), dim=1) for mine, theirs in zip(self, more, strict=True)))


class RotaryLatentAttention(nn.Module):
    """RMLA (see the module docstring). Weights: ``q_proj`` (W_Q, per head [nope | rope]), ``kv_down``
    (W_DKV and W_KR fused: kv_rank + rope rows), ``kv_norm``, ``kv_up`` (W_UK and W_UV fused, per head
    [nope | v] rows), ``out_proj`` (W_O)."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.q_proj = empty_linear(cfg.hidden_size, cfg.num_heads * cfg.qk_head_dim, bias=cfg.bias)
        self.kv_down = empty_linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_up = empty_linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.out_proj = empty_linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.bias)
        self.rope_key_entry = SplitEntry()
        self.latent_entry = SplitEntry()  # the cached path's way in (the expanded path enters through kv_up)
        self.softmax_scale = cfg.qk_head_dim**-0.5

    def _queries(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, s, hidden) -> q_nope (b, s, h, nope), q_rope (b, s, h, rope) rotated."""
        q = self.q_proj(x).view(*x.shape[:2], -1, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, rotate_halves(q_rope, *_heads(rope))

    def compress(self, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor) -> LatentCache:
        """x (b, t, hidden), rope for those frames, key_mask (b, t) -> the frames' ``LatentCache``."""
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope = self.rope_key_entry(rotate_halves(k_rope, *rope))
        return LatentCache(self.kv_norm(latent), k_rope, key_mask)

    def forward(self, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor) -> torch.Tensor:
        """Full attention over the clip: x (b, t, hidden), key_mask (b, t) True = real -> (b, t, hidden).
        Keys and values are expanded per head and attended with fused SDPA (training, short clips)."""
        batch, frames, _ = x.shape
        q_nope, q_rope = self._queries(x, rope)
        cache = self.compress(x, rope, key_mask)
        kv = self.kv_up(cache.latent).view(batch, frames, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, cache.rope_key[:, :, None].expand(-1, -1, k_nope.shape[2], -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask[:, None, None, :], scale=self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _latent_scores(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                       rope_key: torch.Tensor) -> torch.Tensor:
        """Scaled scores (b, h, s, t) with W_UK absorbed into the query (DeepSeek-V2 eq. 10)."""
        w_uk = self.kv_up.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)[:, : self.nope_dim]
        q_latent = torch.einsum("bshd,hdr->bhsr", q_nope, w_uk)
        scores = torch.einsum("bhsr,btr->bhst", q_latent, latent) + torch.einsum("bshd,btd->bhst", q_rope, rope_key)
        return scores * self.softmax_scale

    def attend_cached(self, x: torch.Tensor, rope: Rope, cache: LatentCache) -> torch.Tensor:
        """Queries x (b, s, hidden) (rope for their frames) over every frame of ``cache`` (b, t, ·), with
        W_UK absorbed into the query and W_UV into the output (eq. 10-11): per-head keys and values
        are never formed, so memory grows with t·(kv_rank + rope) rather than t·heads·(qk + v).
        Equals ``forward`` when the cache holds the clip's frames. Returns (b, s, hidden)."""
        q_nope, q_rope = self._queries(x, rope)
        latent = self.latent_entry(cache.latent)
        scores = self._latent_scores(q_nope, q_rope, latent, cache.rope_key)
        probs = scores.float().masked_fill(~cache.key_mask[:, None, None, :], float("-inf")).softmax(-1)
        out_latent = torch.einsum("bhst,btr->bhsr", probs.to(latent.dtype), latent)
        w_uv = self.kv_up.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)[:, self.nope_dim :]
        return self.out_proj(torch.einsum("bhsr,hvr->bshv", out_latent, w_uv).flatten(2))

    def attention_scores(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Pre-softmax scaled scores (b, heads, frames, frames) of x (b, frames, hidden), unmasked."""
        q_nope, q_rope = self._queries(x, rope)
        cache = self.compress(x, rope, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        return self._latent_scores(q_nope, q_rope, cache.latent, cache.rope_key)


class RotarySelfAttention(nn.Module):
    """Rotary multi-head self-attention (``attention="mha_rope"``). Per head, q/k are [nope | rope]
    (partial rotary when qk_nope_head_dim > 0) and v is v_head_dim wide. ``rope_on="qk"`` rotates the
    rope part of the projected q/k (RoFormer); ``"input"`` rotates the input x in blocks of rope_dim
    before the q/k projections (fairseq/HF wav2vec2-conformer; v reads the unrotated x)."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rope_on = cfg.rope_on
        self.q_proj = empty_linear(cfg.hidden_size, cfg.num_heads * cfg.qk_head_dim, bias=cfg.bias)
        self.k_proj = empty_linear(cfg.hidden_size, cfg.num_heads * cfg.qk_head_dim, bias=cfg.bias)
        self.v_proj = empty_linear(cfg.hidden_size, cfg.num_heads * cfg.v_head_dim, bias=cfg.bias)
        self.out_proj = empty_linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.bias)
        self.softmax_scale = cfg.qk_head_dim**-0.5

    def _project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, t, hidden) -> q, k (b, t, h, nope + rope) rotated, v (b, t, h, v)."""
        shape = (*x.shape[:2], -1)
        qk_in = x
        if self.rope_on == "input":
            blocks = x.view(*x.shape[:2], -1, self.rope_dim)
            qk_in = rotate_halves(blocks, *_heads(rope)).view(x.shape)
        q = self.q_proj(qk_in).view(*shape, self.nope_dim + self.rope_dim)
        k = self.k_proj(qk_in).view(*shape, self.nope_dim + self.rope_dim)
        if self.rope_on == "qk":
            cos, sin = _heads(rope)
            q, k = (torch.cat((t[..., : self.nope_dim], rotate_halves(t[..., self.nope_dim :], cos, sin)), dim=-1)
                    for t in (q, k))
        return q, k, self.v_proj(x).view(*shape, self.v_dim)

    def forward(self, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, hidden), key_mask (b, t) True = real frame -> (b, t, hidden)."""
        q, k, v = (t.transpose(1, 2) for t in self._project(x, rope))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def attention_scores(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Pre-softmax scaled scores (b, heads, frames, frames) of x (b, frames, hidden), unmasked."""
        q, k, _ = self._project(x, rope)
        return torch.einsum("bshd,bthd->bhst", q, k) * self.softmax_scale


class FeedForward(nn.Module):
    """Conformer FFN (§2.3): ``fc2(dropout(swish(fc1(x))))``, hidden -> ffn_dim -> hidden."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.fc1 = empty_linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = empty_linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.silu(self.fc1(x))))


class MaskedBatchNorm(BatchNorm1d):
    """BatchNorm over the channels of real frames only: (b, t, C) with mask (b, t) -> (b, t, C), padded
    frames zero. Training statistics come from the real frames of this batch on this rank (no
    SyncBatchNorm: data-parallel ranks keep their own running statistics, one reason the default
    ``conv_norm`` is "layer")."""

    def init_weights(self, std: float) -> None:  # called by init_weights_: weight 1, bias 0, fresh statistics
        self.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[mask] = super().forward(x[mask])
        return out


class ConvolutionModule(nn.Module):
    """Conformer convolution module (§2.2, fig. 2) on (b, t, C) with the frame mask (b, t).

    The pointwise convs are Linears over channels (a 1x1 Conv1d is the same map), so tensor
    parallelism and HF weights see ordinary (out, in) matrices; the GLU keeps the first half of
    ``pointwise_in``'s 2C outputs gated by the sigmoid of the second."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        channels = cfg.hidden_size
        self.norm = nn.LayerNorm(channels, eps=cfg.norm_eps)
        self.pointwise_in = empty_linear(channels, 2 * channels)
        self.depthwise = skip_init(nn.Conv1d, channels, channels, cfg.conv_kernel, padding=cfg.conv_kernel // 2,
                                   groups=channels, bias=False, device=torch.get_default_device())
        self.depthwise_norm = (nn.LayerNorm(channels, eps=cfg.norm_eps) if cfg.conv_norm == "layer"
                               else MaskedBatchNorm(channels, eps=cfg.norm_eps))
        self.pointwise_out = empty_linear(channels, channels)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        # Zero the padded frames: the depthwise window of a clip's last real frames reaches them.
        h = h.masked_fill(~mask[..., None], 0.0)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        h = self.depthwise_norm(h, mask) if isinstance(self.depthwise_norm, MaskedBatchNorm) else self.depthwise_norm(h)
        return self.dropout(self.pointwise_out(F.silu(h)))


class ConformerBlock(nn.Module):
    """One macaron Conformer block (see the module docstring): (b, t, hidden) -> (b, t, hidden)."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

        self.ffn1_norm, self.ffn1 = norm(), FeedForward(cfg)
        self.attn_norm = norm()
        self.attn = RotaryLatentAttention(cfg) if cfg.attention == "rmla" else RotarySelfAttention(cfg)
        self.conv = ConvolutionModule(cfg)
        self.ffn2_norm, self.ffn2 = norm(), FeedForward(cfg)
        self.final_norm = norm()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor, key_mask: torch.Tensor | None = None,
                query_chunk: int | None = None) -> torch.Tensor:
        """x (b, t, hidden); rope tables for the frames; mask (b, t) True = real frame; ``key_mask`` the
        frames attention may read (default ``mask``); ``query_chunk``: attend through the RMLA latent
        cache, that many query frames at a time (same output as full attention)."""
        key_mask = mask if key_mask is None else key_mask
        x = x + 0.5 * self.dropout(self.ffn1(self.ffn1_norm(x)))
        x = x + self.dropout(self._attend(self.attn_norm(x), rope, key_mask, query_chunk))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.dropout(self.ffn2(self.ffn2_norm(x)))
        return self.final_norm(x)

    def _attend(self, h: torch.Tensor, rope: Rope, key_mask: torch.Tensor, query_chunk: int | None) -> torch.Tensor:
        if query_chunk is None:
            return self.attn(h, rope, key_mask)
        if not isinstance(self.attn, RotaryLatentAttention):
            raise ValueError("query_chunk attends through RMLA's latent cache; rotary MHA has none "
                             "(use attention='rmla', or query_chunk=None)")
        cache = self.attn.compress(h, rope, key_mask)
        cos, sin = rope
        chunks = [self.attn.attend_cached(h[:, s : s + query_chunk], (cos[:, s : s + query_chunk],
                                          sin[:, s : s + query_chunk]), cache)
                  for s in range(0, h.shape[1], query_chunk)]
        return torch.cat(chunks, dim=1)


class ConformerOutput(NamedTuple):
    """``hidden`` (batch, frames, hidden_size), padded frames zero; ``mask`` (batch, frames) True = a
    real frame. A named tuple: DeepSpeed's ZeRO-3 finds a module's output tensors only in tuples."""

    hidden: torch.Tensor
    mask: torch.Tensor


class ConformerEncoder(nn.Module):
    """Tokenizer frames (batch, frames, input_dim) -> ``ConformerOutput``: an input Linear to the model
    width, then ``num_layers`` Conformer blocks sharing one rope table (each block ends in its LayerNorm)."""

    def __init__(self, cfg: ConformerConfig, input_dim: int) -> None:
        super().__init__()
        cfg.validate("conformer")
        self.cfg, self.input_dim = cfg, input_dim
        self.input_proj = empty_linear(input_dim, cfg.hidden_size, bias=True)
        self.rope = AxialRoPE(cfg.qk_rope_head_dim, axes=1, theta=cfg.rope_theta)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights_(self, self.cfg.init_std)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None,
                query_chunk: int | None = None) -> ConformerOutput:
        """``frames`` (batch, frames, input_dim); ``mask`` (batch, frames) bool, True = a real frame,
        each clip's frames first (None: all real). Frame positions are 0, 1, ... in every clip.
        ``query_chunk``: RMLA only, attend through the latent cache that many query frames at a
        time (bounded memory on long clips; the same output)."""
        batch, length, width = frames.shape
        if width != self.input_dim:
            raise ValueError(f"frames have width {width}; this encoder's input_dim is {self.input_dim}")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=frames.device)
        if mask.shape != (batch, length) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (batch, frames) = {(batch, length)}; got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk = {query_chunk}: must be a positive number of frames, or None")
        # A clip with no frames would attend to nothing (NaN): let it read its padding; its output is zeroed.
        key_mask = mask | ~mask.any(dim=1, keepdim=True)
        positions = torch.arange(length, device=frames.device).expand(batch, -1)
        rope = self.rope(positions[..., None])
        x = self.input_proj(frames).masked_fill(~mask[..., None], 0.0)
        for layer in self.layers:
            x = layer(x, rope, mask, key_mask, query_chunk)
        return ConformerOutput(x.masked_fill(~mask[..., None], 0.0), mask)
