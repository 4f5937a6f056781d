"""Analytic FLOP count of one training step, per component of the model (for MFU and the benchmarks).

What is counted: matrix multiplications only (2 FLOPs per multiply-add), the same rule as
``torch.utils.flop_counter``; norms, activations, RoPE, softmax and the loss are elementwise and
left out (the MFU convention; at the full size and seq 4096 the softmax, the largest of them at ~5
FLOPs per score, is under 0.5% of the matmul FLOPs). Per decoder layer of the LLM
(``XoronLLM``), with T = batch·seq tokens and h heads:

    attn.q_proj          2·T·hidden·h·qk            (no q_lora_rank)
    attn.q_down / q_up   2·T·hidden·q_rank, 2·T·q_rank·h·qk    (MLA's low-rank query)
    attn.kv_down         2·T·hidden·(kv_rank + rope)          (latent + shared rope key)
    attn.kv_up           2·T·kv_rank·h·(nope + v)             (latent -> per-head k_nope and v)
    attn.core            2·b·h·s²·qk + 2·b·h·s²·v, halved when causal (below)
    attn.out_proj        2·T·h·v·hidden
    ffn (dense)          gate, up, down: 3 · 2·T·hidden·dense_intermediate
    ffn.router           2·T·hidden·experts
    ffn.experts          top_k · 3 · 2·T·hidden·expert_intermediate   (only the chosen experts run)
    ffn.shared           3 · 2·T·hidden·(expert_intermediate·shared)
    lm_head              2·T·hidden·vocab_rows                (padded rows included: they are computed)

The token embedding is a lookup (0 FLOPs). Causal attention: a query attends to the keys at or
before it, so the useful score/value products are s(s+1)/2 of the s² pairs; we count s²/2 (the
usual convention, e.g. FlashAttention's benchmarks) with ``causal=True``, and
the full s² with ``causal=False``: that is what ``FlopCounterMode``'s SDPA formulas count, since
they ignore ``is_causal`` (compare like with like). Packed documents attend within each document
only; the count stays that of the whole row (an upper bound of the work done).

One training step = forward + backward = 3 x forward (``TRAIN_FACTOR``): the backward of every
matmul computes the input's gradient and the weight's gradient, each as many FLOPs as the forward.
These are *model* FLOPs (the MFU convention of PaLM, Chowdhery et al. 2022, app. B): activation
checkpointing's recomputation, the chunked loss's recomputed head, and the fused attention kernels'
recomputation of the scores in backward are hardware work the model does not need, so not counted.
A frozen part (a stage that trains only the projector) needs no weight gradients: the count is that
of full training.

Multimodal parts: the LLM is counted exactly. The vision tower (SigLIP ViT: patch embedding +
pre-norm blocks of full attention over an image's patches) is counted per image by
``vision_forward_flops`` for its plain path (no latent tokens, one stream); the video, audio and
generator parts are not counted (their work depends on the media in each batch), so a multimodal
run's reported TFLOP/s is that of its backbone: a lower bound.

``flop_counter_formulas()`` gives ``FlopCounterMode`` formulas for the ops it has none for and this
model runs: ``_grouped_mm`` (the experts) and the CPU flash attention kernel (forward and backward),
so the measured count covers the whole model on CPU as on CUDA.
"""

from __future__ import annotations

import math

import torch

from xoron_dist.config import LLMConfig, VisionConfig

TRAIN_FACTOR = 3  # forward + backward (input gradients + weight gradients) of every matmul


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    """One (tokens, fan_in) x (fan_in, fan_out) matmul."""
    return 2 * tokens * fan_in * fan_out


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, qk_dim: int, v_dim: int, causal: bool) -> int:
    """Scores (q·kᵀ) and weighted values (p·v) of one attention call; ``causal`` halves them (s²/2)."""
    full = 2 * batch * heads * q_len * k_len * (qk_dim + v_dim)
    return full // 2 if causal else full


def swiglu_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """gate, up (hidden -> intermediate) and down (intermediate -> hidden)."""
    return 3 * linear_flops(tokens, hidden, intermediate)


