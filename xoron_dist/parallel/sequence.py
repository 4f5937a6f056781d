"""Sequence parallelism: rows cut over the SP ranks in zig-zag order, attention as ring attention.

Layout: every sequence is cut into 2·sp equal chunks and SP rank r holds chunks r and 2·sp-1-r
(``zigzag_split``), so with causal attention every rank does the same work (Llama 3's context
parallelism, arXiv:2407.21783 §3.3.2). Every SP rank of a replica reads the same batch and keeps
its rows (``shard_rows``); position ids stay those of the full rows, so RoPE/YaRN rotate with the
global positions.

The multimodal model keeps its rows whole until its media sit in them, then cuts them the same way
(``xoron_dist.parallel.media_exchange``: each medium encoded by one SP rank, exchanged over the group).

Model: ``apply_sequence_parallel`` swaps the attention core of every MLA module for a
``RingAttentionCore`` (``xoron_dist.parallel.ring_attention`` holds the ring kernel). The core
receives what MLA's single-rank core receives (queries, the normed latent, the rotated rope key,
the document ids) and runs ring attention with this rank's global row positions; with
``latent`` the ring carries MLA's latent and rope key instead of the expanded keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.parallel.ring_attention import RingLayoutError, ring_attention, ring_attention_latent


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's place in the sequence-parallel group: it holds rows ``zigzag_positions(...)``
    of every sequence, and attention runs as ring attention over ``group``."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    latent: bool  # MLA: pass the latent + rope key around the ring instead of full K/V


def _check_zigzag(seq_len: int, sp_rank: int, sp_size: int, what: str) -> int:
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise RingLayoutError(f"sp_rank={sp_rank}, sp_size={sp_size}: need 0 <= sp_rank < sp_size")
    if seq_len % (2 * sp_size):
        raise RingLayoutError(
            f"{what} has {seq_len} rows, not a multiple of 2*sp = {2 * sp_size}: the zig-zag layout cuts the "
            f"sequence into 2*sp equal chunks; pad or pack the sequence to a multiple of {2 * sp_size}"
        )
    return seq_len // (2 * sp_size)


def zigzag_split(x: torch.Tensor, dim: int, sp_rank: int, sp_size: int) -> torch.Tensor:
    """This rank's rows of ``x`` along ``dim``: chunks sp_rank and 2·sp-1-sp_rank of 2·sp equal chunks."""
    _check_zigzag(x.shape[dim], sp_rank, sp_size, f"dim {dim} of a tensor of shape {tuple(x.shape)}")
    chunks = x.chunk(2 * sp_size, dim=dim)
    return torch.cat((chunks[sp_rank], chunks[2 * sp_size - 1 - sp_rank]), dim=dim)


def zigzag_positions(seq_len: int, sp_rank: int, sp_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Global row positions (seq_len / sp,) int64 that ``zigzag_split`` gives this rank, in local order."""
    chunk = _check_zigzag(seq_len, sp_rank, sp_size, "the sequence")
    first, second = sp_rank * chunk, (2 * sp_size - 1 - sp_rank) * chunk
    return torch.cat((torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)))


def zigzag_gather(x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Inverse of ``zigzag_split`` on every rank of ``group``: the full sequence in global order.

    A plain all-gather (no autograd): for tests, logging and gathering outputs.
    """
    sp_size = dist.get_world_size(group)
    if x_local.shape[dim] % 2:
        raise RingLayoutError(f"dim {dim} of the local tensor has {x_local.shape[dim]} rows; a zig-zag local "
                              "sequence is two equal chunks, so its length is even")
    pieces = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(sp_size)]
    dist.all_gather(pieces, x_local.contiguous(), group=group)
    halves = [piece.chunk(2, dim=dim) for piece in pieces]
    chunks = [halves[c][0] if c < sp_size else halves[2 * sp_size - 1 - c][1] for c in range(2 * sp_size)]
    return torch.cat(chunks, dim=dim)


def shard_rows(rows: dict[str, torch.Tensor | None], rank: int, size: int) -> dict[str, torch.Tensor | None]:
    """This sequence-parallel rank's zig-zag rows of a micro-batch's token tensors: ``rows`` maps names
    to (batch, seq) tensors (or None); ``position_ids`` is filled with the full rows' 0..seq-1 when
    missing, before the cut, so RoPE sees global positions."""
    rows = dict(rows)
    if rows.get("position_ids") is None:
        ids = rows["input_ids"]
        rows["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return {name: None if t is None else zigzag_split(t, 1, rank, size) for name, t in rows.items()}


class RingAttentionCore(nn.Module):
    """MLA's attention core over the sequence-parallel ring (same call as ``ExpandedAttention``)."""

    def __init__(self, split: SequenceSplit) -> None:
        super().__init__()
        self.split = split

    def forward(self, q_nope, q_rope, latent, k_rope, document_ids, attn) -> torch.Tensor:
        split = self.split
        order = zigzag_positions(latent.shape[1] * split.size, split.rank, split.size, device=latent.device)[None]
        common = dict(group=split.group, scale=attn.softmax_scale, causal=True, positions=order,
                      document_ids=document_ids)
        if split.latent:
            # The ring uses kv_up's weight directly, not through the (column-parallel) layer: the layer's
            # own way in (the gradient sum over TP of the latent) must be taken here.
            latent = getattr(attn.kv_up, "enter", lambda x: x)(latent)
            return ring_attention_latent(q_nope, q_rope, latent, k_rope, attn.kv_up.weight,
                                         num_heads=attn.num_heads, nope_dim=attn.nope_dim, v_dim=attn.v_dim,
                                         **common)
        k, v = attn.expand_kv(latent, k_rope)
        return ring_attention(torch.cat((q_nope, q_rope), dim=-1), k, v, **common)


def apply_sequence_parallel(model: nn.Module, split: SequenceSplit) -> int:
    """Swap every MLA core of ``model`` for the ring core; returns how many. (The multimodal model's rows
    are laid out by ``media_exchange.apply_media_rows``: media shared out over the SP ranks.)"""
    from xoron_dist.model.llm.attention import MultiLatentAttention

    swapped = 0
    for module in model.modules():
        if isinstance(module, MultiLatentAttention):
            module.core = RingAttentionCore(split)
            swapped += 1
    return swapped


__all__ = ["RingAttentionCore", "SequenceSplit", "apply_sequence_parallel", "shard_rows", "zigzag_gather",
           "zigzag_positions", "zigzag_split"]
