"""Pipeline parallelism: the LLM's layers split into ``pp`` stages, trained with a 1F1B schedule.

    stage 0                     stage 1 ... stage pp-2         stage pp-1
    embed_tokens ─► layers[a:b] ─► layers[b:c] ─► ... ─► layers[y:L] ─► norm ─► lm_head ─► loss
                 send (batch, seq, hidden) ─►        ◄─ send d loss / d hidden
    (multimodal: encoders + projectors on stage 0; the media tokens travel beside the hidden states)

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
cost. Costs are parameter counts (``split.parameter_costs``) or measured forward + backward seconds
(``split.measured_costs``); the embedding counts towards stage 0, the final norm, LM head and loss
towards the last stage.

The multimodal model: the encoders and projectors sit on stage 0 (their parameters count in
``StageCosts.first``), each fusion layer on the stage of the decoder layer it runs before. What
crosses a boundary is then a list: the hidden states and, when the micro-batch holds media, the fusion
layers' media tokens (batch, width, hidden) (``MediaContext.tokens``, ``XoronMultimodalModel.
media_carry_shape`` gives every stage their shape from the spans, which all stages read from the same
micro-batch; the document masks are rebuilt from the spans and document ids on each stage, so only the
tokens travel). A later stage passes the received media tokens on unchanged; in backward each stage
returns the gradient of both (fusion reads on this stage plus what the next stage sent back), so stage
0's projectors and encoders get the gradient of every fusion layer downstream, exactly as on one rank.
Without media nothing extra travels and a later stage's fusion layers read a zero medium times 0 (as
stage 0 reads its blank medium: every parameter in the graph, gradients exact zeros). The image and
video generators sit on the last stage; their objectives' sums are computed there beside the LM's
(``objectives``), each with its own weight, and returned per objective. An encoder's auxiliary objective
(the vision tower's reconstruction) is computed on stage 0 and back-propagated there, beside the
received gradient (``first_stage``): nothing extra crosses a boundary.

A stage is the single-rank ``XoronLLM`` (same seed, so the same initial weights for any pp)
pruned to its modules (``split.py``), under the whole model's names (``embed_tokens``,
``layers.<global index>``, ``norm``, ``lm_head``), so a stage's checkpoint names match the
single-rank model's and the HF mapping. The full model is built on the host and pruned before it
moves to the device. With tied word embeddings the first and last stages each hold a copy of the
tied matrix; the step's last backward sums their gradients over Megatron's embedding group
(``tied.py``). Partitioning is in ``partition.py`` (torch-free, shared with the planner).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from xoron_dist.parallel.pipeline.split import StageInfo
from xoron_dist.parallel.pipeline.tied import TiedEmbeddingSync

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import parallel_state


Tensors = list[torch.Tensor]  # what crosses one stage boundary: the hidden states, then any media tokens


class _Links:
    """Point-to-point exchanges with the neighbouring stages over Megatron's pipeline group."""

    def __init__(self, stage: StageInfo) -> None:
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.prev = None if stage.is_first else parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = None if stage.is_last else parallel_state.get_pipeline_model_parallel_next_rank()

    def exchange(self, *, send_next: Tensors | None = None, send_prev: Tensors | None = None,
                 recv_next: Tensors | None = None, recv_prev: Tensors | None = None) -> None:
        """Post every given send/receive at once, then wait for all (received tensors are filled in).
        The tensors of one list go in order; both sides list them in the same order."""
        ops = []
        for tensors, op, peer in ((send_prev, dist.isend, self.prev), (recv_prev, dist.irecv, self.prev),
                                  (send_next, dist.isend, self.next), (recv_next, dist.irecv, self.next)):
            if tensors is not None and peer is not None:
                ops += [dist.P2POp(op, t.contiguous() if op is dist.isend else t, peer, self.group) for t in tensors]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()


