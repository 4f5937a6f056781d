"""One optimizer step: its micro-batches forward and backward (in turn, or through the 1F1B pipeline),
each objective's loss weighted so that the gradient is that of the step's mean over every rank.

The loss of objective k is Σ (its per-item losses over the step) / N_k, where N_k counts its items
in every micro-batch of every data/sequence-parallel rank (one all-reduce before the first
backward). DeepSpeed averages the gradients it sums: over the accumulation steps and over a
divisor that depends on the ZeRO stage (``parallel/zero.py``); each micro-batch's loss sum is
scaled by ``w_k · divisor · accum / N_k`` to cancel both. The expert-bias update follows the
optimizer step (``expert_balance.py``), and so do the dead-code restarts (``codebooks.py``); the
generators' noise clocks (``model.common.noise``) advance here, at the end of each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from xoron_dist.config import XoronConfig
from xoron_dist.model.common.noise import advance_clocks
from xoron_dist.parallel.pipeline.schedule import train_step_1f1b
from xoron_dist.parallel.pipeline.tied import TiedEmbeddingSync
from xoron_dist.parallel.sequence import shard_rows
from xoron_dist.parallel.zero import gradient_divisor
from xoron_dist.train.build import BuiltStage
from xoron_dist.train.objectives import TokenGroups, active_objectives
from xoron_dist.utils.host_syncs import upload

_TOKEN_TENSORS = ("input_ids", "labels", "position_ids", "document_ids", "loss_weights")


@dataclass
class StepResult:
    losses: dict[str, float]  # objective -> its mean over the step (all ranks)
    counts: dict[str, int]  # objective -> items it averaged over (all ranks)


@dataclass
class StepSums:
    """One step's loss sums and item counts per objective, summed over every rank, still on the device: the
    trainer reads them with the step's other values in one read (``train/readout.py``)."""

    names: list[str]
    sums: torch.Tensor  # (objectives,) float32
    counts: torch.Tensor  # (objectives,) float32

    def means(self) -> dict[str, torch.Tensor]:
        """Each objective's mean over the step, a 0-dim device tensor (0 without items)."""
        return dict(zip(self.names, self.sums.float() / self.counts.clamp(min=1.0), strict=True))

    def result(self, sums: list[float], counts: list[float]) -> StepResult:
        """The step's result from the sums and counts as read on the host."""
        means = [s / max(c, 1.0) for s, c in zip(sums, counts, strict=True)]
        return StepResult(dict(zip(self.names, means, strict=True)),
                          {n: int(c) for n, c in zip(self.names, counts, strict=True)})

    def read(self) -> StepResult:
        """``result`` read on its own (one read)."""
        sums, counts = torch.stack([self.sums.float(), self.counts]).tolist()
        return self.result(sums, counts)


class StepRunner:
    """Runs steps of one curriculum stage (``built``) on this rank (``ctx``: the ParallelContext)."""

    def __init__(self, cfg: XoronConfig, ctx, built: BuiltStage, token_groups: TokenGroups) -> None:
        self.cfg, self.ctx, self.built = cfg, ctx, built
        self.objectives = active_objectives(cfg)
        self.token_groups = token_groups
        # tied word embeddings under PP: the first and last stages' copies sum their gradients each step
        self.tied = TiedEmbeddingSync(built.engine, built.pipeline) if built.pipeline is not None else None

    def model_inputs(self, batch) -> dict:
        """The model's keyword arguments for one micro-batch: token tensors (this rank's rows under
        sequence parallelism), per-token loss weights, and the media the model encodes."""
        inputs = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids,
                  "document_ids": batch.document_ids,
                  "loss_weights": self.token_groups.weights(batch.labels, batch.document_ids)}
        media = getattr(self.built.model, "media_inputs", None)
        if self.ctx.sp_size > 1 and media is None:
            inputs = shard_rows(inputs, self.ctx.sp_rank, self.ctx.sp_size)
        if media is not None:  # whole rows: the model cuts them once the media sit in them (parallel/media_exchange)
            inputs.update(media(batch))
        return inputs

    def _count_group(self):
        """Where the objectives' item counts are summed: the ranks holding distinct items. An SP rank of
        the multimodal model holds the whole rows (as its SP peers do), so its counts are summed over
        the data-parallel ranks only."""
        whole_rows = self.ctx.sp_size > 1 and hasattr(self.built.model, "media_inputs")
        return self.ctx.dp_group if whole_rows else self.ctx.token_group

    def run(self, batches: list) -> StepSums:
        ctx, engine = self.ctx, self.built.engine
        inputs = [self.model_inputs(batch) for batch in batches]
        # counts and scales stay on the device: the step reads the host once, at its end
        counts = torch.stack([_summed([obj.count(i) for i in inputs], ctx.device) for obj, _ in self.objectives])
        dist.all_reduce(counts, group=self._count_group())
        accum = self.cfg.train.grad_accum_steps
        weights = upload([weight for _, weight in self.objectives], device=ctx.device)
        scales = weights * (gradient_divisor(ctx.layout) * accum) / counts.clamp(min=1.0)
        if self.built.pipeline is not None:  # every micro-batch through the pipeline's stages (1F1B)
            sums = train_step_1f1b(engine, self.built.pipeline, inputs, scales, self.tied,
                                   [obj.loss_sum for obj, _ in self.objectives],
                                   [obj.first_stage for obj, _ in self.objectives])
        else:
            sums = torch.zeros(len(self.objectives), device=ctx.device)
            for micro in inputs:
                out = engine(**micro)
                parts = [obj.loss_sum(out) for obj, _ in self.objectives]
                total = parts[0] * scales[0]
                for part, scale in zip(parts[1:], scales[1:], strict=True):
                    total = total + part * scale
                engine.backward(total)
                engine.step()
                sums += torch.stack([part.detach().float() for part in parts])
        advance_clocks(self.built.model)
        dist.all_reduce(sums, group=ctx.token_group)
        return StepSums([obj.name for obj, _ in self.objectives], sums, counts)


def _summed(counts: list, device: torch.device) -> torch.Tensor:
    """Σ of one objective's per-micro-batch counts (ints and device tensors) as a float32 0-dim device tensor,
    read nowhere on the host."""
    on_host = float(sum(c for c in counts if not isinstance(c, torch.Tensor)))
    on_device = [c.float() for c in counts if isinstance(c, torch.Tensor)]
    total = torch.stack(on_device).sum() if on_device else torch.zeros((), device=device)
    return total.to(device) + on_host


__all__ = ["StepResult", "StepRunner", "StepSums"]
