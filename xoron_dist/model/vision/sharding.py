"""Tensor-parallel plan of the vision tower and the blocks after it (and TiTok's encoder/decoder, which
are the same blocks).

Every block stack of the tower holds the same ``VisionBlock``s: the tower's own (``encoder``), the
dual-stream layers (``dual_stream``), the compressor (``compressor.encoder``) and the reconstruction
decoder (``reconstruction.decoder``, TiTok's sizes). In each, both streams of a block (``patch``,
and ``latent`` with ``dual_stream`` / in the dual-stream layers): q/k/v split by heads (their biases
alike), out_proj by rows; fc1 by columns, fc2 by rows. Norms, the patch embedding, the position
tables, the compressor's queries and the decoder's VQ projections stay whole.
"""

from __future__ import annotations

from xoron_dist.config import VisionConfig
from xoron_dist.model.common.sharding import COLWISE, ROWWISE, TensorPlan, TensorSplit, attention_plan, nest


def _blocks(prefix: str, head_dim: int, what: str) -> dict[str, TensorSplit]:
    """A ``VisionTransformer`` stack's layers under ``prefix`` (both streams of each block)."""
    return {**nest(f"{prefix}.*.*.self_attn", attention_plan(head_dim, what)),
            f"{prefix}.*.*.mlp.fc1": COLWISE, f"{prefix}.*.*.mlp.fc2": ROWWISE}


def tensor_plan(cfg: VisionConfig) -> TensorPlan:
    head_dim = cfg.hidden_size // cfg.num_heads
    plan = _blocks("encoder.layers", head_dim, "model.vision heads")
    if cfg.dual_stream_layers:
        plan.update(_blocks("dual_stream.layers", head_dim, "model.vision heads"))
    if cfg.compressor_tokens:
        plan.update(_blocks("compressor.encoder.layers", head_dim, "model.vision heads"))
    if cfg.reconstruction_weight:
        plan.update(_blocks("reconstruction.decoder.layers", cfg.titok_hidden_size // cfg.titok_heads,
                            "model.vision.titok_heads"))
    return plan
