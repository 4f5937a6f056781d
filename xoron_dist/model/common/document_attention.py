"""Causal attention within packed documents, without an (s x s) mask: one fused call per document length.

A packed row holds several documents; a token attends the tokens up to itself *in its own
document* (the semantics of ``attention_mask`` in ``xoron_dist.model.llm.attention``: same id,
causal by order in the row). Written as a (batch, 1, s, s) mask that costs s² bytes per layer call
(4 GB at 32K x 4) and forces SDPA off its flash path onto an s² bias.

Here the documents are what they are, independent causal attentions (the varlen idea of
FlashAttention-2's ``cu_seqlens``, built from plain fused calls): ``DocumentLayout`` sorts the
tokens by (row, document id), stably, so each document's tokens are consecutive and in order; it
groups the documents by length, and each group is one causal fused call over a batch of
(documents, heads, length, dim) — no mask at all, so CUDA gets its flash kernel. Work is
Σ length² instead of s², memory O(s): what autograd keeps is the gathered q, k, v, the output and
its log-sum-exp (as for an unpacked row) plus two int64 indices per token.

Measured on CPU (bench/doc_attention.py, its README row): against SDPA with the dense mask, and
against FlexAttention with a document block mask (which on CPU in eager mode materialises the
(s x s) scores: it is the reference implementation there).

The layout needs the document lengths on the host. A batch moved to the device keeps a host copy of
its document ids (``PackedBatch.to``), from which they come without a sync; other ids (cut for sequence
parallelism, made on the device) are read once (a ``.tolist()``, a device sync on GPUs). The model
computes the layout once per forward (``DocumentLayoutCache``), not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xoron_dist.model.common.attention_kernels import fused_attention
from xoron_dist.utils.host_syncs import TensorMemo, on_host, upload


@dataclass(frozen=True)
class DocumentLayout:
    """Where every document of a packed (batch, seq) block sits, grouped by length.

    groups: (length, index (documents, length) int64 into the flattened batch*seq tokens, in order);
    inverse (batch*seq,) int64: where each token sits in the concatenation of the groups' outputs.
    """

    batch: int
    seq: int
    groups: tuple[tuple[int, torch.Tensor], ...]
    inverse: torch.Tensor

    @classmethod
    def from_ids(cls, document_ids: torch.Tensor) -> DocumentLayout:
        """document_ids (batch, seq) integers; equal ids in a row are one document (also when not adjacent)."""
        if document_ids.dim() != 2 or document_ids.is_floating_point() or document_ids.dtype == torch.bool:
            raise ValueError(f"document_ids must be (batch, seq) integers; got {document_ids.dtype} "
                             f"{tuple(document_ids.shape)}")
        batch, seq = document_ids.shape
        device = document_ids.device
        sorted_key, order = _sorted_keys(document_ids)
        # from the batch's host copy of the ids (``PackedBatch.to``), else the one host sync
        lengths = on_host(lambda ids: _lengths(sorted_key if ids is document_ids else _sorted_keys(ids)[0]),
                          document_ids, otherwise=lambda: _lengths(sorted_key))
        by_length: dict[int, list[int]] = {}
        start = 0
        for length in lengths:
            by_length.setdefault(length, []).append(start)
            start += length
        groups = []
        for length, starts in sorted(by_length.items()):
            offsets = upload(starts, device=device)[:, None] + torch.arange(length, device=device)
            groups.append((length, order[offsets]))
        concatenated = torch.cat([index.flatten() for _, index in groups])
        inverse = torch.empty_like(concatenated)
        inverse[concatenated] = torch.arange(concatenated.numel(), device=device)
        return cls(batch, seq, tuple(groups), inverse)


def _sorted_keys(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's (row, document) as one int, sorted stably (a document's tokens stay in order), and
    the order."""
    ids = document_ids.to(torch.int64)
    ids = ids - ids.amin()
    key = torch.arange(ids.shape[0], device=ids.device)[:, None] * (ids.amax() + 1) + ids
    return torch.sort(key.flatten(), stable=True)


def _lengths(sorted_key: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(sorted_key, return_counts=True)[1].tolist()


class DocumentLayoutCache:
    """One layout per batch: every layer of a forward (and its recomputation) gets the same ``document_ids``.

    Keyed on the tensor object and its version counter (``TensorMemo``).
    """

    def __init__(self) -> None:
        self._memo = TensorMemo()

    @torch.compiler.disable  # host-side planning (data-dependent shapes): a compiled block calls it eagerly
    def __call__(self, document_ids: torch.Tensor) -> DocumentLayout:
        return self._memo.get(document_ids, DocumentLayout.from_ids)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout, *, scale: float,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention within each document: q, k (b, s, h, d), v (b, s, h, dv) -> (b, s, h, dv).

    Equal to SDPA with ``attention_mask(order, order, ids, ids)``; differentiable in q, k, v.
    ``dropout_p`` > 0 uses ``F.scaled_dot_product_attention`` per group (the fused calls take no dropout).
    """
    b, s, h = q.shape[:3]
    if (b, s) != (layout.batch, layout.seq):
        raise ValueError(f"the document layout is for (batch, seq) = ({layout.batch}, {layout.seq}); the queries "
                         f"are {tuple(q.shape)}")
    flat = [t.reshape(b * s, h, t.shape[-1]) for t in (q, k, v)]
    outs = []
    for _, index in layout.groups:
        qg, kg, vg = (t[index].transpose(1, 2) for t in flat)  # (documents, h, length, dim)
        if dropout_p > 0:
            og = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout_p, is_causal=True, scale=scale)
        else:
            og = fused_attention(qg, kg, vg, scale=scale, causal=True)
        outs.append(og.transpose(1, 2).flatten(0, 1))  # (documents * length, h, dv)
    return torch.cat(outs)[layout.inverse].view(b, s, h, v.shape[-1])


__all__ = ["DocumentLayout", "DocumentLayoutCache", "document_attention"]
