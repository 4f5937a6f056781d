"""Per-rank memory of a training layout: parameters, gradients, optimizer states, activations.

Parameters are counted exactly from the LLM config, split as the layer builders split them
(``xoron_dist.parallel.tensor``: column/row linears and the vocabulary over TP; routed experts
over EP, and on their FFN dim over TP when ``parallel.tp_experts``; layers over PP stages by
``xoron_dist.parallel.pipeline.partition.partition_layers`` on parameter counts, as the trainer's
``parallelize`` does).
A test checks the counts against the real model built on the meta device for several layouts.
The multimodal parts (encoders, projectors, fusion layers, generators; ``xoron_dist.plan.parts``)
add their per-rank parameters, split by the same TP plan and EP rule, to the rank's weights,
gradients and optimizer states under the same ZeRO rules (their routed generator experts as expert
weights); with pp > 1 the first pipeline stage holds them (``rank_parts``). Their
activations are not modelled (``parts``' docstring says why), except the vision tower's and the
video encoder's under ``data.multiscale``, whose largest scale bucket bounds every medium's shape
(``media_activation_bytes``).

Bytes per parameter (Ψ: this rank's parameters; ZeRO divides over the data-parallel ranks, which
DeepSpeed takes as dp·sp for dense weights and dp·sp/ep for routed experts):

    precision  weights  grads  optimizer                                   ZeRO-1/2         ZeRO-3
    bf16       2        2      12 (fp32 master + Adam m, v)                grads, opt / dp  all / dp
    fp32       4        4      8 (m, v) + 4 fp32 partition copy (ZeRO>=1)  "                "

(ZeRO paper, Rajbhandari et al. 2020, §3: K = 12 for mixed-precision Adam. DeepSpeed's ZeRO-1/2
optimizer clones its fp32 partition even from fp32 weights, hence the extra 4. DeepSpeed's ZeRO-1
reduces gradients bucket by bucket into each rank's partition as ZeRO-2 does: on CPU both
measured the same peak.) DeepSpeed's
gradient buckets add ``reduce_bucket_size`` elements once or twice (``overlap_comm``) under
ZeRO-1/2; ZeRO-3 adds its reduce bucket and its prefetch bucket. Not modelled: ZeRO-3 keeps
tensors below ``stage3_param_persistence_threshold`` (1e5 elements in ``ds_configs/zero3.json``)
whole on every rank; in Xoron those are the norm vectors and routers, under 1% of a layer.

Activations are what autograd saves, tensor by tensor as the model code makes them (see
``layer_activation_bytes``), per token: ``micro_batch_size · seq_len / sp`` tokens on a rank,
head-sized tensors divided by tp, hidden-sized ones replicated over TP (Megatron's norm-region
sequence parallelism is not built). With activation checkpointing a layer keeps only its input
and one layer at a time is recomputed. The LM head's logits (vocabulary/tp wide) and the
cross-entropy's buffers come on top on the last stage; 1F1B keeps ``pp - stage`` micro-batches in
flight on stage ``stage``. The peak is the larger of the step's forward/backward peak and the
optimizer step, which on CPU (``torch.optim.AdamW``, one tensor at a time) allocates two
temporaries the size of the largest tensor it steps (DeepSpeed's flat partition under ZeRO>=1).

Attention has no term in s²: packed documents attend document by document
(``xoron_dist.model.common.document_attention``), never through an (s x s) mask. What is left is
the ring's transient tile mask with packed documents (``ring_tile_mask_bytes``, (s/sp/2)²).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xoron_dist.config import LLMConfig, XoronConfig
from xoron_dist.parallel.layout import Layout
from xoron_dist.parallel.pipeline.partition import StageCosts, partition_layers
from xoron_dist.plan.parts import ParameterCount, PartParameters, largest_part_tensor, part_parameters

FP32 = 4


def _linear(i: int, o: int) -> int:
    return i * o


def attention_parameters(llm: LLMConfig, tp: int) -> int:
    """MLA on one TP rank: replicated down-projections and norms, head-split up/out projections."""
    heads = llm.num_heads // tp
    n = 2 * llm.hidden_size  # attn_norm, ffn_norm of the layer
    if llm.q_lora_rank is None:
        n += _linear(llm.hidden_size, heads * llm.qk_head_dim)
    else:
        n += _linear(llm.hidden_size, llm.q_lora_rank) + llm.q_lora_rank + _linear(llm.q_lora_rank,
                                                                                   heads * llm.qk_head_dim)
    n += _linear(llm.hidden_size, llm.kv_lora_rank + llm.qk_rope_head_dim) + llm.kv_lora_rank
    n += _linear(llm.kv_lora_rank, heads * (llm.qk_nope_head_dim + llm.v_head_dim))
    n += _linear(heads * llm.v_head_dim, llm.hidden_size)
    return n


def layer_parameters(llm: LLMConfig, index: int, tp: int, ep: int, tp_experts: bool) -> ParameterCount:
    """Decoder layer ``index`` on one rank (attention + norms + dense FFN or MoE)."""
    dense = attention_parameters(llm, tp)
    if not llm.is_moe_layer(index):
        return ParameterCount(dense + 3 * llm.hidden_size * llm.dense_intermediate_size // tp)
    moe = llm.moe
    dense += moe.num_experts * llm.hidden_size + (llm.hidden_size if moe.router_norm else 0)  # router (+ input norm)
    dense += 3 * llm.hidden_size * moe.expert_intermediate_size * moe.num_shared_experts // tp
    expert_split = tp if tp_experts else 1
    expert = moe.num_experts // ep * 3 * llm.hidden_size * moe.expert_intermediate_size // expert_split
    return ParameterCount(dense, expert)


def embedding_parameters(llm: LLMConfig, tp: int) -> int:
    return llm.vocab_rows(tp) // tp * llm.hidden_size


def head_parameters(llm: LLMConfig, tp: int) -> int:
    """Final norm + LM head (nothing extra for the head when it is tied to the embedding)."""
    lm_head = 0 if llm.tie_word_embeddings else llm.vocab_rows(tp) // tp * llm.hidden_size
    return llm.hidden_size + lm_head


@dataclass(frozen=True)
class StageParameters:
    """One pipeline stage on one rank: its layers, and whether it holds the embedding / the head."""

    layers: range
    params: ParameterCount
    first: bool
    last: bool


def stage_parameters(cfg: XoronConfig, tp: int, pp: int, ep: int) -> list[StageParameters]:
    """Per-rank parameters of every pipeline stage, layers split as ``parallelize`` splits them."""

    llm = cfg.llm
    per_layer = [layer_parameters(llm, i, tp, ep, cfg.parallel.tp_experts) for i in range(llm.num_layers)]
    embed, head = embedding_parameters(llm, tp), head_parameters(llm, tp)
    if pp == 1:
        total = sum(per_layer, ParameterCount()) + ParameterCount(embed + head)
        return [StageParameters(range(llm.num_layers), total, True, True)]
    partition = partition_layers(StageCosts(tuple(float(p.total) for p in per_layer), float(embed), float(head)), pp)
    stages = []
    for s in range(pp):
        layers = partition.layers_of(s)
        params = sum((per_layer[i] for i in layers), ParameterCount())
        params += ParameterCount((embed if s == 0 else 0) + (head if s == pp - 1 else 0))
        stages.append(StageParameters(layers, params, s == 0, s == pp - 1))
    return stages


# --------------------------------------------------------------------------- activations


def _norm_bytes(width: int, b: int) -> int:
    """RMSNorm (computed in fp32): fp32 input copy (mixed only), normed fp32, its cast, the output."""
    return (FP32 * width + FP32 * width + b * width + b * width) if b < FP32 else 2 * FP32 * width


def layer_activation_bytes(llm: LLMConfig, index: int, tp: int, tp_experts: bool, b: int,
                           expert_rows: float = 1.0, packed_documents: bool = False) -> int:
    """Bytes autograd saves per token in decoder layer ``index`` (its output included, input not).

    b: bytes of the activation dtype. expert_rows: rows the routed experts process per (token,
    choice): 1 when dropless (balanced load), the capacity factor when EP pads to a fixed capacity.
    packed_documents: the rows carry document ids (``document_attention``: q, k, v gathered per
    document, two int64 indices per token). No term grows with the sequence: no (s x s) mask exists.

    Following ``MultiLatentAttention``/``MoEFeedForward``:
    norms; q (low-rank path), the fused kv down-projection and its normed latent, the expanded
    k/v, the concatenated q and k the fused kernel saves (its zero-padded copies are transient; v
    is a view of the kv up-projection, or a gathered copy with packed documents), its output (as
    wide as the padded head dim) and log-sum-exp, the reshaped attention output; the router's fp32
    scores and top-k bookkeeping (int64), the rows gathered per (token, choice), the experts'
    gate/up projections, SiLU(gate), SiLU·up and their outputs; the shared expert's four
    intermediate tensors (autograd SwiGLU: gate, up, SiLU, product); the residual.
    """
    hidden, heads = llm.hidden_size, llm.num_heads // tp
    qk, v = llm.qk_head_dim, llm.v_head_dim
    width = max(qk, v)  # the fused kernels' common head dim (v zero-padded)
    mixed = b < FP32
    n = _norm_bytes(hidden, b)
    if llm.q_lora_rank is not None:
        n += b * llm.q_lora_rank + _norm_bytes(llm.q_lora_rank, b)
    n += b * heads * qk  # q
    n += b * (llm.kv_lora_rank + llm.qk_rope_head_dim) + _norm_bytes(llm.kv_lora_rank, b)
    if mixed:  # apply_rotary computes in fp32: the float copies of q's and k's rope halves are saved
        n += FP32 * (heads + 1) * llm.qk_rope_head_dim
    if packed_documents:  # v gathered per document (the kv_up output dies); the layout's token index and inverse
        n += b * heads * v + 2 * 8
    else:
        n += b * heads * (llm.qk_nope_head_dim + v)  # kv_up output: the kernel saves v, a view of it
    n += b * heads * 2 * qk  # q, k concatenated (gathered per document when packed)
    n += b * heads * width + FP32 * heads  # kernel output (v padded to width), log-sum-exp
    n += b * heads * v  # attention output made contiguous for out_proj
    n += b * hidden  # residual after attention
    n += _norm_bytes(hidden, b)
    if not llm.is_moe_layer(index):
        n += 4 * b * llm.dense_intermediate_size // tp
    else:
        moe = llm.moe
        k = moe.top_k
        ie = moe.expert_intermediate_size // (tp if tp_experts else 1)
        n += (FP32 * hidden if mixed else 0) + FP32 * moe.num_experts  # router input in fp32, sigmoid scores
        n += 8 * k * 3 + FP32 * 3 * k  # top-k ids, sort order, token index (int64); combine weights
        rows = k * expert_rows
        n += int(b * rows * hidden)  # rows gathered per (token, choice)
        n += int(4 * b * rows * ie)  # gate+up, SiLU(gate), SiLU·up (autograd SwiGLU per expert)
        n += int(b * rows * hidden) + b * k  # expert outputs concatenated (or returned by EP), weights per row
        n += 4 * b * moe.expert_intermediate_size * moe.num_shared_experts // tp  # shared expert
    n += b * hidden  # residual after the FFN: the next layer's input
    return n


def head_activation_bytes(llm: LLMConfig, tp: int, b: int) -> tuple[int, int]:
    """(saved, backward extra) bytes per token of the final norm, LM head and loss.

    Saved: the norm, the logits (held by the step until backward), the fp32 softmax.
    Backward extra: single-rank ``F.cross_entropy`` allocates the NLL gradient and the
    log-softmax gradient (two fp32 vocab-wide tensors); Megatron's vocab-parallel
    cross-entropy (tp > 1) reuses its saved softmax in place.
    """
    vocab = llm.vocab_rows(tp) // tp
    padded = llm.vocab_rows(tp) != llm.usable_vocab_size
    saved = _norm_bytes(llm.hidden_size, b) + b * vocab * (1 + padded) + FP32 * vocab
    extra = (2 * FP32 * vocab if tp == 1 else 0) + (b * vocab if b < FP32 else 0)
    return saved, extra


def fused_head_bytes(llm: LLMConfig, tp: int, b: int, tokens: int, chunk: int) -> tuple[float, float]:
    """(saved, forward extra) bytes per token of the final norm and the chunked head + loss
    (``LinearCrossEntropy``): the norm and the two gradients (∂hidden per token, ∂W of this rank's rows
    once per micro-batch) wait for the backward; during the forward one chunk's fp32 logits (with their
    cast for bf16 GEMMs) and the fp32 accumulator of ∂W exist besides, and with bf16 weights the chunk's
    fp32 copy of its ∂W product (none where the GEMM accumulates in place, ``head.accumulates_in_place``:
    there this is an upper bound)."""
    width, rows = llm.hidden_size, llm.vocab_rows(tp) // tp
    piece = min(chunk, tokens)
    saved = _norm_bytes(width, b) + b * width + rows * width * b / tokens
    extra = (piece * rows * (FP32 + (b if b < FP32 else 0)) + (rows * width * FP32 if b < FP32 else 0)) / tokens
    return saved, extra


def media_activation_bytes(cfg: XoronConfig, tp: int, b: int, micro_batch_size: int) -> int:
    """Bytes of the encoders' activations for one micro-batch at the largest ``data.multiscale`` bucket.

    Counted only with ``data.multiscale`` set (its largest bucket bounds every image's and video's
    shape; without it media keep their prepared sizes, which the config does not bound). Media: one
    image and one video per packed row (``micro_batch_size`` of each, for each enabled encoder): the
    least a row holding that medium carries; more media per row scale the figure linearly.

    Tokens: the tower's patch grid per image or frame (``vision.resize: native`` re-grids every image
    to ``max_patches`` whatever its scale; ``square``: (image_size / patch)²). The video encoder with
    ``frame_encoder: own``: the bucket's frames (at most ``video.max_frames``) x (side / patch)², side =
    the bucket's scale kept within [min_resolution, max_resolution] (``frames_to_patches``), and its
    dense block-causal mask, (videos, 1, n, n) bool, held for the forward; with ``tower``: the clip is
    resampled to ``data.video_tokens / tokens_per_frame`` frames, each through the tower, so the
    bucket does not change it. Per token and layer, what a pre-norm layer saves: 5·hidden whole
    (two norms' inputs and outputs, the residual after attention) and 5·hidden / tp head-sized (q,
    k, v, the attention output, its copy for the out projection), plus the FFN: the tower's fc1 and
    GELU (2·intermediate / tp), the video encoder's routed (top_k rows) and shared SwiGLUs (gate, up,
    SiLU, product: 4·(top_k + shared)·expert_intermediate) and the router's input.
    """
    multiscale = cfg.data.multiscale
    if multiscale is None:
        return 0
    _, video_scale, frames = multiscale.largest()
    vision, video = cfg.model.vision, cfg.model.video
    tower_tokens = vision.max_patches if vision.resize == "native" else (vision.image_size // vision.patch_size) ** 2
    tower_per_token = b * vision.num_layers * (5 * vision.hidden_size + 5 * vision.hidden_size // tp
                                               + 2 * vision.intermediate_size // tp)
    total = micro_batch_size * tower_tokens * tower_per_token if vision.enabled else 0
    if video.enabled:
        hidden = video.hidden_size
        ffn = 4 * (video.temporal_top_k + video.shared_experts) * video.expert_intermediate_size
        per_token = b * video.num_layers * (5 * hidden + 5 * hidden // tp + hidden + video.motion_dim + ffn // tp)
        if video.frame_encoder == "tower":
            clip_frames = max(1, cfg.data.video_tokens // video.tokens_per_frame)
            tokens = clip_frames * tower_tokens
            total += micro_batch_size * (tokens * tower_per_token + tokens * per_token)
        else:
            side = min(max(video_scale, video.min_resolution), video.max_resolution)
            tokens = min(frames, video.max_frames) * (-(-side // video.patch_size)) ** 2
            total += micro_batch_size * (tokens * per_token + tokens * tokens)
    return total


# --------------------------------------------------------------------------- totals


@dataclass(frozen=True)
class TrainingShape:
    """The per-rank work of one micro-batch: what the activations scale with."""

    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    activation_checkpointing: bool
    loss_chunk_tokens: int = 0  # train.loss_chunk_tokens: the head's logits exist for this many tokens at a time
    packed_documents: bool = False  # rows carry document ids (packed Arrow data): see layer_activation_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank (the pipeline stage with the largest total)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    latent_cache: int  # inference: MLA latent KV cache for micro_batch_size x seq_len, this stage's layers
    stage: int = 0
    params: ParameterCount = field(default_factory=ParameterCount)  # the rank's: its LLM stage + the parts
    parts: tuple[PartParameters, ...] = ()  # multimodal parts on this rank (in ``params`` and the bytes)

    @property
    def total(self) -> int:
        """Training peak: everything but the inference cache."""
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    def components(self) -> dict[str, int]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "buffers": self.buffers}


def _zero_bytes(zero_stage: int, count: int, shards: int, mixed: bool) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes of ``count`` parameters partitioned over ``shards`` ranks."""
    weight_b, grad_b = (2, 2) if mixed else (FP32, FP32)
    opt_b = 12 if mixed else (8 + (4 if zero_stage >= 1 else 0))
    weights = weight_b * count / (shards if zero_stage >= 3 else 1)
    grads = grad_b * count / (shards if zero_stage >= 1 else 1)
    optimizer = opt_b * count / (shards if zero_stage >= 1 else 1)
    return int(weights), int(grads), int(optimizer)


