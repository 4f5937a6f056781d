"""Tensor-parallel plan of the vision tower (and TiTok's encoder/decoder, which are the same blocks).

Both streams of a block (``patch``, and ``latent`` with ``dual_stream``): q/k/v split by heads
(their biases alike), out_proj by rows; fc1 by columns, fc2 by rows. Norms, the patch embedding
and the position tables stay whole.
"""

from __future__ import annotations

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.sharding import COLWISE, ROWWISE, TensorPlan, attention_plan, nest


def tensor_plan(cfg: VisionConfig) -> TensorPlan:
    attention = attention_plan(cfg.hidden_size // cfg.num_heads, "model.vision heads")
    return {**nest("encoder.layers.*.*.self_attn", attention),
            "encoder.layers.*.*.mlp.fc1": COLWISE, "encoder.layers.*.*.mlp.fc2": ROWWISE}
