"""The LM head: logits over the (padded) vocabulary and the token loss, optionally in chunks.

    hidden (batch, seq, hidden) ─► logits = hidden · Wᵀ (batch, seq, rows) ─► padding rows -inf
                                ─► cross-entropy vs labels (-100: no loss) ─► Σ wₜ·ceₜ / #labelled

``LMHead`` is the projection (a module, so ZeRO-3 gathers its weight around each call); ``lm_loss``
computes the loss through it. ``rows`` is the embedding's row count: the usable vocabulary
(tokenizer + special slots) rounded up to ``pad_vocab_multiple``. Padding rows are masked to -inf,
so they are never predicted and the loss does not depend on how many there are (tensor parallelism
pads further; its subclass in ``xoron_dist.parallel.tensor`` holds a slice of the rows and computes
the vocab-parallel loss through the same ``project``/``token_losses``/``gather`` calls).

``chunk_tokens`` > 0: the head and the loss run on chunks of that many tokens, so training never holds
the whole (tokens, vocabulary) logits (at 32K tokens and the full 152K vocabulary that is ~20 GB of
fp32 per row). Same loss and gradients; ``logits`` is None. The chunks run through
``LinearCrossEntropy``: each chunk's gradients are made in the forward, straight from its softmax
(softmax - one-hot), and only the gradients wait for the backward: three GEMMs and one vocabulary-wide
buffer per chunk, against the four GEMMs a recomputed chunk costs and the log-softmax, NLL and their
gradients of autograd's path (``bench/lm_head_loss.py``: faster and less memory than either the one-piece
head or recomputed chunks). The vocab-parallel head (``parallel.tensor``) runs the same function on its
rows, handing it the reduction of the rows' statistics over the ranks (``vocab_reduce``).

``loss_weights`` (batch, seq), optional: per-token weights of the loss terms (the token groups of
``train.token_groups``); the mean stays over the labelled tokens, as the seed's trainer does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
    # the chunked loss's reduction of per-token statistics over the ranks holding the other rows of the
    # vocabulary, reduce(tensor, "max" | "sum") in place: none on one rank (a vocab-parallel head's method)
    vocab_reduce = None

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

    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states as the chunked loss takes them (a vocab-parallel head sums their gradient)."""
        return hidden

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over every row from this module's (..., rows here) slice (the same tensor on one rank)."""
        return logits

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """(…, hidden) -> logits (…, rows here), padding rows -inf.

        With ``targets`` (n,) for hidden (n, hidden): the summed token loss Σ wₜ·ceₜ through
        ``LinearCrossEntropy`` in chunks of ``chunk_tokens``, ``weights`` (n,) or None for 1 (-100 targets
        count 0 either way). A module call, so ZeRO-3 gathers the weight around it."""
        if targets is not None:
            return LinearCrossEntropy.apply(self.loss_input(hidden), self.weight, targets, weights, self.usable,
                                            self.vocab_offset, self.chunk_tokens or hidden.shape[0],
                                            self.vocab_reduce)
        logits = self.project(hidden)
        rows = logits.shape[-1]
        if self.vocab_offset + rows <= self.usable:
            return logits
        ids = torch.arange(rows, device=logits.device) + self.vocab_offset
        return logits.masked_fill(ids >= self.usable, float("-inf"))


def lm_loss(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor | None = None,
            loss_weights: torch.Tensor | None = None) -> LLMOutput:
    """Logits and (with ``labels``) the mean token loss of ``hidden`` (batch, seq, hidden) after the final
    norm; labels (batch, seq) already shifted. The head is called as a module, in one piece or with the
    targets for its chunked loss (ZeRO-3 gathers a module's weights around its own calls)."""
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
    total = head(hidden, targets, weights)
    return LLMOutput(logits=None, loss=total / num_tokens.clamp(min=1), num_tokens=num_tokens)


