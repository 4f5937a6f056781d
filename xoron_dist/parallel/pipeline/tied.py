"""Tied word embeddings across pipeline stages: two copies of one weight, kept equal by their gradients.

With ``model.llm.tie_word_embeddings`` the LM head multiplies by the token embedding's matrix. Under
pipeline parallelism the embedding lives on the first stage and the head on the last, so each of the
two holds its own copy (Megatron-core's ``shared_embedding``; DeepSpeed's ``TiedLayerSpec``):

    stage 0:     embed_tokens.weight  ─┐  same initial values (split.py prunes one tied parameter)
    stage pp-1:  lm_head.weight       ─┘  grads summed over Megatron's embedding group before the step

The single-rank gradient of the tied weight is the embedding's gradient plus the head's. Each copy
gets exactly that sum (one all-reduce of the two copies' accumulated local gradients over the
embedding group: the first and last stage of one (dp, tp, sp) position, so tensor-parallel vocabulary
slices pair by TP rank), and both then take the same optimizer step from the same optimizer state,
so they stay bit-equal without ever copying weights. The data-parallel reduction is linear, so
summing the local gradients before it equals summing the reduced ones after.

Where in DeepSpeed: ZeRO-1 reduces (and, with ``overlap_comm``, partitions) gradients inside the
boundary micro-batch's ``backward``, from per-parameter hooks, so after ``backward`` the local
gradient is gone. The step's last backward therefore runs inside ``engine.coalesce_grad_reduction()``,
which leaves the gradients on the parameters and reduces them all when the block exits; the sum over
the embedding group runs inside the block, after the stage has sent its input gradient upstream (the
first stage's last backward waits for the last stage's, so summing earlier would deadlock). This
relies on ZeRO knowing which backward ends the step: ``schedule._StageWork.backward`` sets its
boundary flag before every backward, since DeepSpeed's own prologue hook does not find our
(dataclass) outputs and the flag would otherwise stay at its default (True) on the first micro-batch.

The last stage's copy is marked ``ds_pipe_replicated`` (DeepSpeed's own mark for tied pipeline
weights), so DeepSpeed's gradient norm, summed over the stages, counts the tied gradient once, as the
single-rank norm does, and gradient clipping scales both copies alike.

Not built: DeepSpeed's ``BF16_Optimizer`` (bf16 weights with fp32 gradient accumulation at ZeRO-1)
moves every gradient into its fp32 buffer as it lands and has no coalesced reduction, so there is no
point at which the local sum can be formed; ``TiedEmbeddingSync`` refuses it with the fix.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.parallel.pipeline.split import StageInfo


class TiedEmbeddingError(RuntimeError):
    """The engine cannot keep the two copies of a tied embedding equal."""


def tied_copy(model: nn.Module, stage: StageInfo) -> nn.Parameter | None:
    """This stage's copy of the tied embedding matrix: the embedding's on the first stage, the LM head's
    on the last; None on middle stages, with untied weights, or when the copy is frozen."""
    model = model.llm if isinstance(getattr(model, "llm", None), nn.Module) else model  # the multimodal model's LLM
    if not getattr(model, "cfg", None) or not model.cfg.tie_word_embeddings or stage.num_stages == 1:
        return None
    if stage.is_first:
        param = model.embed_tokens.weight
    elif stage.is_last:
        param = model.lm_head.weight
    else:
        return None
    return param if param.requires_grad else None


class TiedEmbeddingSync:
    """Sums the tied copies' gradients over the embedding group at the end of each optimizer step.

    Use it around the step's last backward (``schedule.train_step_1f1b`` does):

        with sync.last_backward():
            engine.backward(...)      # gradients stay on the parameters
            send the input gradient
            sync.sum_gradients()      # the two copies now hold embedding + head gradient
        engine.step()                 # the block's exit reduced the gradients over data parallelism
    """

    def __init__(self, engine, stage: StageInfo) -> None:
        self.engine = engine
        self.param = tied_copy(engine.module, stage)
        if self.param is None:
            return
        optimizer = engine.optimizer
        if not hasattr(optimizer, "_coalesce_grad_reduction"):
            raise TiedEmbeddingError(
                f"model.llm.tie_word_embeddings with parallel.pp = {stage.num_stages} needs DeepSpeed's ZeRO "
                f"optimizer, but this run uses {type(optimizer).__name__} (bf16 weights with fp32 gradient "
                "accumulation), which reduces each gradient as it lands, before the two stages' copies can be "
                "summed; set train.grad_accum_dtype=bf16 (or train.precision=fp32), or "
                "model.llm.tie_word_embeddings=false")
        from xoron_dist.parallel.state import get_context

        self.group = get_context().embedding_group
        if stage.is_last:
            # DeepSpeed's grad norm skips the replicated copy: the tied gradient counts once over the stages.
            self.param.ds_pipe_replicated = True

    @property
    def active(self) -> bool:
        return self.param is not None

    def last_backward(self):
        """Context for the step's last backward: DeepSpeed's reduction waits until the block exits."""
        if not self.active:
            return contextlib.nullcontext()
        return self.engine.coalesce_grad_reduction()

    def sum_gradients(self) -> None:
        """All-reduce (sum) this copy's accumulated local gradient with the other stage's copy."""
        if not self.active:
            return
        grad = self.engine.optimizer.get_gradient_for_reduction(self.param)
        if grad is None:  # no micro-batch reached this copy: it still takes part in the sum
            grad = torch.zeros_like(self.param)
            self.param.grad = grad
        dist.all_reduce(grad, group=self.group)


__all__ = ["TiedEmbeddingError", "TiedEmbeddingSync", "tied_copy"]