def deepspeed_buffer_bytes(ds_config: dict, zero_stage: int, mixed: bool) -> int:
    """DeepSpeed's gradient-reduction (and ZeRO-3 prefetch) buckets, from the run's DeepSpeed JSON."""
    zero = ds_config.get("zero_optimization", {})
    grad_b = 2 if mixed else FP32
    if zero_stage in (1, 2):
        if not zero.get("contiguous_gradients", True):
            return 0
        copies = 2 if zero.get("overlap_comm", False) else 1
        return copies * int(zero.get("reduce_bucket_size", 5e8)) * grad_b
    if zero_stage == 3:
        return int(zero.get("reduce_bucket_size", 5e8)) * grad_b + \
            int(zero.get("stage3_prefetch_bucket_size", 5e7)) * (2 if mixed else FP32)
    return 0


def estimate_memory(cfg: XoronConfig, layout: Layout, shape: TrainingShape, ds_config: dict,
                    mixed: bool, cpu_optimizer_temporaries: bool = False) -> MemoryEstimate:
    """Peak bytes per rank of ``layout`` training ``cfg`` with ``shape``: the busiest pipeline stage.

    ``mixed``: bf16 weights/activations with fp32 optimizer states (GPU); else fp32 throughout.
    ``cpu_optimizer_temporaries``: count torch AdamW's per-tensor temporaries (CPU runs).
    """
    stages = estimate_stage_memory(cfg, layout, shape, ds_config, mixed, cpu_optimizer_temporaries)
    return max(stages, key=lambda e: e.total)