def llm_forward_flops(cfg: LLMConfig, batch: int, seq: int, *, causal: bool = True) -> dict[str, int]:
    """Forward FLOPs of ``XoronLLM`` on (batch, seq) tokens, by component.

    Keys are the modules' names in the model (``layers.<i>.attn.kv_up``, ``layers.<i>.ffn.experts``,
    ``lm_head``); ``attn.core`` is the attention itself (scores and values). ``causal``: see the module
    docstring.
    """
    if batch <= 0 or seq <= 0:
        raise ValueError(f"llm_forward_flops needs batch > 0 and seq > 0, got batch={batch}, seq={seq}")
    tokens, hidden, heads = batch * seq, cfg.hidden_size, cfg.num_heads
    out: dict[str, int] = {}
    for i in range(cfg.num_layers):
        attn, ffn = f"layers.{i}.attn", f"layers.{i}.ffn"
        if cfg.q_lora_rank is None:
            out[f"{attn}.q_proj"] = linear_flops(tokens, hidden, heads * cfg.qk_head_dim)
        else:
            out[f"{attn}.q_down"] = linear_flops(tokens, hidden, cfg.q_lora_rank)
            out[f"{attn}.q_up"] = linear_flops(tokens, cfg.q_lora_rank, heads * cfg.qk_head_dim)
        out[f"{attn}.kv_down"] = linear_flops(tokens, hidden, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        out[f"{attn}.kv_up"] = linear_flops(tokens, cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        out[f"{attn}.core"] = attention_flops(batch, heads, seq, seq, cfg.qk_head_dim, cfg.v_head_dim, causal)
        out[f"{attn}.out_proj"] = linear_flops(tokens, heads * cfg.v_head_dim, hidden)
        if cfg.is_moe_layer(i):
            moe = cfg.moe
            out[f"{ffn}.router"] = linear_flops(tokens, hidden, moe.num_experts)
            out[f"{ffn}.experts"] = swiglu_flops(tokens * moe.top_k, hidden, moe.expert_intermediate_size)
            if moe.num_shared_experts:
                out[f"{ffn}.shared"] = swiglu_flops(tokens, hidden,
                                                    moe.expert_intermediate_size * moe.num_shared_experts)
        else:
            out[f"{ffn}"] = swiglu_flops(tokens, hidden, cfg.dense_intermediate_size)
    out["lm_head"] = linear_flops(tokens, hidden, cfg.vocab_rows(1))
    return out


def vision_forward_flops(cfg: VisionConfig, images: int, patches: int) -> dict[str, int]:
    """Forward FLOPs of the vision tower's plain path on ``images`` images of ``patches`` patches each.

    Patch embedding (3·patch² -> hidden), then per block: q, k, v, out projections, full (not causal)
    attention over the image's patches, and the GELU MLP (fc1, fc2). Keys: ``patch_embed``,
    ``encoder.layers.<i>.patch.self_attn`` (projections), ``encoder.layers.<i>.core`` (the attention itself),
    ``encoder.layers.<i>.patch.mlp``: the tower's module names.
    """
    if images <= 0 or patches <= 0:
        raise ValueError(f"vision_forward_flops needs images > 0 and patches > 0, got {images}, {patches}")
    tokens, hidden = images * patches, cfg.hidden_size
    out = {"patch_embed": linear_flops(tokens, 3 * cfg.patch_size**2, hidden)}
    head_dim = hidden // cfg.num_heads
    for i in range(cfg.num_layers):
        layer = f"encoder.layers.{i}"
        out[f"{layer}.patch.self_attn"] = 4 * linear_flops(tokens, hidden, hidden)
        out[f"{layer}.core"] = attention_flops(images, cfg.num_heads, patches, patches, head_dim, head_dim, False)
        out[f"{layer}.patch.mlp"] = 2 * linear_flops(tokens, hidden, cfg.intermediate_size)
    return out


def vision_step_flops(cfg: VisionConfig, images: int, patches: int) -> int:
    """Model FLOPs of training the vision tower on ``images`` images: 3 x forward, less one patch-embedding
    forward (the pixels need no gradient, so its backward is the weight gradient alone)."""
    forward = vision_forward_flops(cfg, images, patches)
    return TRAIN_FACTOR * total(forward) - forward["patch_embed"]


def total(flops: dict[str, int], prefix: str = "") -> int:
    """Sum of the components whose name is ``prefix`` or starts with ``prefix.`` (all with ``""``)."""
    return sum(v for k, v in flops.items() if not prefix or k == prefix or k.startswith(prefix + "."))


def llm_step_flops(cfg: LLMConfig, batch: int, seq: int) -> int:
    """Model FLOPs of one training step of the LLM over ``batch`` sequences of ``seq`` tokens (all ranks,
    all micro-batches): 3 x the causal forward."""
    return TRAIN_FACTOR * total(llm_forward_flops(cfg, batch, seq, causal=True))


# --- FlopCounterMode formulas for the ops torch's counter does not know -------------------------------


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``_grouped_mm(a, b, offs)``: every group multiplies its slice of the grouped axis, so the groups
    together do 2·a.numel()·N (a (M, K) by b (G, K, N); a (K, M) by b (M, N) grouped along M, the
    weight gradient; a (G, M, K) by b (G, K, N), batched)."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def _cpu_flash_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_flash_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def flop_counter_formulas() -> dict:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode``: the expert grouped GEMM and the
    CPU flash attention kernel, counted as torch counts their CUDA peers (SDPA: full s², not causal)."""
    aten = torch.ops.aten
    return {aten._grouped_mm: _grouped_mm_flops,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops}
