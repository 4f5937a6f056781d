"""Step time of a layout: compute at a fraction of peak, plus the communication each dimension adds.

Compute (Kaplan et al. 2020 / Megatron-LM's accounting): 6 FLOPs per active parameter per token
(forward 2, backward 4) plus causal attention, 6·L·s·heads·(qk + v)/2 per token for the score and
value matmuls; activation checkpointing re-runs the layers' forward (+1/3 of their FLOPs). A
rank does 1/(tp·sp·pp) of its replica's FLOPs at ``peak_tflops · mfu``.

Communication, in bytes per rank, at the bandwidth of the links the group spans (in-node when the
whole group fits in one node, else the network); ranks are ordered tp, sp, ep, dp, pp from the
fastest-varying (Megatron-core's order), so a group's stride is the product of the sizes before it:

    dp    ring all-reduce of the gradients, 2(n-1)/n · grad bytes (ZeRO-2's reduce-scatter +
          all-gather moves the same); ZeRO-3 gathers the weights again in backward: 3(n-1)/n.
          Dense weights over dp·sp ranks, routed experts over dp·sp/ep.
    tp    2 all-reduces of (tokens, hidden) per layer forward (attention and FFN outputs) and 2 in
          backward, 2(n-1)/n each; +2 per layer with checkpointing (the recomputed forward).
    sp    the MLA latent + rope key of every other chunk passes each rank once forward and twice
          backward (ring attention with ``ring_latent``).
    ep    dispatch and combine all-to-alls of (tokens·top_k, hidden), forward and backward,
          (n-1)/n of the rows leave the rank.
    pp    the 1F1B bubble: the pipeline is busy m/(m + pp - 1) of the step (m micro-batches),
          and each stage boundary sends (tokens, hidden) forward and its gradient back.

The multimodal parts (``xoron_dist.plan.parts``: encoders, projectors, fusion layers, generators)
enter through their gradients only: the dp reduction moves their per-rank parameters (generator
routed experts over the expert-data-parallel group, as the LLM's). Left out: their compute and their
TP all-reduces / EP all-to-alls, which scale with the images, videos and clips of each micro-batch,
a property of the data mix that the config does not give (and of each item's resolution, frames or
seconds; the autoencoders and vocoder run convolutions at pixel/waveform resolution, where
6·params·tokens does not hold). The LLM's compute covers the media placeholder tokens, which are
part of its rows. The step time of a multimodal run is therefore a lower bound.

Nothing is assumed to overlap with compute (a conservative model; DeepSpeed does overlap part of
the gradient reduction). The figures rank layouts against each other; measure before trusting
absolute times.
"""

from __future__ import annotations

from dataclasses import dataclass

from xoron_dist.config import LLMConfig, XoronConfig
from xoron_dist.parallel.layout import Layout
from xoron_dist.plan.cluster import ClusterSpec
from xoron_dist.plan.memory import (
    TrainingShape,
    embedding_parameters,
    head_parameters,
    layer_parameters,
    rank_parts,
    stage_parameters,
)


@dataclass(frozen=True)
class StepCost:
    """Seconds per optimizer step on the slowest rank, by part, and the throughput they give."""

    compute: float
    dp: float
    tp: float
    sp: float
    ep: float
    pp: float  # boundary sends + the bubble's idle time
    tokens_per_step: int

    @property
    def step_time(self) -> float:
        return self.compute + self.dp + self.tp + self.sp + self.ep + self.pp

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time

    @property
    def communication(self) -> float:
        return self.dp + self.tp + self.sp + self.ep


def active_matmul_parameters(llm: LLMConfig) -> tuple[int, int]:
    """(active, routed) parameters one token multiplies with: every layer weight except the routed
    experts it was not sent to, plus the LM head (the embedding is a lookup, not a matmul)."""
    dense = routed = 0
    for i in range(llm.num_layers):
        count = layer_parameters(llm, i, tp=1, ep=1, tp_experts=True)
        dense, routed = dense + count.dense, routed + count.expert
    active = dense + routed * llm.moe.top_k // llm.moe.num_experts + _lm_head_parameters(llm)
    return active, routed


def _lm_head_parameters(llm: LLMConfig) -> int:
    """The LM head's matrix (the embedding's, when tied)."""
    return embedding_parameters(llm, 1) if llm.tie_word_embeddings else head_parameters(llm, 1) - llm.hidden_size