class _StageWork:
    """One stage's forward, backward and receive of one micro-batch, and the loss it sums (last stage)."""

    def __init__(self, engine, stage: StageInfo, links: _Links, device: torch.device, scales: Sequence[float],
                 objectives: Sequence[Callable], first_stage: Sequence[bool] | None = None) -> None:
        self.engine, self.stage, self.links, self.device = engine, stage, links, device
        self.scales, self.objectives = list(scales), list(objectives)
        self.first_stage = list(first_stage) if first_stage is not None else [False] * len(self.objectives)
        self.own_losses: deque = deque()  # a stage before the last: its objectives' weighted sum per micro-batch
        self.dtype = next(p for p in engine.module.parameters()).dtype
        self.loss_sums = torch.zeros(len(self.objectives), device=device)
        self.unscale = 1.0 / _loss_scale(engine, device)
        self.media_shape = getattr(engine.module, "media_carry_shape", None)  # the multimodal model's

    def activations(self, batch: dict) -> Tensors:
        """Empty buffers for what crosses a stage boundary: (batch, seq or this SP rank's rows, hidden), then,
        for the multimodal model with media in this micro-batch, the fusion layers' media tokens (batch, width,
        hidden)."""
        rows, seq = batch["input_ids"].shape
        # the multimodal model reads whole rows and, under sequence parallelism, computes its zig-zag part
        layout = getattr(self.engine.module, "row_layout", None)
        local = layout.positions(seq, self.device) if layout is not None else None
        shapes = [(rows, seq if local is None else local.numel(), self.stage.hidden_size)]
        media = self.media_shape(batch) if self.media_shape is not None else None
        shapes += [media] if media is not None else []
        return [torch.empty(*shape, dtype=self.dtype, device=self.device) for shape in shapes]

    def forward(self, batch: dict, received: Tensors | None) -> Tensors | torch.Tensor:
        stage = self.stage
        inputs = dict(batch, labels=batch["labels"] if stage.is_last else None)
        if not stage.is_first:  # input_ids stay: the LLM reads inputs_embeds first, the multimodal model
            inputs["inputs_embeds"] = received[0]  # places its media by them
            if len(received) > 1:
                inputs["media_tokens"] = received[1]
        out = self.engine(**inputs)
        own = self._own_loss(out)
        if not stage.is_last:
            self.own_losses.append(own)
            media = getattr(out, "media_tokens", None)
            return [out.hidden] if media is None else [out.hidden, media]
        return own

    def _own_loss(self, out) -> torch.Tensor | None:
        """Σ scale · sum of the objectives this stage computes (the LM's and the generators' on the last
        stage, an encoder's auxiliary loss on the first), each sum added to ``loss_sums``; None if none."""
        total = None
        for k, (objective, scale, first) in enumerate(zip(self.objectives, self.scales, self.first_stage,
                                                          strict=True)):
            if self.stage.is_first if first else self.stage.is_last:
                part = objective(out)  # the objective's Σ over its items
                self.loss_sums[k] += part.detach().float()
                total = part * scale if total is None else total + part * scale
        return total

    def backward(self, received: Tensors | None, output: Tensors | torch.Tensor, grad: Tensors | None):
        # What DeepSpeed's backward prologue would do, had its forward hook found our (dataclass) output:
        # tell ZeRO whether this micro-batch ends the step, or its gradient hooks reduce on a stale flag.
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "set_gradient_accumulation_boundary"):
            optimizer.set_gradient_accumulation_boundary(self.engine.is_gradient_accumulation_boundary())
        if self.stage.is_last:
            self.engine.backward(output)
        else:
            # d/d output of sum(output * grad) is grad: the received gradient, already divided by the
            # accumulation steps and loss-scaled on the last stage, so neither is applied again.
            surrogate = sum((o * g).sum() for o, g in zip(output, grad, strict=True)) * self.unscale
            own = self.own_losses.popleft()
            if own is not None:  # this stage's own objectives: divided by the accumulation steps here
                surrogate = surrogate + own / self.engine.gradient_accumulation_steps()
            self.engine.backward(surrogate, scale_wrt_gas=False)
        if received is None:
            return None
        # media tokens that no fusion layer of this stage or later read get a zero gradient
        return [r.grad if r.grad is not None else torch.zeros_like(r) for r in received]

    def receive_forward(self, batch: dict) -> Tensors | None:
        if self.stage.is_first:
            return None
        buffers = self.activations(batch)
        self.links.exchange(recv_prev=buffers)
        return [b.requires_grad_() for b in buffers]


def _detached(output: Tensors) -> Tensors:
    return [t.detach() for t in output]


def _grad_buffers(output: Tensors) -> Tensors:
    return [torch.empty_like(t) for t in output]


def _lm_token_sum(out) -> torch.Tensor:
    return out.loss * out.num_tokens


