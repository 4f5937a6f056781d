"""Where a stage's micro-batches come from.

A batch source yields, per micro-step, an object with ``input_ids``, ``labels`` (next-token
targets, -100 = no loss), ``position_ids`` and ``document_ids`` (None = one document per row),
``num_label_tokens`` and ``to(device)`` (and, from the Arrow loader, the media of the modality
table); and it saves/restores its position as a small dict that travels in the checkpoint, so a
resumed run sees exactly the batches an uninterrupted one would.

* ``data.source: synthetic_text`` — ``SyntheticTextSource`` over the built-in generator
  (a pure function of the step: its state is the step).
* ``data.source: arrow`` — ``xoron_dist.data.loader.ArrowDataLoader`` over prepared shards
  (``data_cache.ensure_prepared`` fills them first for the synthetic corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xoron_dist.config import XoronConfig
from xoron_dist.data.synthetic_text import SyntheticTextDataset
from xoron_dist.model.llm.head import IGNORE_INDEX
from xoron_dist.train.stages import StagePlan


@dataclass
class TextBatch:
    """Rows of one document each (the synthetic text source): no packing metadata needed."""

    input_ids: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq)
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device, non_blocking: bool = False) -> TextBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TextBatch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.document_ids))


def to_device(batch, device: torch.device):
    """A micro-batch on the training device. On CUDA the copy is asynchronous: Arrow batches come
    page-locked from the loader (``DataLoader(pin_memory=True)`` calls ``BatchBlock.pin_memory``), and
    torch's pinned-memory allocator keeps a block until the copies reading it have run, so the host
    need not wait for the transfer. Elsewhere a plain copy (``non_blocking`` means nothing there)."""
    return batch.to(device, non_blocking=device.type == "cuda")


class SyntheticTextSource:
    """Micro-batches of the synthetic text set; position = (global step, micro-step)."""

    def __init__(self, cfg: XoronConfig, tokenizer, plan: StagePlan, dp_rank: int, dp_size: int) -> None:
        self.dataset = SyntheticTextDataset(tokenizer, cfg.data.num_documents, cfg.data.seed, plan.seq_len)
        self.mbs, self.accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step, self.micro = plan.first_step, 0

    def next_batch(self) -> TextBatch:
        rows = self.dataset.batch(self.step, self.micro, self.dp_rank, self.dp_size, self.mbs,
                                  grad_accum_steps=self.accum)
        self.micro += 1
        if self.micro == self.accum:
            self.step, self.micro = self.step + 1, 0
        return TextBatch(rows[:, :-1], rows[:, 1:])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])

    def describe(self) -> str:
        return f"synthetic text: {len(self.dataset)} samples of {self.dataset.seq_len} tokens"


def build_source(cfg: XoronConfig, tokenizer, plan: StagePlan, dp_rank: int, dp_size: int, *,
                 pin_memory: bool = False):
    if cfg.data.source == "synthetic_text":
        return SyntheticTextSource(cfg, tokenizer, plan, dp_rank, dp_size)
    from xoron_dist.data.loader import ArrowDataLoader

    staged = bool(cfg.stages)
    where = f"stages[{plan.index}]"
    return ArrowDataLoader(
        cfg.data.path, cfg.data, tokenizer, seq_len=plan.seq_len, micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.data.seed + plan.index, kinds=plan.kinds or None,
        mix=plan.mix or None, pin_memory=pin_memory, total_batches=plan.steps * cfg.train.grad_accum_steps,
        kinds_field=f"{where}.kinds",
        mix_field=f"{where}.mix" if staged and cfg.stages[plan.index].mix else "data.mix",
        seq_len_field=f"{where}.seq_len" if staged and cfg.stages[plan.index].seq_len else "train.seq_len",
    )


__all__ = ["SyntheticTextSource", "TextBatch", "build_source"]
