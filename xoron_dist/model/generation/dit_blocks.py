"""The blocks of the MoE-DiT: MMDiT dual-stream blocks and Flux single-stream blocks, with adaLN-Zero.

Dual-stream block (SD3 MMDiT, arXiv:2403.03206 §4; diffusers ``JointTransformerBlock`` /
``FluxTransformerBlock``). Text and image tokens keep their own adaLN-Zero modulation, q/k/v,
output projection and FFN, and meet in ONE attention over the concatenated sequence::

    txt, img ──► LN, modulate (own shift/scale) ──► own q,k,v (+ per-head QK-RMSNorm)
             ──► concat [txt ; img] ──► RoPE ──► one softmax attention ──► split
             ──► own out-proj, × own gate, + residual ──► LN, modulate ──► own FFN, × gate, + residual

As in HiDream-I1 only the image stream's FFN is the mixture of experts; the text FFN is dense.

Single-stream block (Flux, diffusers ``FluxSingleTransformerBlock``): one set of weights over the
concatenated sequence, attention and FFN in parallel from the same modulated input:
``x + gate · (out_proj(attn(h)) + ffn(h))``, h = modulate(LN(x)). Flux fuses out_proj and the
MLP's down-projection into one ``proj_out`` over [attn ; mlp]; that is the same sum, kept apart
here so tensor parallelism splits each by rows and the FFN can be a mixture of experts.

adaLN-Zero (DiT, Peebles & Xie 2023 §3.2): ``shift, scale, gate = Linear(SiLU(c))`` per
sub-layer, LN without affine (eps 1e-6), ``modulate(x) = LN(x)·(1 + scale) + shift``; the
modulation starts at zero, so every block starts as the identity.

Constructor switches, so the blocks match the oracles exactly: ``ffn`` "swiglu" (ours, no biases)
or "gelu" (SD3/Flux: tanh-GELU, with biases); ``qk_norm`` per-head RMSNorm with a weight (SD3.5,
Flux) or none (SD3); ``moe`` None gives a dense FFN. Attention projections have biases (as every
reference has).

Reuse (video generation): the block forwards take the rope tables (cos, sin) of the whole
concatenated sequence, of any number of axes (``xoron_dist.model.common.rope_nd``), and an optional
boolean attention mask (True = may attend) broadcastable to (batch, heads, seq, seq): a key padding
mask (batch, 1, 1, seq) or a block-causal mask (batch, 1, seq, seq).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import MoEConfig
from xoron_dist.model.common.init import empty_linear
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope_nd import apply_axial_rope
from xoron_dist.model.common.sharding import SplitEntry
from xoron_dist.utils.host_syncs import on_host, where_true

Rope = tuple[torch.Tensor, torch.Tensor]
FFNKind = Literal["swiglu", "gelu"]
ROUTER_FAMILY = "image_gen"  # the expert balancer's family: updated at model.image_gen.moe.bias_update_rate


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x)·(1 + scale) + shift; LN without affine; shift/scale (batch, hidden) broadcast over the sequence."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


class GeluMLP(nn.Module):
    """``down(gelu_tanh(up(x)))`` with biases: SD3/Flux's FeedForward. ``down_bias`` False in the single-stream
    block, where Flux's fused ``proj_out`` bias is the attention output's."""

    def __init__(self, hidden: int, intermediate: int, down_bias: bool = True) -> None:
        super().__init__()
        self.up_proj = empty_linear(hidden, intermediate, bias=True)
        self.down_proj = empty_linear(intermediate, hidden, bias=down_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def dense_ffn(kind: FFNKind, hidden: int, intermediate: int, down_bias: bool = True) -> nn.Module:
    if kind == "gelu":
        return GeluMLP(hidden, intermediate, down_bias)
    return SwiGLU(hidden, intermediate)


def feed_forward(
    kind: FFNKind, hidden: int, intermediate: int, moe: MoEConfig | None, down_bias: bool = True
) -> nn.Module:
    """The MoE (routed + shared SwiGLU experts, router family ``image_gen``) when ``moe`` is given, else dense."""
    if moe is not None:
        return MoEFeedForward(hidden, moe, family=ROUTER_FAMILY)
    return dense_ffn(kind, hidden, intermediate, down_bias)


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head's dims (QK-norm), one weight (head_dim,) for every head.

    Tensor parallelism gives each rank some of the heads, so each rank's gradient of the shared
    weight is partial: the weight enters the split region through ``weight_entry`` (identity here;
    under TP, identity forward and the gradient summed over the TP ranks, as Megatron all-reduces
    its q/k-layernorm gradients).
    """

    def __init__(self, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__(head_dim, eps)
        self.weight_entry = SplitEntry()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight_entry(self.weight) * x.to(dtype)


class AttentionProjections(nn.Module):
    """One stream's q/k/v (split by heads under tensor parallelism), per-head QK-RMSNorm and out-proj.

    ``num_heads · head_dim`` may differ from ``hidden``; the head count a rank holds is read off
    the q projection's output.
    """

    def __init__(self, hidden: int, num_heads: int, head_dim: int, qk_norm: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q_proj = empty_linear(hidden, inner, bias=True)
        self.k_proj = empty_linear(hidden, inner, bias=True)
        self.v_proj = empty_linear(hidden, inner, bias=True)
        self.q_norm = HeadRMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = HeadRMSNorm(head_dim, eps) if qk_norm else None
        self.out_proj = empty_linear(inner, hidden, bias=True)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, n, hidden) -> q, k, v each (batch, heads here, n, head_dim)."""
        batch, n, _ = x.shape
        q, k, v = (proj(x).view(batch, n, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of (batch, heads, n, head_dim) q/k/v, RoPE on q and k -> (batch, n, heads·head_dim)."""
    if rope is not None:
        q, k = apply_axial_rope(q, *rope), apply_axial_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class DualStreamBlock(nn.Module):
    """MMDiT block: (img (batch, n, hidden), txt (batch, l, hidden), cond (batch, hidden)) -> (img, txt).

    Joint sequence order [txt ; img] (Flux's): ``rope`` and ``mask`` cover l + n positions.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden: int,
        *,
        moe: MoEConfig | None = None,
        ffn: FFNKind = "swiglu",
        qk_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.img_mod = empty_linear(hidden, 6 * hidden, bias=True)
        self.txt_mod = empty_linear(hidden, 6 * hidden, bias=True)
        self.img_attn = AttentionProjections(hidden, num_heads, head_dim, qk_norm, eps)
        self.txt_attn = AttentionProjections(hidden, num_heads, head_dim, qk_norm, eps)
        self.img_ffn = feed_forward(ffn, hidden, mlp_hidden, moe)
        self.txt_ffn = dense_ffn(ffn, hidden, mlp_hidden)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        cond: torch.Tensor,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.silu(cond)
        img_mod = self.img_mod(c).chunk(6, dim=-1)  # shift, scale, gate (attention), shift, scale, gate (FFN)
        txt_mod = self.txt_mod(c).chunk(6, dim=-1)
        qi, ki, vi = self.img_attn.qkv(modulate(img, img_mod[0], img_mod[1], self.eps))
        qt, kt, vt = self.txt_attn.qkv(modulate(txt, txt_mod[0], txt_mod[1], self.eps))
        joint = attend(torch.cat((qt, qi), dim=2), torch.cat((kt, ki), dim=2), torch.cat((vt, vi), dim=2), rope, mask)
        txt_out, img_out = joint.split((txt.shape[1], img.shape[1]), dim=1)
        img = img + img_mod[2][:, None] * self.img_attn.out_proj(img_out)
        txt = txt + txt_mod[2][:, None] * self.txt_attn.out_proj(txt_out)
        img = img + img_mod[5][:, None] * self.img_ffn(modulate(img, img_mod[3], img_mod[4], self.eps))
        txt = txt + txt_mod[5][:, None] * self.txt_ffn(modulate(txt, txt_mod[3], txt_mod[4], self.eps))
        return img, txt

    def modulations(self) -> list[nn.Linear]:
        return [self.img_mod, self.txt_mod]


def real_tokens(valid: torch.Tensor | None) -> torch.Tensor | None:
    """The flat indices of ``valid``'s (batch, seq) True tokens, for ``SingleStreamBlock``'s FFN: their count
    is read once for the whole stack of blocks (a boolean-mask index in each block read it three times), on
    ``valid``'s host copy when it keeps one (the generator heads' masks do), so without a sync."""
    return None if valid is None else where_true(valid, on_host(lambda v: int(v.sum()), valid))


class SingleStreamBlock(nn.Module):
    """Flux single-stream block: x (batch, seq, hidden), cond (batch, hidden) -> x, attention and FFN in parallel.

    ``real`` (tokens,): the flat indices into (batch, seq) of the tokens the FFN runs on (text padding
    skipped: it costs no expert compute and counts as no expert load; ``real_tokens`` makes them once for
    the whole stack); None = every token.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden: int,
        *,
        moe: MoEConfig | None = None,
        ffn: FFNKind = "swiglu",
        qk_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.mod = empty_linear(hidden, 3 * hidden, bias=True)
        self.attn = AttentionProjections(hidden, num_heads, head_dim, qk_norm, eps)
        self.ffn = feed_forward(ffn, hidden, mlp_hidden, moe, down_bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift, scale, gate = self.mod(F.silu(cond)).chunk(3, dim=-1)
        h = modulate(x, shift, scale, self.eps)
        update = self.attn.out_proj(attend(*self.attn.qkv(h), rope, mask))
        return x + gate[:, None] * self.add_ffn(update, h, real)

    def add_ffn(self, update: torch.Tensor, h: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """``update`` plus the FFN of ``h`` on the tokens ``real`` (flat indices; None: every token)."""
        if real is None:
            return update + self.ffn(h)
        flat = update.flatten(0, 1)
        rows = flat.index_select(0, real) + self.ffn(h.flatten(0, 1).index_select(0, real))
        return flat.index_copy(0, real, rows).view_as(update)

    def modulations(self) -> list[nn.Linear]:
        return [self.mod]
