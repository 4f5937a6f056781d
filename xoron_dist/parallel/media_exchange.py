"""The multimodal model under sequence parallelism: media encoded once per replica, rows cut after embedding.

Every SP rank of a data-parallel replica reads the same packed rows and the same media (the loader
shards by data-parallel rank only; ``train/step.py`` leaves the multimodal model's rows whole). The
model (``XoronMultimodalModel``) asks its ``row_layout`` three things, and this module's
``ZigzagMediaRows`` answers them for SP rank r of sp:

1. **which media to encode** (``owned``): medium i of a modality is encoded by SP rank ``i mod sp``
   (round-robin by index: deterministic, the same on every rank, at most ceil(n/sp) per rank), so a
   replica encodes each medium once, not once per SP rank;
2. **all the media's projected tokens** (``gather_media``): each rank pads its share to the agreed
   (ceil(n/sp), longest span of all n, hidden) and one autograd all-gather over the SP group gives
   every rank every medium, back in index order. Backward: rank r's share receives the sum over the
   SP ranks of the gradient their losses put on it (a reduce-scatter), so the encoder's gradient on
   rank r is that of its own share and the sum over SP ranks that DeepSpeed takes is the single-rank
   gradient;
3. **this rank's part of the rows** (``positions``/``cut``): after the placeholders of the *whole*
   rows are filled with media tokens, the rows are cut in the zig-zag order of
   ``xoron_dist.parallel.sequence`` (chunks r and 2·sp-1-r), so a span crossing a chunk boundary is
   simply split between its chunks. Embedding the whole row on every SP rank costs one embedding
   lookup per rank; the decoder layers, fusion layers and LM head see only this rank's rows.

With tensor parallelism the SP group is Megatron's context-parallel group of this rank's TP rank: the
TP peers of an SP rank own the same media and run its (TP-split) encoders together, and each TP rank
exchanges the projected tokens, which are whole on every TP rank, within its own SP group. Under
pipeline parallelism this happens on stage 0; the hidden states of the rank's rows and all the media
tokens travel on to the SP rank's peer on the next stage.

The fusion layers get the global positions of the rank's rows (``positions``) and the whole rows'
document ids, so a token reads the media of its own document that start at or before it, wherever
its text and the media's span live. Every SP rank makes the same collective calls for every
micro-batch: one all-gather per modality with media (a rank whose share is empty encodes the
modality's blank medium, times 0, so its encoder modules run the same calls, which ZeRO-3's weight
gathers follow) and none for a modality the rows lack (all SP ranks see the same rows).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.parallel.ring_attention import RingLayoutError
from xoron_dist.parallel.sequence import SequenceSplit, zigzag_positions, zigzag_split
from xoron_dist.utils.host_syncs import upload


class _GatherShares(torch.autograd.Function):
    """(per, ...) on each of the group's ranks -> (ranks, per, ...) on every rank; backward sums over ranks."""

    @staticmethod
    def forward(ctx, share: torch.Tensor, group, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        pieces = [torch.empty_like(share) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, share.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ours = grad.new_empty(grad.shape[1:])  # Σ over ranks of the gradient each put on our share
        dist.reduce_scatter_tensor(ours, grad.contiguous().flatten(0, 1), group=ctx.group)
        return ours, None, None


def gather_shares(share: torch.Tensor, group, rank: int) -> torch.Tensor:
    """Autograd all-gather: ``share`` (per, ...) of every rank of ``group`` -> (ranks, per, ...); the
    gradient of a rank's share is the sum over the group of the gradients put on it."""
    return _GatherShares.apply(share, group, rank)


class ZigzagMediaRows:
    """``XoronMultimodalModel.row_layout`` under sequence parallelism (see the module docstring)."""

    def __init__(self, split: SequenceSplit) -> None:
        self.split = split

    def owned(self, count: int) -> list[int]:
        """Indices of the ``count`` media of a modality that this rank encodes (round-robin)."""
        return list(range(self.split.rank, count, self.split.size))

    def gather_media(self, mine: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``mine`` (len(owned), L_mine, D): this rank's projected media (0 rows when it owns none);
        ``lengths``: the span of every medium -> (n, max(lengths), D), medium i in row i."""
        size, count = self.split.size, len(lengths)
        per, longest = -(-count // size), max(lengths)
        if mine.shape[0] == 0:  # an empty share (the blank medium's tokens, which may be longer, carry no rows)
            mine = mine[:, :0]
        if mine.shape[0] > per or mine.shape[1] > longest:
            raise ValueError(f"SP rank {self.split.rank} encoded {tuple(mine.shape[:2])} (media, tokens) but its "
                             f"share of {count} media is at most {per} of at most {longest} tokens")
        share = mine.new_zeros((per, longest, mine.shape[-1]))
        share = torch.cat((torch.nn.functional.pad(mine, (0, 0, 0, longest - mine.shape[1])),
                           share[mine.shape[0]:]))
        every = gather_shares(share, self.split.group, self.split.rank)  # (sp, per, longest, D)
        # medium i is share i mod sp, slot i // sp
        return every.transpose(0, 1).reshape(per * size, longest, -1)[:count]

    def positions(self, seq: int, device: torch.device) -> torch.Tensor:
        """(seq / sp,) the global positions of this rank's rows, in local order (with a host copy: the fusion
        reads them on the host)."""
        return upload(zigzag_positions(seq, self.split.rank, self.split.size), device=device, keep_host=True)

    def cut(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's zig-zag part of a (batch, seq, ...) tensor of the whole rows."""
        return None if rows is None else zigzag_split(rows, 1, self.split.rank, self.split.size)


__all__ = ["ZigzagMediaRows", "gather_shares"]


def apply_media_rows(model: nn.Module, split: SequenceSplit) -> None:
    """Give the multimodal model(s) in ``model`` the ``ZigzagMediaRows`` layout (each medium encoded by
    one SP rank, exchanged, rows cut after the spans are filled); refused with a generator."""
    from xoron_dist.model.xoron import XoronMultimodalModel

    for module in model.modules():
        if isinstance(module, XoronMultimodalModel):
            if module.generators:
                raise RingLayoutError(f"the multimodal model with the {module.generators[0].generator} generator "
                                      f"under sequence parallelism (sp={split.size}): a generator reads the LLM "
                                      "states of whole requests, which the ring splits; set parallel.sp=1")
            module.row_layout = ZigzagMediaRows(split)
