"""Vector quantisation on the unit sphere, with usage tracking for dead-code restarts.

VQ-VAE (van den Oord et al. 2017) with l2-normalised codes and latents (ViT-VQGAN, Yu et al. 2021
§3.2; DAC's factorised codes): the nearest code by cosine similarity, a straight-through estimator
for the encoder's gradient, the codebook loss ‖sg(z) − e‖² and the commitment loss ‖z − sg(e)‖².
TiTok's image tokens and the audio codec's residual quantiser (``ResidualQuantizer``) are built
from it.

Dead codes (Jukebox, Dhariwal et al. 2020 §2.3; SoundStream): a code nobody picks never moves, so a
codebook can shrink to the few codes that won early. Each quantiser keeps a moving average of each
code's share of the ids (``code_usage``) and remembers the last training forward's ids and latents
(``pending``); after each optimizer step the trainer's ``CodebookKeeper``
(``xoron_dist.train.codebooks``) sums the counts over the data-parallel ranks, updates the averages
and re-seeds every code whose share fell below ``dead_code_share`` of the uniform share with one of
the batch's latents (rank 0's, broadcast, so every replica keeps one codebook). ``apply_usage`` is
that update on one rank, in two halves: ``update_usage`` finds the dead codes on the device and
``restart`` re-seeds them once the host has read which they are (the trainer reads them with the step's
other values); the model itself never communicates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.utils.host_syncs import upload


class Quantized(NamedTuple):
    """``ids`` (...,); ``codes`` (..., code_dim) the straight-through quantised latents (forward: the
    codes; backward: identity into the latents); the two VQ losses (fp32 scalars). A named tuple, not a
    dataclass: DeepSpeed's ZeRO-3 finds a module's output tensors (to re-gather the codebook for the
    backward) only in tuples, lists and dicts."""

    ids: torch.Tensor
    codes: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class CosineQuantizer(nn.Module):
    """``codebook_size`` codes of ``code_dim`` on the unit sphere; input latents must be l2-normalised."""

    def __init__(self, codebook_size: int, code_dim: int, dead_code_share: float = 0.03,
                 usage_decay: float = 0.9) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.dead_code_share, self.usage_decay = dead_code_share, usage_decay
        # moving-average share of the ids each code took; uniform at the start
        self.register_buffer("code_usage", torch.full((codebook_size,), 1.0 / codebook_size))
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # last training forward's (ids, latents)
        self.restarts = 0  # codes re-seeded so far (for logs)

    @property
    def size(self) -> int:
        return self.codebook.num_embeddings

    def codes(self) -> torch.Tensor:
        """(codebook_size, code_dim) l2-normalised."""
        return F.normalize(self.codebook.weight, dim=-1)

    def lookup(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (..., code_dim) normalised -> ids (...), codes (..., code_dim); no gradient to the ids."""
        codes = self.codes()
        ids = (latents.detach() @ codes.t()).argmax(dim=-1)  # max cosine = min l2 distance on the sphere
        return ids, codes[ids]

    def forward(self, latents: torch.Tensor) -> Quantized:
        ids, codes = self.lookup(latents)
        codebook_loss = F.mse_loss(codes.float(), latents.detach().float())
        commitment_loss = F.mse_loss(latents.float(), codes.detach().float())
        if self.training and torch.is_grad_enabled():  # restarts wait for the optimizer step (backward needs them)
            self.pending = (ids.detach(), latents.detach())
        return Quantized(ids, latents + (codes - latents).detach(), codebook_loss, commitment_loss)

    def counts(self) -> torch.Tensor:
        """(codebook_size,) float: how often each code was picked in the pending forward."""
        ids = self.pending[0].flatten()  # an index_add, not bincount: bincount reads its output size (the max id)
        return torch.zeros(self.size, device=ids.device).index_add_(0, ids, torch.ones(ids.shape, device=ids.device))

    @torch.no_grad()
    def apply_usage(self, counts: torch.Tensor, fresh: Callable[[int], torch.Tensor],
                    write: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> int:
        """Update the usage average with ``counts`` (summed over the replicas) and re-seed the dead codes
        with ``fresh(n)`` (n, code_dim) latents; clears ``pending``; returns how many codes restarted.
        ``write(rows, values)`` sets codebook rows (default: in place; the trainer's keeper passes one that
        also reaches a ZeRO optimizer's partitioned weights). ``update_usage`` then ``restart``, with the
        dead codes read in between (the trainer reads them with the step's other values instead)."""
        dead = self.update_usage(counts)
        return self.restart(dead.nonzero().flatten().tolist(), fresh, write)

    @torch.no_grad()
    def update_usage(self, counts: torch.Tensor, applied: torch.Tensor | None = None) -> torch.Tensor:
        """Move the usage average by ``counts`` (summed over the replicas); the dead codes, a (size,) bool
        device mask, made without a read. ``applied``: a 0/1 device flag whether the optimizer step was
        applied; 0 (a skipped step) leaves the average as it was and finds no dead code."""
        decay = self.usage_decay
        moved = (self.code_usage * decay).add_(counts / counts.sum().clamp(min=1), alpha=1 - decay)
        keep = torch.ones((), device=moved.device) if applied is None else applied.to(moved.device)
        self.code_usage.copy_(torch.where(keep > 0, moved, self.code_usage))
        return (self.code_usage < self.dead_code_share / self.size) & (keep > 0) & bool(self.dead_code_share)

    @torch.no_grad()
    def restart(self, dead: list[int], fresh: Callable[[int], torch.Tensor],
                write: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> int:
        """Re-seed the ``dead`` codes (their indices, read on the host) with ``fresh(n)`` latents (see
        ``apply_usage``); clears ``pending``; returns how many codes restarted."""
        if not dead:
            self.pending = None
            return 0
        rows = upload(dead, dtype=torch.long, device=self.codebook.weight.device)
        values = fresh(len(dead)).to(self.codebook.weight.dtype)  # from the pending forward's latents
        self.pending = None
        if write is None:
            self.codebook.weight[rows] = values
        else:
            write(rows, values)
        self.code_usage[rows] = 1.0 / self.size  # a fresh code gets the uniform share to prove itself
        self.restarts += len(dead)
        return len(dead)

    def pick_latents(self, n: int) -> torch.Tensor:
        """``n`` of the pending forward's latents, drawn at random (torch's default generator)."""
        pool = self.pending[1].reshape(-1, self.pending[1].shape[-1])
        return pool[torch.randint(pool.shape[0], (n,), device=pool.device)]


__all__ = ["CosineQuantizer", "Quantized"]