def matmul_flops(llm: LLMConfig, tokens: int) -> float:
    """Forward + backward FLOPs of the weight matmuls over ``tokens`` tokens: 6 per active parameter."""
    return 6.0 * active_matmul_parameters(llm)[0] * tokens


def attention_flops(llm: LLMConfig, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of causal attention's score and value matmuls: per token and layer
    2·s·heads·(qk + v) forward for a full row, half of it under the causal mask, x3 with backward."""
    return tokens * 6.0 * llm.num_layers * seq_len * llm.num_heads * (llm.qk_head_dim + llm.v_head_dim) / 2


def step_flops(llm: LLMConfig, tokens: int, seq_len: int, activation_checkpointing: bool) -> float:
    """FLOPs of forward + backward over ``tokens`` tokens in rows of ``seq_len`` (one replica);
    checkpointing re-runs the decoder layers' forward (not the LM head's)."""
    head = 6.0 * _lm_head_parameters(llm) * tokens
    layers = matmul_flops(llm, tokens) - head + attention_flops(llm, tokens, seq_len)
    return head + layers * (4 / 3 if activation_checkpointing else 1)


def _ring(n: int) -> float:
    return 2 * (n - 1) / n if n > 1 else 0.0


def estimate_step(cfg: XoronConfig, layout: Layout, shape: TrainingShape, cluster: ClusterSpec,
                  mixed: bool) -> StepCost:
    """Seconds of one optimizer step of ``layout`` on ``cluster`` (see the module docstring)."""
    llm = cfg.llm
    b = 2 if mixed else 4
    tp, pp, sp, ep, dp = layout.tp, layout.pp, layout.sp, layout.ep, layout.dp
    m = shape.grad_accum_steps
    replica_tokens = shape.micro_batch_size * shape.seq_len * m
    flops = step_flops(llm, replica_tokens, shape.seq_len, shape.activation_checkpointing)
    compute = flops / (tp * sp * pp) / (cluster.peak_tflops * 1e12 * cluster.mfu)

    stage = max(stage_parameters(cfg, tp, pp, ep), key=lambda st: st.params.total)
    # the multimodal parts sit on the first stage (encoders) and the last (generators); counted on the busiest
    # stage here, an upper bound of its step time
    params = sum((part.params for part in rank_parts(cfg, layout)), stage.params)
    layers = len(stage.layers)
    moe_layers = sum(1 for i in stage.layers if llm.is_moe_layer(i))
    tokens = shape.micro_batch_size * shape.seq_len // sp  # per rank per micro-batch

    def bw(size: int, stride: int) -> float:
        return cluster.bandwidth(size, stride)

    dense_group, expert_group = dp * sp, max(1, dp * sp // ep)
    grad_factor = 1.5 if layout.zero_stage == 3 else 1.0
    dp_time = grad_factor * (_ring(dense_group) * params.dense * b / bw(dense_group, tp)
                             + _ring(expert_group) * params.expert * b / bw(expert_group, tp * sp * ep))
    tp_calls = 4 + (2 if shape.activation_checkpointing else 0)
    tp_time = m * layers * tp_calls * _ring(tp) * tokens * llm.hidden_size * b / bw(tp, 1)
    sp_time = m * layers * 3 * (sp - 1) * tokens * (llm.kv_lora_rank + llm.qk_rope_head_dim) * b / bw(sp, tp)
    ep_time = m * moe_layers * 4 * (ep - 1) / ep * tokens * llm.moe.top_k * llm.hidden_size * b / bw(ep, tp * sp) \
        if ep > 1 else 0.0
    busy = compute + tp_time + sp_time + ep_time
    pp_time = 0.0
    if pp > 1:
        sends = m * 2 * tokens * llm.hidden_size * b / bw(pp, tp * sp * dp)
        pp_time = sends + busy * (pp - 1) / m  # idle share (pp-1)/(m+pp-1) of the whole step
    global_tokens = replica_tokens * dp
    return StepCost(compute, dp_time, tp_time, sp_time, ep_time, pp_time, global_tokens)


__all__ = ["StepCost", "active_matmul_parameters", "attention_flops", "estimate_step", "matmul_flops", "step_flops"]
