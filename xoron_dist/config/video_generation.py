"""The video generator's config section: the image generator's (``DiTConfig``) plus what time adds.

``VideoDiTConfig`` subclasses ``DiTConfig``: the same widths, blocks, MoE, flow-matching and
guidance fields mean the same things (so an image generator's weights can start a video one), and
``validate`` runs the image checks first, under the same dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass

from xoron_dist.config.checks import positive
from xoron_dist.config.generation import DiTConfig
from xoron_dist.utils.typed_config import field_error


@dataclass
class VideoDiTConfig(DiTConfig):
    """Autoregressive MoE-DiT video generator over a causal VAE's latents (B, C, T, H, W)
    (``xoron_dist.model.generation.video_dit``).

    ``chunk_frames``: latent frames per chunk, the unit of causality, of the per-chunk noise level
    and of one generation step (CausVid's ``num_frame_per_block``, 3 there; MAGI-1 uses 24 video
    frames, 6 latent frames at 4x temporal compression). A clip has a whole number of chunks.

    ``motion_dim``: width of the motion embedding (the latent patch minus the same patch one frame
    earlier) that every MoE router reads next to the token, as the video encoder's ``motion_dim``.

    ``context_clean_prob``: share of training samples that are teacher-forced: a random prefix of
    1..chunks-1 chunks is clean (t = 0, no loss), as the past always is when generating; the other
    samples, and the chunks after the prefix, are diffusion-forcing chunks with their own t each.

    ``time_shift`` null: Flux's resolution-dependent shift, counted on the tokens of one chunk.
    """

    chunk_frames: int = 3
    motion_dim: int = 64
    context_clean_prob: float = 0.5

    def validate(self, where: str) -> None:
        super().validate(where)
        positive(self, where, "chunk_frames", "motion_dim")
        if self.attention_head_dim < 6:
            raise field_error(
                f"{where}.head_dim",
                self.attention_head_dim,
                "3D-RoPE needs a head dim of at least 6: one rotated pair per axis (t, row, col)",
            )
        if not 0.0 <= self.context_clean_prob <= 1.0:
            raise field_error(f"{where}.context_clean_prob", self.context_clean_prob, "a probability in [0, 1]")
