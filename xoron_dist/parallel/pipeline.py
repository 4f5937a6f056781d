"""Pipeline parallelism: the LLM's layers split into ``pp`` stages, trained with a 1F1B schedule.

    stage 0                     stage 1 ... stage pp-2         stage pp-1
    embed_tokens ─► layers[a:b] ─► layers[b:c] ─► ... ─► layers[y:L] ─► norm ─► lm_head ─► loss
                 send (batch, seq, hidden) ─►        ◄─ send d loss / d hidden

Engine choice: our own 1F1B schedule over Megatron-core's pipeline group, driving the ordinary
(non-pipeline) ``DeepSpeedEngine`` of each stage. The alternatives, read in the installed sources:

- DeepSpeed's ``PipelineModule``/``PipelineEngine`` builds its groups from its own
  ``PipelineParallelGrid`` (axes pipe/data/model, no context-parallel axis), so sequence
  parallelism and our ``mpu`` would have to be re-expressed in its topology; it owns the data
  iterator, a fixed ``loss_fn`` and its own per-layer checkpoint files, and averages the loss over
  micro-batches, whereas our loss is the token-weighted mean over the whole step.
- Megatron-core's ``get_forward_backward_func`` expects Megatron models and allocates its
  point-to-point buffers on ``torch.cuda.current_device()``, so it cannot run on CPU/gloo.

With the plain engine every other piece stays as it is: DeepSpeed receives our ``mpu`` (its
model-parallel group is Megatron's tp x pp group: each stage writes its own ``mp_rank_XX`` file,
and the gradient norm is summed over the stages), ZeRO-1 partitions each stage's optimizer state
over that stage's data(-sequence)-parallel ranks, tensor-parallel layers, ring attention and the
expert dispatch run inside a stage unchanged, and the loss scaling of ``trainer.py`` applies as is.
ZeRO-2/3 are refused with pp > 1 (``layout._pipeline_zero``): DeepSpeed's pipeline engine refuses
them because they reduce or gather gradients and weights during every micro-batch, which the
pipeline's many in-flight micro-batches make wasteful; ZeRO-0 is refused because DeepSpeed's
non-ZeRO gradient clipping counts replicated parameters on model-parallel rank 0 only, i.e. on the
first stage only.

The 1F1B schedule (PipeDream-Flush; Narayanan et al. 2021, Megatron-core's non-interleaved
``forward_backward_pipelining_without_interleaving``): stage ``s`` of ``pp`` runs
``pp - s - 1`` warm-up forwards, then alternates one forward and one backward, then drains the
remaining backwards. At most ``pp - s`` micro-batches are in flight on stage ``s`` (GPipe keeps
all ``grad_accum_steps``), and every stage runs its backwards in micro-batch order, so DeepSpeed's
gradient-accumulation boundary (the last backward) and the accumulated gradients are exactly those
of the single-stage loop. Sends and receives of one exchange are posted together
(``batch_isend_irecv``) and waited on, which cannot deadlock whatever the backend.

Gradient scaling: the last stage calls ``engine.backward(scaled loss)`` as the single-stage trainer
does (DeepSpeed divides by the accumulation steps and applies any fp16 loss scale); the gradient it
sends back already carries both, so the other stages back-propagate the received gradient through
``engine.backward`` of the surrogate ``sum(output * grad)`` with ``scale_wrt_gas=False`` and any
loss scale divided out. Every parameter then gets the single-rank gradient.

Partitioning: contiguous runs of layers, each stage at least one, minimising the largest stage
cost. Costs are parameter counts (``parameter_costs``) or measured forward + backward seconds
(``measured_costs``); the embedding counts towards stage 0, the final norm, LM head and loss
towards the last stage. Multimodal hook: the encoders and projector belong to stage 0 and the
generator heads to the last stage; their cost goes into ``StageCosts.first``/``last`` so the
layers are balanced around them, and stage 0 already takes ``inputs_embeds`` (the encoder
outputs merged into the text embeddings) in place of token ids. The fusion layers, which read the
media tokens before chosen decoder layers, would also need those tokens on later stages; until
that is built the trainer refuses pp > 1 with the encoders.

Stage modules are built from the single-rank ``XoronLLM`` (same seed, so the same initial
weights for any pp): ``PipelineStage`` keeps its modules and their names (``embed_tokens``,
``layers.<global index>``, ``norm``, ``lm_head``), so a stage's checkpoint names match the
single-rank model's and ``hf_adapter``'s mapping. The full model is built on the host and pruned
before it moves to the device.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from xoron_dist.model.llm import LLMOutput, XoronLLM
from xoron_dist.model.moe import ExpertBiasRouter, MoEFeedForward
from xoron_dist.parallel.state import get_context

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import parallel_state

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- partitioning


@dataclass(frozen=True)
class StageCosts:
    """What each piece of the LLM costs: one entry per decoder layer, plus what only the first
    stage (embedding; later the multimodal encoders) and only the last stage (final norm, LM head,
    loss; later the generator heads) carry. Any unit, as long as it is the same for all."""

    layers: tuple[float, ...]
    first: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class PipelinePartition:
    """Which layers each stage holds: stage ``s`` holds layers ``bounds[s][0] .. bounds[s][1] - 1``."""

    bounds: tuple[tuple[int, int], ...]
    stage_costs: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.bounds)

    def layers_of(self, stage: int) -> range:
        return range(*self.bounds[stage])

    def describe(self) -> str:
        parts = [f"stage {s}: layers {a}-{b - 1} (cost {c:.3g})"
                 for s, ((a, b), c) in enumerate(zip(self.bounds, self.stage_costs, strict=True))]
        return "; ".join(parts)


def partition_layers(costs: StageCosts, pp: int) -> PipelinePartition:
    """Split the layers into ``pp`` contiguous runs (each at least one layer) that minimise the
    largest stage cost; among equally good splits, the one that puts layers on earlier stages.

    Exact dynamic programme over (stages, layers): O(pp * L^2), instant for any real model.
    """
    layers = list(costs.layers)
    n = len(layers)
    if pp < 1:
        raise ValueError(f"pp = {pp}: a pipeline has at least one stage")
    if n < pp:
        raise ValueError(f"{n} layer(s) cannot fill {pp} pipeline stages: every stage holds at least one layer")
    prefix = [0.0]
    for cost in layers:
        prefix.append(prefix[-1] + cost)

    def stage_cost(stage: int, start: int, stop: int) -> float:
        extra = (costs.first if stage == 0 else 0.0) + (costs.last if stage == pp - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: the smallest possible largest cost when stages 0..k-1 hold layers 0..i-1.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for i in range(k, n - (pp - k) + 1):
            for j in range(k - 1, i):  # stage k-1 holds layers j..i-1
                value = max(best[k - 1][j], stage_cost(k - 1, j, i))
                if value < best[k][i] or (value == best[k][i] and j > cut[k][i]):
                    best[k][i], cut[k][i] = value, j
    bounds, stop = [], n
    for k in range(pp, 0, -1):
        start = cut[k][stop]
        bounds.append((start, stop))
        stop = start
    bounds.reverse()
    return PipelinePartition(tuple(bounds), tuple(stage_cost(s, a, b) for s, (a, b) in enumerate(bounds)))


def parameter_costs(model: XoronLLM) -> StageCosts:
    """Parameter counts: what balances memory (weights, gradients, optimizer states) per stage."""

    def count(module: nn.Module) -> float:
        return float(sum(p.numel() for p in module.parameters()))

    return StageCosts(tuple(count(layer) for layer in model.layers), count(model.embed_tokens),
                      count(model.norm) + count(model.lm_head))


def measured_costs(model: XoronLLM, micro_batch_size: int, seq_len: int, repeats: int = 3) -> StageCosts:
    """Forward + backward seconds of each layer (and of the LM head with its loss) on random data,
    the median of ``repeats`` runs after a warm-up: what balances step time when layers differ
    (dense vs. MoE layers, the vocabulary-sized head). Runs on the model's device; call it on the
    single-rank model before ``build_stage`` prunes it."""
    device = model.embed_tokens.weight.device
    hidden = torch.randn(micro_batch_size, seq_len, model.cfg.hidden_size, device=device)
    positions = torch.arange(seq_len, device=device).expand(micro_batch_size, -1)
    cos, sin = model.rope(positions)
    rope = (cos.to(hidden.dtype), sin.to(hidden.dtype))
    labels = torch.randint(0, model.cfg.usable_vocab_size, (micro_batch_size, seq_len), device=device)

    def timed(run) -> float:
        samples = []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt:  # the first run pays for allocation and kernel selection
                samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    def layer_run(layer):
        return lambda: layer(hidden.detach().requires_grad_(), rope, positions).sum().backward()

    def head_run():
        x = hidden.detach().requires_grad_()
        logits = model.lm_head(model.norm(x))
        model.builder.token_losses(logits, labels).sum().backward()

    was_training = model.training
    model.train()
    layer_costs = tuple(timed(layer_run(layer)) for layer in model.layers)
    head = timed(head_run)
    model.zero_grad(set_to_none=True)
    model.expert_load.zero_()  # the routers counted the random tokens
    model.train(was_training)
    return StageCosts(layer_costs, 0.0, head)


# --------------------------------------------------------------------------- the stage module


class PipelineStage(nn.Module):
    """One pipeline stage of ``XoronLLM``: its modules, under the same names.

    forward on the first stage takes ``input_ids`` (batch, seq) (or ``inputs_embeds``), on the
    others the previous stage's hidden states (batch, seq, hidden); it returns hidden states
    (batch, seq, hidden), except on the last stage, which returns ``LLMOutput`` (logits, and the
    mean token loss when ``labels`` are given) like ``XoronLLM``.
    """

    # The expert-bias bookkeeping and the padding-row mask are XoronLLM's own, over this stage's routers.
    update_expert_biases = XoronLLM.update_expert_biases
    keep_router_state_fp32 = XoronLLM.keep_router_state_fp32
    routers = XoronLLM.routers
    _mask_padding_rows = XoronLLM._mask_padding_rows
    _head, _chunk_loss_sum = XoronLLM._head, XoronLLM._chunk_loss_sum

    def __init__(self, model: XoronLLM, partition: PipelinePartition, stage: int) -> None:
        super().__init__()
        if model.cfg.tie_word_embeddings and partition.stages > 1:
            raise ValueError("tied word embeddings across pipeline stages are not supported: the embedding and "
                             "the LM head live on different stages (set model.llm.tie_word_embeddings=false)")
        self.cfg, self.builder, self.vocab_rows = model.cfg, model.builder, model.vocab_rows
        self.stage, self.num_stages, self.partition = stage, partition.stages, partition
        self.is_first, self.is_last = stage == 0, stage == partition.stages - 1
        self.rope = model.rope
        if self.is_first:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in partition.layers_of(stage)})
        if self.is_last:
            self.norm, self.lm_head = model.norm, model.lm_head
        self.activation_checkpointing = model.activation_checkpointing
        self.loss_chunk_tokens = model.loss_chunk_tokens
        self._routers = [m for m in self.layers.modules() if isinstance(m, ExpertBiasRouter)]
        self.moe_layer_ids = [layer.index for layer in self.layers.values() if isinstance(layer.ffn, MoEFeedForward)]
        self.register_buffer("expert_load", torch.zeros(len(self._routers), self.cfg.moe.num_experts,
                                                        device=model.expert_load.device), persistent=False)

    def forward(
        self,
        inputs: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | LLMOutput:
        if self.is_first:
            x = self.embed_tokens(inputs) if inputs_embeds is None else inputs_embeds
        else:
            x = inputs
        batch, seq = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq, device=x.device).expand(batch, -1)
        cos, sin = self.rope(position_ids)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        for layer in self.layers.values():
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, position_ids, document_ids, use_reentrant=False)
            else:
                x = layer(x, rope, position_ids, document_ids)
        if self.training and torch.is_grad_enabled() and self._routers:
            # After the layer loop, as in XoronLLM: checkpoint recompute must not count tokens twice.
            self.expert_load += torch.stack([r.last_load for r in self._routers])
        if not self.is_last:
            return x
        return self._head(x, labels)


def build_stage(model: XoronLLM, costs: StageCosts | None = None) -> PipelineStage:
    """This rank's stage of ``model`` (built on every rank from the same seed), balanced by
    ``costs`` (default: parameter counts). ``xoron_dist.parallel.state`` must be initialised.

    The costs are averaged over all ranks first, so that every rank cuts the same stages even
    from measured costs, which differ a little from rank to rank.
    """
    costs = costs or parameter_costs(model)
    values = torch.tensor([*costs.layers, costs.first, costs.last], dtype=torch.float64,
                          device=get_context().device)
    dist.all_reduce(values)
    values = (values / dist.get_world_size()).tolist()
    costs = StageCosts(tuple(values[:-2]), values[-2], values[-1])
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    partition = partition_layers(costs, pp)
    logger.info("pipeline of %d stages: %s", pp, partition.describe())
    return PipelineStage(model, partition, parallel_state.get_pipeline_model_parallel_rank())


# --------------------------------------------------------------------------- the 1F1B schedule


class _Links:
    """Point-to-point exchanges with the neighbouring stages over Megatron's pipeline group."""

    def __init__(self, stage: PipelineStage) -> None:
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.prev = None if stage.is_first else parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = None if stage.is_last else parallel_state.get_pipeline_model_parallel_next_rank()

    def exchange(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_next: torch.Tensor | None = None, recv_prev: torch.Tensor | None = None) -> None:
        """Post every given send/receive at once, then wait for all (received tensors are filled in)."""
        ops = []
        if send_prev is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev, self.group))
        if recv_prev is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.irecv, recv_prev, self.prev, self.group))
        if send_next is not None and self.next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next, self.group))
        if recv_next is not None and self.next is not None:
            ops.append(dist.P2POp(dist.irecv, recv_next, self.next, self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()


def train_step_1f1b(engine, stage: PipelineStage, batches: Sequence, scale: float) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step through the pipeline (1F1B),
    calling ``engine.step()`` after each backward (once its input gradient is sent), as the
    single-stage loop does.

    engine: this stage's ``DeepSpeedEngine`` (its module is ``stage``). batches: the step's
    micro-batches, the same on every stage of a pipeline (``input_ids``, ``labels``,
    ``position_ids``, ``document_ids``). scale: the weight of each micro-batch's loss *sum*
    (see ``trainer._run_stage``). Returns the summed token loss of the micro-batches, an fp32
    scalar, on every stage (the last stage computes it; the others receive it).
    """
    links = _Links(stage)
    device = batches[0].input_ids.device
    dtype = next(p for p in engine.module.parameters()).dtype
    loss_sum = torch.zeros((), device=device)
    unscale = 1.0 / _loss_scale(engine, device)

    def activation(batch) -> torch.Tensor:  # (batch, seq, hidden): what crosses a stage boundary
        return torch.empty(*batch.input_ids.shape, stage.cfg.hidden_size, dtype=dtype, device=device)

    def forward(batch, received: torch.Tensor | None) -> torch.Tensor:
        nonlocal loss_sum
        out = engine(batch.input_ids if stage.is_first else received, position_ids=batch.position_ids,
                     document_ids=batch.document_ids, labels=batch.labels if stage.is_last else None)
        if not stage.is_last:
            return out
        micro_sum = out.loss * out.num_tokens
        loss_sum += micro_sum.detach().float()
        return micro_sum * scale

    def backward(received: torch.Tensor | None, output: torch.Tensor, grad: torch.Tensor | None):
        if stage.is_last:
            engine.backward(output)
        else:
            # d/d output of sum(output * grad) is grad: the received gradient, already divided by the
            # accumulation steps and loss-scaled on the last stage, so neither is applied again.
            engine.backward((output * grad).sum() * unscale, scale_wrt_gas=False)
        return None if received is None else received.grad

    def receive_forward(batch) -> torch.Tensor | None:
        if stage.is_first:
            return None
        buffer = activation(batch)
        links.exchange(recv_prev=buffer)
        return buffer.requires_grad_()

    # warm-up: forwards only; steady state: one forward, one backward; cool-down: backwards only.
    micro = len(batches)
    warmup = min(stage.num_stages - stage.stage - 1, micro)
    inputs: deque = deque()
    outputs: deque = deque()
    for i in range(warmup):
        received = receive_forward(batches[i])
        output = forward(batches[i], received)
        links.exchange(send_next=None if stage.is_last else output.detach())
        inputs.append(received)
        outputs.append(output)

    received = receive_forward(batches[warmup]) if warmup < micro else None
    for i in range(warmup, micro):
        output = forward(batches[i], received)
        grad = None
        if not stage.is_last:
            grad = activation(batches[i - warmup])
            links.exchange(send_next=output.detach(), recv_next=grad)
        inputs.append(received)
        outputs.append(output)
        input_grad = backward(inputs.popleft(), outputs.popleft(), grad)
        if i == micro - 1:
            links.exchange(send_prev=input_grad)
            received = None
        elif stage.is_first:
            received = None
        else:
            received = activation(batches[i + 1])
            links.exchange(send_prev=input_grad, recv_prev=received)
            received.requires_grad_()
        # Only once the input gradient has left: the last step() is the optimizer step, whose
        # gradient-norm all-reduce spans every stage and must not wait for a gradient still unsent.
        engine.step()

    for i in range(micro - warmup, micro):
        grad = activation(batches[i])
        links.exchange(recv_next=grad)
        links.exchange(send_prev=backward(inputs.popleft(), outputs.popleft(), grad))
        engine.step()

    dist.all_reduce(loss_sum, group=links.group)  # only the last stage holds a non-zero sum
    return loss_sum


def _loss_scale(engine, device: torch.device) -> float:
    """The factor ``engine.backward`` multiplies a loss by (fp16 loss scaling; 1 for fp32/bf16)."""
    scale_if_loss = getattr(engine.optimizer, "scale_if_loss", None)  # ZeRO optimizers (pp > 1 needs ZeRO-1)
    if scale_if_loss is None:
        return 1.0
    probe = torch.ones((), device=device, requires_grad=True) * 1.0  # a loss-like scalar (has grad_fn)
    scaled = scale_if_loss(probe)
    return float(scaled.detach()) if torch.is_tensor(scaled) else 1.0


__all__ = ["PipelinePartition", "PipelineStage", "StageCosts", "build_stage", "measured_costs",
           "parameter_costs", "partition_layers", "train_step_1f1b"]