def estimate_stage_memory(cfg: XoronConfig, layout: Layout, shape: TrainingShape, ds_config: dict,
                          mixed: bool, cpu_optimizer_temporaries: bool = False) -> list[MemoryEstimate]:
    """Peak bytes per rank of every pipeline stage (one entry when pp = 1); see ``estimate_memory``."""
    llm = cfg.llm
    b = 2 if mixed else FP32
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    dense_shards = layout.dp * layout.sp
    expert_shards = max(1, dense_shards // ep)
    tokens = shape.micro_batch_size * shape.seq_len // layout.sp
    tp_experts = cfg.parallel.tp_experts
    capacity = cfg.parallel.expert_capacity_factor
    expert_rows = capacity if ep > 1 and capacity is not None else 1.0
    buffers = deepspeed_buffer_bytes(ds_config, layout.zero_stage, mixed)
    parts = tuple(rank_parts(cfg, layout))
    estimates = []
    for s, stage in enumerate(stage_parameters(cfg, tp, pp, ep)):
        held = parts if stage.first else ()
        params = sum((p.params for p in held), stage.params)
        dw, dg, do = _zero_bytes(layout.zero_stage, params.dense, dense_shards, mixed)
        ew, eg, eo = _zero_bytes(layout.zero_stage, params.expert, expert_shards, mixed)
        weights, grads, optimizer = dw + ew, dg + eg, do + eo
        per_layer = [layer_activation_bytes(llm, i, tp, tp_experts, b, expert_rows, shape.packed_documents)
                     for i in stage.layers]
        in_flight = min(pp - s, shape.grad_accum_steps)  # 1F1B: stage s holds pp - s micro-batches
        if not stage.last:
            head_saved, head_extra = 0, 0
        elif shape.loss_chunk_tokens > 0:
            head_saved, head_extra = fused_head_bytes(llm, tp, b, tokens, shape.loss_chunk_tokens)
        else:
            head_saved, head_extra = head_activation_bytes(llm, tp, b)
        embed_out = b * llm.hidden_size if stage.first else 0  # the first layer's input
        received = b * llm.hidden_size if not stage.first else 0  # activation received from the stage before
        if shape.activation_checkpointing:  # inputs kept; one layer recomputed at a time in backward
            kept = len(per_layer) * b * llm.hidden_size + embed_out + received
            acts = tokens * (in_flight * kept + head_saved + max(head_extra, max(per_layer, default=0)))
        else:
            kept = sum(per_layer) + embed_out + received
            acts = tokens * (in_flight * kept + head_saved + head_extra)
        if shape.packed_documents and layout.sp > 1:
            acts += ring_tile_mask_bytes(shape.micro_batch_size, shape.seq_len // layout.sp, b)
        if held:  # the encoders run on the stage that holds the parts
            acts += media_activation_bytes(cfg, tp, b, shape.micro_batch_size)
        if cpu_optimizer_temporaries:
            largest = _largest_optimizer_tensor(cfg, params, layout, dense_shards, expert_shards, bool(held))
            acts = max(acts, 2 * FP32 * largest - grads)  # the step runs after backward freed the activations
        latent = latent_cache_bytes(llm, shape.micro_batch_size, shape.seq_len, len(stage.layers), b)
        estimates.append(MemoryEstimate(weights, grads, optimizer, int(acts), buffers, latent, s, params, held))
    return estimates


def rank_parts(cfg: XoronConfig, layout: Layout) -> list[PartParameters]:
    """The multimodal parts on one rank of ``layout`` (``xoron_dist.plan.parts``); empty without any.
    With pp > 1 the first stage holds them (the encoders and projectors sit there; the fusion layers sit
    with their decoder layers' stages, so this overstates stage 0 by the fusion layers)."""
    return part_parameters(cfg, layout.tp, layout.ep)


def _largest_optimizer_tensor(cfg: XoronConfig, params: ParameterCount, layout: Layout, dense_shards: int,
                              expert_shards: int, with_parts: bool) -> int:
    """Elements of the largest tensor the optimizer steps at once: a parameter (ZeRO-0) or
    DeepSpeed's flat fp32 partition of all parameters (ZeRO>=1)."""
    if layout.zero_stage >= 1:
        return params.dense // dense_shards + params.expert // expert_shards
    llm = cfg.llm
    vocab = llm.vocab_rows(layout.tp) // layout.tp * llm.hidden_size
    moe = llm.moe
    stacked = 1 if layout.ep > 1 else moe.num_experts  # EP keeps one tensor per expert; else stacked
    gate_up = stacked * 2 * moe.expert_intermediate_size * llm.hidden_size
    parts = largest_part_tensor(cfg, layout.tp, layout.ep) if with_parts else 0
    return max(vocab, gate_up // layout.tp, parts)


def ring_tile_mask_bytes(batch: int, seq_local: int, b: int) -> int:
    """Transient bytes of the explicit mask of one ring tile (packed documents only; one tile at a time).

    A tile is (seq_local/2)² (query half x key half, ``ring_attention._halves``): its boolean mask
    and the comparisons that build it (about four bools per element) and the additive bias in the
    activation dtype the kernel takes. It lives while one tile's kernel call runs, in forward and in
    backward, and is the only quadratic term left (the single-rank path has none).
    """
    return batch * (seq_local // 2) ** 2 * (4 + b)


def latent_cache_bytes(llm: LLMConfig, batch: int, max_len: int, layers: int, dtype_bytes: int) -> int:
    """The MLA latent KV cache (``LatentKVCache``) for ``layers`` layers: (kv_lora_rank + rope dim) per token."""
    return layers * batch * max_len * (llm.kv_lora_rank + llm.qk_rope_head_dim) * dtype_bytes


__all__ = ["MemoryEstimate", "ParameterCount", "StageParameters", "TrainingShape", "attention_parameters",
           "deepspeed_buffer_bytes", "embedding_parameters", "estimate_memory", "estimate_stage_memory",
           "fused_head_bytes", "head_activation_bytes", "head_parameters", "latent_cache_bytes",
           "layer_activation_bytes", "layer_parameters", "media_activation_bytes", "rank_parts", "ring_tile_mask_bytes",
           "stage_parameters"]
