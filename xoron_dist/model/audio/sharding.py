"""Tensor-parallel plan of the Conformer encoder (``xoron_dist.model.common.sharding`` has the vocabulary).

Attention heads are split. RMLA: ``q_proj`` and ``kv_up`` by heads, ``out_proj`` by rows; the
latent down-projection ``kv_down`` and its norm stay whole (small, and the latent they make is read
by every head), and the shared rope key enters the split region through ``rope_key_entry``, the
latent through ``kv_up`` (full attention) or ``latent_entry`` (the cached path). Rotary MHA: q/k/v by
heads, ``out_proj`` by rows. Both macaron FFNs: ``fc1`` by columns, ``fc2`` by rows.

The convolution module stays whole on every rank: its depthwise conv is followed by a norm over all
channels (LayerNorm; BatchNorm's running statistics alike would need a per-channel split layer the
TP swap does not have), so splitting ``pointwise_in`` by channels would need the channels gathered
again before that norm, a collective per block for about 3·hidden² of the block's ~23·hidden²
weights. Its input is the replicated residual stream, so every rank computes the same output and
the same gradients. The input projection and the block norms stay whole as well.
"""

from __future__ import annotations

from xoron_dist.model.audio.conformer import ConformerConfig
from xoron_dist.model.common.sharding import COLWISE, ENTER, ROWWISE, TensorPlan, TensorSplit, nest


def tensor_plan(cfg: ConformerConfig) -> TensorPlan:
    what = "audio encoder attention heads"
    qk_heads = TensorSplit("colwise", unit=cfg.qk_head_dim, what=what)
    out_rows = TensorSplit("rowwise", unit=cfg.v_head_dim, what=what)
    if cfg.attention == "rmla":
        attention = {"q_proj": qk_heads, "out_proj": out_rows, "rope_key_entry": ENTER, "latent_entry": ENTER,
                     "kv_up": TensorSplit("colwise", unit=cfg.qk_nope_head_dim + cfg.v_head_dim, what=what)}
    else:
        attention = {"q_proj": qk_heads, "k_proj": qk_heads, "out_proj": out_rows,
                     "v_proj": TensorSplit("colwise", unit=cfg.v_head_dim, what=what)}
    ffn = {"fc1": COLWISE, "fc2": ROWWISE}
    return {**nest("layers.*.attn", attention), **nest("layers.*.ffn1", ffn), **nest("layers.*.ffn2", ffn)}
