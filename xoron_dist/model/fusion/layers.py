"""Gated cross-attention fusion: text hidden states attend to the media tokens of their own document.

Flamingo's GATED XATTN-DENSE block (Alayrac et al. 2022, §2.2, eq. in Fig. 4)::

    x = x + tanh(α_attn) · CrossAttention(norm(x), media)
    x = x + tanh(α_ffn)  · FFN(norm(x))

with α initialised to 0, so at initialisation every fusion layer is the identity *exactly*
(x + 0·y = x) and the multimodal model computes what the text-only LLM computes; training opens
the gates. ``FusionConfig.layers[i]`` is the decoder layer that fusion layer i runs before
(``XoronLLM.forward``'s ``before_layer`` hook), so fusion sits before and within the backbone as
the seed's diagram draws it. The media are *also* in the token stream (their placeholder spans
hold the projector's tokens); fusion gives every later layer direct access to them.

**Which media a token sees** (``MediaContext``): a packed row holds several documents, so a text
token attends only to media of its own document (``document_ids``) that start at or before it
in the row, so a token never reads a medium placed after it, and decoding a prefix sees what
training saw. Fusion layers run only on the tokens that see at least one medium (gathered per
row, then written back): a text-only document, or text before its first medium, is computed
exactly as by the text-only LLM however far the gates have opened (as in Flamingo, where text
before the first image reads no image), and packed text-only rows cost nothing. Under sequence
parallelism a rank holds some positions of each row (``MediaContext.build``'s ``positions``) and
every medium of the row, so the same rule holds wherever a token's text and its media's spans live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xoron_dist.config import FusionConfig
from xoron_dist.model.common.attention import CrossAttention
from xoron_dist.model.common.init import init_weights_
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.utils.host_syncs import host_list, on_host

NO_DOCUMENT = -2  # document id of padding slots in the media context (differs from the text's -1 padding)


@dataclass
class MediaContext:
    """The media tokens each row's text may read, and which text positions read which.

    Only positions that see at least one medium take part: per row, ``queries`` lists them
    (padded to the longest row with position 0 and ``valid`` False).
    """

    tokens: torch.Tensor  # (batch, media_tokens, hidden): every medium of the row back to back, then zeros
    queries: torch.Tensor  # (batch, n) int64: positions in the row of the tokens that fuse
    valid: torch.Tensor  # (batch, n) bool: False = padding of ``queries``
    mask: torch.Tensor  # (batch, n, media_tokens) bool, True = that query may attend to that media token

    @classmethod
    def build(cls, media: list[tuple[torch.Tensor, torch.Tensor]], batch: int, seq: int,
              document_ids: torch.Tensor | None, positions: torch.Tensor | None = None) -> MediaContext | None:
        """``media``: (tokens (n, longest, hidden), spans (n, 3) = row, start, length) per modality; medium i
        of a modality holds its first ``length`` tokens (media of one modality may differ in length).

        Returns None when there are no media. ``seq``, the spans and ``document_ids`` (batch, seq) are the
        whole rows'; ``document_ids`` None = one document per row. ``positions`` (local,): the rows' positions
        the fusing hidden states hold, in their order (default all ``seq``; under sequence parallelism this
        rank's zig-zag positions, ``xoron_dist.parallel.media_exchange``): ``queries`` index into those.
        """
        pieces = [(toks[i, :length], int(row), int(start)) for toks, spans in media
                  for i, (row, start, length) in enumerate(host_list(spans))]
        if not pieces:
            return None
        device, hidden, dtype = pieces[0][0].device, pieces[0][0].shape[-1], pieces[0][0].dtype
        per_row = [[p for p in pieces if p[1] == row] for row in range(batch)]
        width = max(sum(p[0].shape[0] for p in row) for row in per_row)
        tokens = torch.zeros(batch, width, hidden, device=device, dtype=dtype)
        key_doc = torch.full((batch, width), NO_DOCUMENT, dtype=torch.long, device=device)
        key_pos = torch.zeros((batch, width), dtype=torch.long, device=device)
        docs = document_ids if document_ids is not None else torch.zeros(batch, seq, dtype=torch.long, device=device)
        rows, cols, values = [], [], []
        for row, row_pieces in enumerate(per_row):
            offset = 0
            for toks, _, start in row_pieces:
                length = toks.shape[0]
                rows.append(torch.full((length,), row, device=device))
                cols.append(torch.arange(offset, offset + length, device=device))
                values.append(toks)
                key_doc[row, offset : offset + length] = docs[row, start]
                key_pos[row, offset : offset + length] = start
                offset += length
        # one out-of-place write keeps the tokens' autograd path to the projector
        tokens = tokens.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))
        query_pos = torch.arange(seq, device=device) if positions is None else positions.to(device)
        query_doc = docs[:, query_pos]  # (batch, local)
        mask = (query_doc[:, :, None] == key_doc[:, None, :]) & (key_pos[:, None, :] <= query_pos[None, :, None])
        sees = mask.any(dim=-1)  # (batch, local)
        placed = [(row, start) for toks, row, start in pieces if toks.shape[0]]
        n = on_host(lambda d, p: _most_fusing(d, p, placed, batch, seq), document_ids, positions,
                    otherwise=lambda: max(int(sees.sum(dim=1).max()), 1))
        # stable sort puts each row's fusing positions first, in order
        queries = torch.sort((~sees).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = sees.gather(1, queries)
        mask = mask.gather(1, queries[..., None].expand(-1, -1, width)) & valid[..., None]
        return cls(tokens, queries, valid, mask)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, hidden) -> the fusing positions (batch, n, hidden)."""
        return x.gather(1, self.queries[..., None].expand(-1, -1, x.shape[-1]))

    def scatter(self, x: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """Write the valid rows of ``fused`` (batch, n, hidden) back into x (out of place). A row's query
        positions are distinct (a sort's indices), so the invalid ones are written back with their own
        values: exact, and no boolean mask (whose size the host would have to read)."""
        index = self.queries[..., None].expand(-1, -1, x.shape[-1])
        return x.scatter(1, index, torch.where(self.valid[..., None], fused, x.gather(1, index)))


def _most_fusing(document_ids: torch.Tensor | None, positions: torch.Tensor | None, media: list[tuple[int, int]],
                 batch: int, seq: int) -> int:
    """The most positions of one row that see a medium (at least 1), ``MediaContext.build``'s ``sees`` counted
    from the media's (row, start) alone: a position sees a medium placed in its own document at or before it.
    Made on the host copies of ``document_ids`` and ``positions``, so ``build`` sizes its queries without a sync."""
    query_pos = torch.arange(seq) if positions is None else positions
    sees = torch.zeros(batch, query_pos.shape[0], dtype=torch.bool)
    for row, start in media:
        same_document = True if document_ids is None else document_ids[row, query_pos] == document_ids[row, start]
        sees[row] |= same_document & (query_pos >= start)
    return max(int(sees.sum(dim=1).max()), 1)


class GatedCrossAttentionLayer(nn.Module):
    """One fusion layer: tanh-gated cross-attention to the media, then a tanh-gated FFN."""

    def __init__(self, hidden: int, cfg: FusionConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = CrossAttention(hidden, hidden, cfg.num_heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(hidden, eps)
        self.ffn = SwiGLU(hidden, cfg.intermediate_size)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: MediaContext) -> torch.Tensor:
        """x (batch, n, hidden): the fusing positions (``MediaContext.gather``) -> (batch, n, hidden)."""
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attn(self.attn_norm(x), media.tokens, media.mask)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * self.ffn(self.ffn_norm(x))


class FusionLayers(nn.Module):
    """The fusion layers, each tied to the decoder layer it runs before (``cfg.layers``)."""

    def __init__(self, hidden: int, cfg: FusionConfig, init_std: float = 0.02, eps: float = 1e-6) -> None:
        super().__init__()
        self.init_std = init_std
        self.positions = list(cfg.layers)
        self.layers = nn.ModuleList(GatedCrossAttentionLayer(hidden, cfg, eps) for _ in cfg.layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights_(self, self.init_std)
        with torch.no_grad():
            for layer in self.layers:
                layer.attn_gate.zero_()
                layer.ffn_gate.zero_()

    def keep_only(self, decoder_layers: set[int]) -> None:
        """Prune to the fusion layers placed before ``decoder_layers`` (a pipeline stage's): the others
        become parameter-free placeholders, so the kept ones keep their index and parameter names."""
        for i, position in enumerate(self.positions):
            if position not in decoder_layers:
                self.layers[i], self.positions[i] = nn.Identity(), None

    def before_layer(self, index: int, x: torch.Tensor, media: MediaContext) -> torch.Tensor:
        """Run the fusion layers placed before decoder layer ``index`` (in config order)."""
        here = [layer for position, layer in zip(self.positions, self.layers, strict=True) if position == index]
        if not here:
            return x
        fused = media.gather(x)
        for layer in here:
            fused = layer(fused, media)
        return media.scatter(x, fused)
