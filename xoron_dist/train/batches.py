"""Where a stage's micro-batches come from, and the prepared-data cache of the smoke run.

A batch source yields, per micro-step, an object with ``input_ids``, ``labels`` (next-token
targets, -100 = no loss), ``position_ids`` and ``document_ids`` (None = one document per row),
``num_label_tokens`` and ``to(device)``; and it saves/restores its position as a small dict
that travels in the checkpoint, so a resumed run sees exactly the batches an uninterrupted
one would.

* ``data.source: synthetic_text`` — ``SyntheticTextSource`` over the built-in generator
  (a pure function of the step: its state is the step).
* ``data.source: arrow`` — ``xoron_dist.data.loader.ArrowDataLoader`` over prepared shards.
  With ``data.synth`` set, ``ensure_prepared`` first fills ``data.path`` by ``xoron synth``
  + ``xoron prep`` (rank 0; reused while the synth settings, preprocessing and tokenizer are
  unchanged).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from xoron_dist.config import XoronConfig
from xoron_dist.data.synthetic_text import SyntheticTextDataset
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.train.stages import StagePlan

logger = logging.getLogger(__name__)


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

    def to(self, device: torch.device) -> TextBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TextBatch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.document_ids))


def shard_sequence(batch, rank: int, size: int) -> TextBatch:
    """This sequence-parallel rank's zig-zag rows of a batch (token tensors only).

    Every SP rank of a replica reads the same batch and keeps rows ``zigzag_positions``; position
    ids are kept from the full rows (RoPE needs the global positions). Media are not carried:
    the LLM consumes only token tensors until the encoders land (issue #7).
    """
    from xoron_dist.parallel.ring_attention import zigzag_split

    positions = batch.position_ids
    if positions is None:
        positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device).expand_as(batch.input_ids)
    split = lambda t: None if t is None else zigzag_split(t, 1, rank, size)  # noqa: E731
    return TextBatch(split(batch.input_ids), split(batch.labels), split(positions), split(batch.document_ids))


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
        mix=plan.mix or None, pin_memory=pin_memory,
        kinds_field=f"{where}.kinds",
        mix_field=f"{where}.mix" if staged and cfg.stages[plan.index].mix else "data.mix",
        seq_len_field=f"{where}.seq_len" if staged and cfg.stages[plan.index].seq_len else "train.seq_len",
    )


# --------------------------------------------------------------------------- prepared-data cache

SYNTH_RECORD = "synth_settings.json"


def _cache_key(cfg: XoronConfig, tokenizer_sha: str) -> dict[str, Any]:
    return {"synth": asdict(cfg.data.synth), "prep": asdict(cfg.data.prep), "tokenizer_sha256": tokenizer_sha}


def ensure_prepared(cfg: XoronConfig, tokenizer_dir: Path) -> Path:
    """Make sure ``data.path`` holds prepared shards; build them from ``data.synth`` when it does not.

    Rank 0 only (callers barrier after). Reuses an existing folder whose recorded synth settings,
    preprocessing and tokenizer match; otherwise regenerates it (the raw corpus beside it, in
    ``<path>-raw/``).
    """
    from xoron_dist.data.schema import MANIFEST_FILE, sha256_file

    out = Path(cfg.data.path)
    if cfg.data.synth is None:
        if not (out / MANIFEST_FILE).is_file():
            raise FileNotFoundError(
                f"data.path={out} has no {MANIFEST_FILE}: prepare it with `xoron prep --config RUN.yaml --out {out} "
                "INPUT...`, or set data.synth to generate the synthetic corpus there"
            )
        return out
    key = _cache_key(cfg, sha256_file(tokenizer_dir / "tokenizer.json"))
    record = out / SYNTH_RECORD
    if (out / MANIFEST_FILE).is_file() and record.is_file() and json.loads(record.read_text()) == key:
        logger.info("using cached prepared data in %s", out)
        return out
    from data_prep import prepare
    from xoron_dist.synth import synthesize

    if out.exists():
        logger.info("prepared data in %s is stale (settings or tokenizer changed); rebuilding", out)
        shutil.rmtree(out)
    raw = out.with_name(out.name + "-raw")
    logger.info("generating the synthetic corpus in %s and preparing shards in %s", raw, out)
    inputs = synthesize(cfg.data.synth, raw, progress=False)
    manifest = prepare(inputs, out, cfg, workers=1, progress=False)
    record.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    logger.info("prepared %s", ", ".join(f"{name}: {d.rows} rows" for name, d in manifest.datasets.items()))
    return out
