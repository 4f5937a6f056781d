"""What a generator is conditioned on: the LLM's reading of the prompt before each generation target.

A generation sample is laid out ``prompt + text <|gen_x|> <|x_start|> <|x_pad|>*n <|x_end|> <eos>``
(``xoron_dist.data.packing``); its target medium sits in the placeholders' span (row, start, n).
The generator reads the final-normed hidden states of that document's tokens *before* the span,
from the document's first token through ``<|x_start|>``: the whole request, as the causal LLM
understood it (the placeholders come later, so nothing of the target leaks into its condition).
"""

from __future__ import annotations

import torch

from xoron_dist.utils.host_syncs import on_host, prefix_mask


def document_starts(document_ids: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(batch, seq): the position where each token's document begins (0 everywhere without document ids)."""
    if document_ids is None:
        return torch.zeros(batch, seq, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device).expand(batch, -1)
    first = torch.ones(batch, seq, dtype=torch.bool, device=device)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(first, positions, torch.zeros_like(positions)).cummax(dim=1).values


def prompt_states(states: torch.Tensor, spans: torch.Tensor,
                  document_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """states (batch, seq, D), target spans (n, 3) = row, start, length -> condition (n, L, D) zero at
    padding and its mask (n, L) (True = a prompt token), L the longest prompt (at least 1)."""
    batch, seq, width = states.shape
    if spans.shape[0] == 0:
        # an empty slice of the states, not a new tensor: in the states' graph like any request (an idle
        # generator call reads it and should have a real call's graph: model/generation/heads.py)
        return states[:0, :1], prefix_mask([], 1, states.device)
    spans = spans.to(states.device)
    begins, on_device = _prompt_begins(spans, document_ids, batch, seq)
    lengths = on_host(lambda s, d: _prompt_begins(s, d, batch, seq)[1].tolist(), spans, document_ids,
                      otherwise=on_device.tolist)
    rows = spans[:, 0]
    mask = prefix_mask(lengths, max([*lengths, 1]), states.device)  # with its host copy, for the heads' checks
    offsets = torch.arange(mask.shape[1], device=states.device)
    index = (begins[:, None] + offsets[None]).clamp(max=seq - 1)
    return states[rows[:, None], index] * mask[..., None].to(states.dtype), mask


def _prompt_begins(spans: torch.Tensor, document_ids: torch.Tensor | None, batch: int,
                   seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each target's prompt begins (its document's first token) and its length (up to the span's
    start), (n,) each, on ``spans``' device: the same function of the values on the host copies."""
    rows, ends = spans[:, 0], spans[:, 1]
    begins = document_starts(document_ids, batch, seq, spans.device)[rows, ends]
    return begins, ends - begins


__all__ = ["document_starts", "prompt_states"]
