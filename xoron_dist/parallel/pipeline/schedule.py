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
cost. Costs are parameter counts (``split.parameter_costs``) or measured forward + backward seconds
(``split.measured_costs``); the embedding counts towards stage 0, the final norm, LM head and loss
towards the last stage. Multimodal hook: the encoders and projector belong to stage 0 and the
generator heads to the last stage; their cost goes into ``StageCosts.first``/``last`` so the
layers are balanced around them. The fusion layers, which read the media tokens before chosen
decoder layers, would also need those tokens on later stages; until that is built the layout
validator refuses pp > 1 with the encoders.

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
from collections.abc import Sequence

import torch
import torch.distributed as dist

from xoron_dist.parallel.pipeline.split import StageInfo
from xoron_dist.parallel.pipeline.tied import TiedEmbeddingSync

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import parallel_state


class _Links:
    """Point-to-point exchanges with the neighbouring stages over Megatron's pipeline group."""

    def __init__(self, stage: StageInfo) -> None:
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


class _StageWork:
    """One stage's forward, backward and receive of one micro-batch, and the loss it sums (last stage)."""

    def __init__(self, engine, stage: StageInfo, links: _Links, device: torch.device, scale: float) -> None:
        self.engine, self.stage, self.links, self.device, self.scale = engine, stage, links, device, scale
        self.dtype = next(p for p in engine.module.parameters()).dtype
        self.loss_sum = torch.zeros((), device=device)
        self.unscale = 1.0 / _loss_scale(engine, device)

    def activation(self, batch: dict) -> torch.Tensor:
        """An empty (batch, seq, hidden) buffer: what crosses a stage boundary."""
        return torch.empty(*batch["input_ids"].shape, self.stage.hidden_size, dtype=self.dtype, device=self.device)

    def forward(self, batch: dict, received: torch.Tensor | None) -> torch.Tensor:
        stage = self.stage
        inputs = dict(batch, labels=batch["labels"] if stage.is_last else None)
        if not stage.is_first:
            inputs.update(input_ids=None, inputs_embeds=received)
        out = self.engine(**inputs)
        if not stage.is_last:
            return out.hidden
        micro_sum = out.loss * out.num_tokens
        self.loss_sum += micro_sum.detach().float()
        return micro_sum * self.scale

    def backward(self, received: torch.Tensor | None, output: torch.Tensor, grad: torch.Tensor | None):
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
            self.engine.backward((output * grad).sum() * self.unscale, scale_wrt_gas=False)
        return None if received is None else received.grad

    def receive_forward(self, batch: dict) -> torch.Tensor | None:
        if self.stage.is_first:
            return None
        buffer = self.activation(batch)
        self.links.exchange(recv_prev=buffer)
        return buffer.requires_grad_()


def train_step_1f1b(engine, stage: StageInfo, batches: Sequence[dict], scale: float,
                    tied: TiedEmbeddingSync | None = None) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step through the pipeline (1F1B),
    calling ``engine.step()`` after each backward (once its input gradient is sent), as the
    single-stage loop does.

    engine: this stage's ``DeepSpeedEngine`` (its module is the pruned model). batches: the step's
    micro-batches as the model's keyword arguments, the same on every stage of a pipeline
    (``input_ids``, ``labels``, ``position_ids``, ``document_ids``, ``loss_weights``). scale: the
    weight of each micro-batch's loss *sum* (``xoron_dist.train.step``). Returns the summed token
    loss of the micro-batches, an fp32 scalar, on every stage (the last stage computes it; the
    others receive it). tied: the tied-embedding gradient sum of this engine (default: made here); the
    step's last backward runs inside its ``last_backward`` block, which sums the two copies' gradients
    once the input gradient has been sent (``tied.py``).
    """
    tied = tied if tied is not None else TiedEmbeddingSync(engine, stage)
    links = _Links(stage)
    work = _StageWork(engine, stage, links, batches[0]["input_ids"].device, scale)
    # warm-up: forwards only; steady state: one forward, one backward; cool-down: backwards only.
    micro = len(batches)
    warmup = min(stage.num_stages - stage.stage - 1, micro)
    inputs: deque = deque()
    outputs: deque = deque()
    for i in range(warmup):
        received = work.receive_forward(batches[i])
        output = work.forward(batches[i], received)
        links.exchange(send_next=None if stage.is_last else output.detach())
        inputs.append(received)
        outputs.append(output)

    received = work.receive_forward(batches[warmup]) if warmup < micro else None
    for i in range(warmup, micro):
        output = work.forward(batches[i], received)
        grad = None
        if not stage.is_last:
            grad = work.activation(batches[i - warmup])
            links.exchange(send_next=output.detach(), recv_next=grad)
        inputs.append(received)
        outputs.append(output)
        last = warmup == 0 and i == micro - 1  # no cool-down: this is the step's last backward
        with tied.last_backward() if last else contextlib.nullcontext():
            input_grad = work.backward(inputs.popleft(), outputs.popleft(), grad)
            if i == micro - 1 or stage.is_first:
                links.exchange(send_prev=input_grad)
                received = None
            else:
                received = work.activation(batches[i + 1])
                links.exchange(send_prev=input_grad, recv_prev=received)
                received.requires_grad_()
            if last:
                tied.sum_gradients()
        # Only once the input gradient has left: the last step() is the optimizer step, whose
        # gradient-norm all-reduce spans every stage and must not wait for a gradient still unsent.
        engine.step()

    for i in range(micro - warmup, micro):
        grad = work.activation(batches[i])
        links.exchange(recv_next=grad)
        last = i == micro - 1
        with tied.last_backward() if last else contextlib.nullcontext():
            links.exchange(send_prev=work.backward(inputs.popleft(), outputs.popleft(), grad))
            if last:
                tied.sum_gradients()
        engine.step()

    dist.all_reduce(work.loss_sum, group=links.group)  # only the last stage holds a non-zero sum
    return work.loss_sum


def _loss_scale(engine, device: torch.device) -> float:
    """The factor ``engine.backward`` multiplies a loss by (fp16 loss scaling; 1 for fp32/bf16)."""
    scale_if_loss = getattr(engine.optimizer, "scale_if_loss", None)  # ZeRO optimizers (pp > 1 needs ZeRO-1)
    if scale_if_loss is None:
        return 1.0
    probe = torch.ones((), device=device, requires_grad=True) * 1.0  # a loss-like scalar (has grad_fn)
    scaled = scale_if_loss(probe)
    return float(scaled.detach()) if torch.is_tensor(scaled) else 1.0


__all__ = ["train_step_1f1b"]