@functools.cache
def accumulates_in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds the product of ``dtype``
    operands into an fp32 ``acc`` in place on ``device``.

    That is CUDA's mixed-dtype GEMM (bf16/fp16 in, fp32 out); torch's CPU build has no kernel for it,
    and torch versions differ in whether an fp32 ``acc`` may be the addend. So it is tried once per
    device and dtype on a small case against the fp32 sum (one host read, at the first chunked loss),
    and anything else (an error, or a result that is not the sum) keeps the portable path."""
    if dtype == torch.float32:
        return False
    gen = torch.Generator().manual_seed(0)
    acc = torch.randn(16, 32, generator=gen).to(device)
    a = torch.randn(16, 48, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(48, 32, generator=gen).to(device=device, dtype=dtype)
    want = acc + a.float() @ b.float()
    try:
        got = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return got is acc and bool(torch.allclose(acc, want, rtol=1e-5, atol=1e-5))


def add_weight_grad(acc: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """``acc`` (fp32) += gradᵀ · x: in place where the device's GEMM accumulates into fp32
    (``accumulates_in_place``), else the product in the operands' dtype, then added in fp32 (a
    (rows, hidden) temporary in each dtype)."""
    if grad.dtype == acc.dtype:
        acc.addmm_(grad.t(), x)
    elif accumulates_in_place(acc.device, grad.dtype):
        torch.addmm(acc, grad.t(), x, out_dtype=acc.dtype, out=acc)
    else:
        acc += (grad.t() @ x).float()


class LinearCrossEntropy(torch.autograd.Function):
    """Σₜ wₜ·CE(hidden[t] · Wᵀ, targets[t]), ``chunk`` tokens at a time, W's rows being vocabulary ids
    ``offset`` on (all of them on one rank; a slice under tensor parallelism).

    The gradient of a token's cross-entropy with respect to its logits is softmax - one-hot, known as
    soon as the forward has the softmax. So each chunk's forward ends with its gradients: the logits
    buffer becomes the softmax in place, the target entries lose 1, the rows are scaled by wₜ, and two
    GEMMs give ∂/∂hidden (chunk, hidden) and add to ∂/∂W (rows, hidden, accumulated in fp32:
    ``add_weight_grad``). The
    backward only scales them by the incoming gradient. What waits between forward and backward: the
    two gradients, no logits.

    Rows at ids ``usable`` and past (vocabulary padding) get logit -inf: softmax 0, gradient 0. Logits
    and softmax are fp32 whatever the weight's dtype (as ``LMHead.token_losses``); the GEMMs run in the
    weight's dtype. A -100 target counts 0 (its weight is zeroed; its id is clamped only to index).

    ``reduce`` (a vocab-parallel head's ``vocab_reduce``): the log-sum-exp needs every row of the
    vocabulary, so each chunk all-reduces its tokens' max logit, then their sums of exponentials with
    the target logits (each target's row lives on one rank, the others add 0). ∂/∂hidden is then this
    rank's part; the head hands in its hidden states through a copy whose backward sums the parts."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None, usable: int, offset: int, chunk: int,
                reduce: Callable[[torch.Tensor, str], None] | None) -> torch.Tensor:
        need_hidden, need_weight, _, need_weights = ctx.needs_input_grad[:4]
        if need_weights:
            raise ValueError("LinearCrossEntropy: the loss weights are constants here (token groups' weights); "
                             "detach them, or set train.loss_chunk_tokens=0 for autograd's head to differentiate them")
        rows = weight.shape[0]
        padding = min(max(usable - offset, 0), rows)  # this slice's first padding row
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk):
            piece = slice(start, start + chunk)
            x, ids = hidden[piece], targets[piece]
            scale = (ids != IGNORE_INDEX).float()
            if weights is not None:
                scale = scale * weights[piece].float()
            local = ids - offset
            here = ((local >= 0) & (local < rows)).float()  # the target's row is in this slice
            local = local.clamp(0, rows - 1).unsqueeze(1)
            logits = F.linear(x, weight).float()  # a fresh fp32 tensor (bf16 GEMMs: the upcast's copy)
            logits[:, padding:] = float("-inf")
            picked = logits.gather(1, local).squeeze(1) * here
            top = logits.amax(dim=1)
            if reduce is not None:
                reduce(top, "max")  # finite: some rank holds a real row
            exps = logits.sub_(top.unsqueeze(1)).exp_()  # in place: the logits are not needed again
            sums = torch.stack([exps.sum(dim=1), picked])  # Σ exp(logit - top), the target's logit
            if reduce is not None:
                reduce(sums, "sum")
            total += ((top + sums[0].log() - sums[1]) * scale).sum()
            if not (need_hidden or need_weight):
                continue
            grad = exps.div_(sums[0].unsqueeze(1))  # softmax, in place
            grad.scatter_add_(1, local, -here.unsqueeze(1))
            grad = grad.mul_(scale.unsqueeze(1)).to(weight.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[piece])
            if need_weight:
                add_weight_grad(grad_weight, grad, x)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_total.to(grad_weight.dtype),
                None, None, None, None, None, None)
