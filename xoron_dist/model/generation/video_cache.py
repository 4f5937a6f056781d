"""The key/value cache of chunk-by-chunk video generation (CausVid, Yin et al. 2024, §3.3); the loop that
fills it is ``video_dit.generate_video``.

    prompt ─► text keys/values of every block (once; text attends to text only)
    for each chunk k:  z ~ N(0, I) (the chunk's slice of the clip's noise)
        Euler/Heun steps t: 1 -> 0 (``flow.euler_sample`` / ``heun_sample``, guidance included), each a
        forward pass of the chunk's tokens alone against [text K/V ; past chunks' K/V]
        ─► x_k ─► re-encoded once at t = 0 (its clean latents) ─► its K/V appended to the cache

So the past a chunk sees is exactly the full model's view of clean earlier chunks: one generated
chunk equals ``VideoMoEDiT.forward`` over [x_0 .. x_{k-1} at t = 0 ; z at t] (tested). The clean
re-encoding (CausVid's choice) costs one extra pass per chunk and keeps the cache independent of
the sampler; caching the last denoising step's keys instead would show later chunks a past at
t = t_{steps-1}, which training never showed them. Classifier-free guidance keeps one cache per
branch (the prompt's and the learned null condition's), both fed the same finished chunks.

Memory: past keys/values grow by one chunk per chunk, (B, heads, tokens, head_dim) per block; no
sliding window (MAGI-1 and Self-Forcing cap it for long rollouts: not done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KeyValues = tuple[torch.Tensor, torch.Tensor]  # keys, values (batch, heads, tokens, head_dim), keys rotated


@dataclass
class ChunkKVCache:
    """One guidance branch's view of the prompt and of the committed chunks.

    ``text_kv``: every block's text (k, v) (B, heads, L, head_dim); ``text_valid`` (B, L) bool or None
    (all valid); ``pooled``: the pooled text embedding (B, D), to which a chunk's time embedding is
    added; ``past_kv``: every block's (k, v) of the committed chunks (None before the first);
    ``last_patches`` (B, rows·cols, C·p²): the latent patches of the last committed frame (the next
    chunk's first frame moves relative to it); ``frames``: latent frames committed.
    """

    text_kv: list[KeyValues]
    text_valid: torch.Tensor | None
    pooled: torch.Tensor
    past_kv: list[KeyValues] | None = None
    last_patches: torch.Tensor | None = None
    frames: int = 0

    @property
    def text_len(self) -> int:
        return self.text_kv[0][0].shape[2]

    @property
    def past_len(self) -> int:
        return 0 if self.past_kv is None else self.past_kv[0][0].shape[2]

    def append(self, new_kv: list[KeyValues], last_patches: torch.Tensor, frames: int) -> None:
        """Add one chunk: every block's (k, v) of its tokens, its last frame's patches, its frame count."""
        if self.past_kv is None:
            self.past_kv = list(new_kv)
        else:
            self.past_kv = [
                (torch.cat((k, nk), dim=2), torch.cat((v, nv), dim=2))
                for (k, v), (nk, nv) in zip(self.past_kv, new_kv, strict=True)
            ]
        self.last_patches = last_patches
        self.frames += frames