def train_step_1f1b(engine, stage: StageInfo, batches: Sequence[dict], scale: float | Sequence[float],
                    tied: TiedEmbeddingSync | None = None,
                    objectives: Sequence[Callable] = (_lm_token_sum,),
                    first_stage: Sequence[bool] | None = None) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step through the pipeline (1F1B),
    calling ``engine.step()`` after each backward (once its input gradient is sent), as the
    single-stage loop does.

    engine: this stage's ``DeepSpeedEngine`` (its module is the pruned model). batches: the step's
    micro-batches as the model's keyword arguments, the same on every stage of a pipeline
    (``input_ids``, ``labels``, ``position_ids``, ``document_ids``, ``loss_weights``; the multimodal
    model's media and spans). objectives: functions of the last stage's output giving each objective's
    loss *sum* over a micro-batch (default: the LM's token loss sum; the generators' objectives read
    ``objective_sums``); scale: the weight of each (one float per objective, or one float for the
    default; ``xoron_dist.train.step``). first_stage: per objective, True when the first stage computes
    it instead (an encoder's auxiliary loss in its ``StageOutput.objective_sums``, e.g. the vision
    tower's reconstruction): that stage adds it, divided by the accumulation steps, to the surrogate it
    back-propagates, since only its own parameters depend on it. Returns each objective's sum over the
    micro-batches, fp32 of shape (len(objectives),), on every stage (the stage that computes one sums it;
    the others receive it).
    tied: the tied-embedding gradient sum of this engine (default: made here); the step's last backward
    runs inside its ``last_backward`` block, which sums the two copies' gradients once the input gradient
    has been sent (``tied.py``).
    """
    tied = tied if tied is not None else TiedEmbeddingSync(engine, stage)
    links = _Links(stage)
    scales = [scale] if isinstance(scale, float | int) else list(scale)
    work = _StageWork(engine, stage, links, batches[0]["input_ids"].device, scales, objectives, first_stage)
    # warm-up: forwards only; steady state: one forward, one backward; cool-down: backwards only.
    micro = len(batches)
    warmup = min(stage.num_stages - stage.stage - 1, micro)
    inputs: deque = deque()
    outputs: deque = deque()
    for i in range(warmup):
        received = work.receive_forward(batches[i])
        output = work.forward(batches[i], received)
        links.exchange(send_next=None if stage.is_last else _detached(output))
        inputs.append(received)
        outputs.append(output)

    received = work.receive_forward(batches[warmup]) if warmup < micro else None
    for i in range(warmup, micro):
        output = work.forward(batches[i], received)
        inputs.append(received)
        outputs.append(output)
        grad = None
        if not stage.is_last:  # the gradient of the oldest output in flight (micro-batch i - warmup)
            grad = _grad_buffers(outputs[0])
            links.exchange(send_next=_detached(output), recv_next=grad)
        last = warmup == 0 and i == micro - 1  # no cool-down: this is the step's last backward
        with tied.last_backward() if last else contextlib.nullcontext():
            input_grad = work.backward(inputs.popleft(), outputs.popleft(), grad)
            if i == micro - 1 or stage.is_first:
                links.exchange(send_prev=input_grad)
                received = None
            else:
                received = work.activations(batches[i + 1])
                links.exchange(send_prev=input_grad, recv_prev=received)
                received = [r.requires_grad_() for r in received]
            if last:
                tied.sum_gradients()
        # Only once the input gradient has left: the last step() is the optimizer step, whose
        # gradient-norm all-reduce spans every stage and must not wait for a gradient still unsent.
        engine.step()

    for i in range(micro - warmup, micro):
        grad = _grad_buffers(outputs[0])
        links.exchange(recv_next=grad)
        last = i == micro - 1
        with tied.last_backward() if last else contextlib.nullcontext():
            links.exchange(send_prev=work.backward(inputs.popleft(), outputs.popleft(), grad))
            if last:
                tied.sum_gradients()
        engine.step()

    dist.all_reduce(work.loss_sums, group=links.group)  # each sum is non-zero on the stage computing it only
    return work.loss_sums


def _loss_scale(engine, device: torch.device) -> float:
    """The factor ``engine.backward`` multiplies a loss by (fp16 loss scaling; 1 for fp32/bf16)."""
    scale_if_loss = getattr(engine.optimizer, "scale_if_loss", None)  # ZeRO optimizers (pp > 1 needs ZeRO-1)
    if scale_if_loss is None:
        return 1.0
    probe = torch.ones((), device=device, requires_grad=True) * 1.0  # a loss-like scalar (has grad_fn)
    scaled = scale_if_loss(probe)
    return float(scaled.detach()) if torch.is_tensor(scaled) else 1.0


__all__ = ["train_step_1f1b"]
