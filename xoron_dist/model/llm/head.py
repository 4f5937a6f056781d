"""The LM head: logits over the (padded) vocabulary and the token loss, optionally in chunks.

    hidden (batch, seq, hidden) ─► logits = hidden · Wᵀ (batch, seq, rows) ─► padding rows -inf
                                ─► cross-entropy vs labels (-100: no loss) ─► Σ wₜ·ceₜ / #labelled

``LMHead`` is the projection (a module, so ZeRO-3 gathers its weight around each call); ``lm_loss``
computes the loss through it. ``rows`` is the embedding's row count: the usable vocabulary
(tokenizer + special slots) rounded up to ``pad_vocab_multiple``. Padding rows are masked to -inf,
so they are never predicted and the loss does not depend on how many there are (tensor parallelism
pads further; its subclass in ``xoron_dist.parallel.tensor`` holds a slice of the rows and computes
the vocab-parallel loss through the same ``project``/``token_losses``/``gather`` calls).

``chunk_tokens`` > 0: the head and the loss run on chunks of that many tokens, each recomputed in
backward, so training never holds the whole (tokens, vocabulary) logits (at 32K tokens and the
full 152K vocabulary that is ~20 GB of fp32 per row). Same loss and gradients; ``logits`` is None.

``loss_weights`` (batch, seq), optional: per-token weights of the loss terms (the token groups of
``train.token_groups``); the mean stays over the labelled tokens, as the seed's trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xoron_dist.config import LLMConfig

IGNORE_INDEX = -100  # the label of positions without loss (prompts, media placeholders, padding)


@dataclass
class LLMOutput:
    logits: torch.Tensor | None  # (batch, seq, padded_vocab); None when the loss ran in chunks
    loss: torch.Tensor | None = None  # mean token cross-entropy over labels != IGNORE_INDEX
    # labelled tokens the loss averages over: a 0-dim int64 tensor on the loss's device (int() reads it: a sync)
    num_tokens: torch.Tensor | int = 0
    hidden: torch.Tensor | None = None  # (batch, seq, hidden) when the model has no head (a pipeline stage)
    normed: torch.Tensor | None = None  # (batch, seq, hidden) final-normed states, when asked (generators read them)
    objective_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # generator objective -> Σ item losses


class LMHead(nn.Module):
    """``weight`` (rows, hidden), tied to the token embedding when ``tie_word_embeddings``."""

    vocab_offset = 0  # global id of this module's first row (a tensor-parallel slice starts later)

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.usable = cfg.usable_vocab_size
        self.weight = nn.Parameter(torch.empty(cfg.vocab_rows(1), cfg.hidden_size))
        self.chunk_tokens = 0

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (fp32) of logits (..., rows here) against ids (...); -100 gives garbage
        that the caller masks."""
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over every row from this module's (..., rows here) slice (the same tensor on one rank)."""
        return logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, hidden) -> logits (…, rows here), padding rows -inf."""
        logits = self.project(hidden)
        rows = logits.shape[-1]
        if self.vocab_offset + rows <= self.usable:
            return logits
        ids = torch.arange(rows, device=logits.device) + self.vocab_offset
        return logits.masked_fill(ids >= self.usable, float("-inf"))


def lm_loss(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor | None = None,
            loss_weights: torch.Tensor | None = None) -> LLMOutput:
    """Logits and (with ``labels``) the mean token loss of ``hidden`` (batch, seq, hidden) after the final
    norm; labels (batch, seq) already shifted. The head is called as a module for every piece (ZeRO-3
    gathers a module's weights around its own calls, recomputed chunks included)."""
    if labels is None or not head.chunk_tokens or not (head.training and torch.is_grad_enabled()):
        logits = head(hidden)
        if labels is None:
            return LLMOutput(logits=logits)
        labelled = labels != IGNORE_INDEX
        num_tokens = labelled.sum()  # stays on the device: no host read between forward and backward
        weights = labelled if loss_weights is None else loss_weights * labelled
        loss = (head.token_losses(logits, labels) * weights).sum() / num_tokens.clamp(min=1)
        return LLMOutput(logits=logits, loss=loss, num_tokens=num_tokens)
    hidden, targets = hidden.flatten(0, 1), labels.flatten()
    weights = None if loss_weights is None else loss_weights.flatten()
    num_tokens = (targets != IGNORE_INDEX).sum()
    chunk = head.chunk_tokens
    total = sum(checkpoint(_chunk_loss_sum, head, hidden[i: i + chunk], targets[i: i + chunk],
                           None if weights is None else weights[i: i + chunk], use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk))
    return LLMOutput(logits=None, loss=total / num_tokens.clamp(min=1), num_tokens=num_tokens)


def _chunk_loss_sum(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor,
                    weights: torch.Tensor | None) -> torch.Tensor:
    """Summed (weighted) token loss of hidden (n, hidden) against targets (n,) (-100: no loss)."""
    labelled = targets != IGNORE_INDEX
    return (head.token_losses(head(hidden), targets) * (labelled if weights is None else weights * labelled)).sum()
