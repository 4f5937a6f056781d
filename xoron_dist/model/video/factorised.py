"""Video through the vision tower: per-frame SigLIP features, factorised causal space-time layers, k tokens a frame.

The seed's video encoder (``video.frame_encoder: tower``)::

    videos (T, H, W, 3) uint8 ─► T frames each (resampled: ``frames`` if given, else ≤ max_frames)
        ─► every frame of every video in ONE call of the model's vision tower (shared weights)
        ─► f (B, T, P, d_vision) ─► in_proj ─► x (B, T, P, d)      P = the tower's patches per frame
           └► f(t) − f(t−1) at the same patch (0 at t = 0) ─► motion_embed ─► m
    x ─► [ x += SpatialAttn(norm(x))      on (B·T, P, d): full within a frame
           x += TemporalAttn(norm(x))     on (B·P, T, d): causal across frames (is_causal, no mask tensor)
           x += TemporalMoE(norm(x), m) ] × num_layers      (the motion-routed MoE of ``encoder.py``)
      ─► FrameCompressor: k learned queries cross-attend to each frame's P tokens ─► (B, T·k, d) ─► norm

* **No dense T·h·w mask.** Full 3D attention over a 32-frame 384 px clip (729 patches a frame) is
  23K tokens with a 23K² mask; factorised, spatial attention holds T·P² scores and temporal
  attention P·T² (``bench/video_encoder_memory.py`` measures both encoders' peak memory).
* **3D-RoPE** over (t, row, col) is applied in both attentions: within a frame t is the same for
  every token (its rotation cancels), across frames row and col are (so attention is relative in
  the axis it mixes), i.e. the factorised form of the full encoder's 3D-RoPE.
* **Causality holds token by token**: the tower and the spatial attention see one frame, the
  temporal attention is causal, the motion looks one frame back and the compression reads one
  frame, so the outputs of frames < k never depend on frame k (the test changes frame k and
  compares exactly).
* **Shared tower.** The tower is the model's ``vision`` instance, handed over by ``use_tower`` and
  kept out of this module's children: its parameters live once, under ``vision.*`` (one state-dict
  entry, one TP swap, one ZeRO partition); a stage that freezes ``video`` leaves the tower to
  ``vision``'s freeze. Gradients of the video loss reach it through the call.

**Frame counts from the multi-scale loader** (``span`` given, ``frames`` None: ``tower_clip_sizes``).
The loader brings every clip of a micro-batch to its bucket's frame count T (``data.multiscale.
video_frames``), while the placeholder span stays ``data.video_tokens`` = S tokens (the packer does not
know the bucket). So a clip of T frames gives k_T = S / T tokens per frame: the compressor's
``tokens_per_frame`` learned queries are resampled linearly along the query axis to k_T (as a position
table is resized; at T = S / tokens_per_frame they are used as they are, so that bucket is exactly the
fixed-count encoder). Every bucket's T must divide S (checked against the config). One T per call: the
loader's buckets keep a micro-batch's clips at one count, and a rank without videos encodes a one-frame
blank (S queries), which makes the same module calls.

Videos of different lengths or frame sizes share a batch: frames are padded to the longest video
and patches to the largest frame; padded frames come after a video's real ones, so causal
temporal attention never lets a real frame read them, and padded patches are masked out of the
spatial attention and the compression. Output: features (batch, T·k, hidden), frame-major, and a
validity mask (batch, T·k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import VideoConfig
from xoron_dist.model.common.attention import CrossAttention
from xoron_dist.model.common.init import empty_linear, init_weights_
from xoron_dist.model.common.moe import RoutedExperts
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope_nd import AxialRoPE
from xoron_dist.model.video.encoder import MotionAwareMoE, VideoSelfAttention
from xoron_dist.utils.host_syncs import mask_lengths, upload


def sample_frames(video: torch.Tensor, frames: int | None, max_frames: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T', H, W, 3): exactly ``frames`` evenly spaced frames (first and last
    kept; a shorter clip repeats frames), or with ``frames=None`` at most ``max_frames`` (as is when shorter)."""
    if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"a video is uint8 (frames, height, width, 3); got {video.dtype} {tuple(video.shape)}")
    have = video.shape[0]
    want = frames if frames is not None else min(have, max_frames)
    if want == have:
        return video
    keep = torch.linspace(0, have - 1, want).round().long()
    return video[keep.to(video.device)]


class FactorisedVideoLayer(nn.Module):
    """Spatial attention, causal temporal attention, motion-routed temporal MoE (pre-norm residuals)."""

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.spatial_norm = RMSNorm(cfg.hidden_size)
        self.spatial = VideoSelfAttention(cfg)
        self.temporal_norm = RMSNorm(cfg.hidden_size)
        self.temporal = VideoSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size)
        self.ffn = MotionAwareMoE(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None,
                valid: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """x (B, T, P, d); rope cos/sin (B, T, P, pairs); key_mask (B·T, 1, 1, P) or None; valid (B, T, P);
        motion (valid tokens, motion_dim)."""
        b, t, p, d = x.shape
        cos, sin = rope
        spatial_rope = (cos.reshape(b * t, p, -1), sin.reshape(b * t, p, -1))
        x = x + self.spatial(self.spatial_norm(x).reshape(b * t, p, d), spatial_rope, key_mask).view(b, t, p, d)
        # (B, T, P, d) -> (B·P, T, d): each patch position's frames, causal in time
        temporal_rope = (cos.transpose(1, 2).reshape(b * p, t, -1), sin.transpose(1, 2).reshape(b * p, t, -1))
        by_position = self.temporal_norm(x).transpose(1, 2).reshape(b * p, t, d)
        x = x + self.temporal(by_position, temporal_rope, causal=True).view(b, p, t, d).transpose(1, 2)
        # experts see only real tokens: padding neither costs compute nor counts as expert load
        update = self.ffn(self.ffn_norm(x)[valid], motion)
        return x.index_put((valid,), x[valid] + update)


class FrameCompressor(nn.Module):
    """k learned queries read one frame's tokens: (B·T, P, d) + mask (B·T, P) -> (B·T, k, d)."""

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(cfg.tokens_per_frame, cfg.hidden_size))
        self.query_norm = RMSNorm(cfg.hidden_size)
        self.feature_norm = RMSNorm(cfg.hidden_size)
        self.attn = CrossAttention(cfg.hidden_size, cfg.hidden_size, cfg.num_heads)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """``count`` queries per frame (default: the ``tokens_per_frame`` learned ones; another count
        resamples them linearly along the query axis, see the module docstring)."""
        queries = self.queries
        if count is not None and count != queries.shape[0]:
            queries = F.interpolate(queries.t()[None], size=count, mode="linear", align_corners=True)[0].t()
        queries = queries.to(frames.dtype).expand(frames.shape[0], -1, -1)
        attend = mask[:, None, :].expand(-1, queries.shape[1], -1)  # a padded frame reads nothing: zero output
        return queries + self.attn(self.query_norm(queries), self.feature_norm(frames), attend)


class TowerVideoEncoder(nn.Module):
    """list of (T, H, W, 3) uint8 videos -> features (batch, T·k, hidden), mask (batch, T·k).

    ``frames``: every clip resampled to exactly this many frames (the model's span is frames · k);
    None keeps each clip's own count (at most ``max_frames``). ``span``: with ``frames`` None, the tokens
    every clip takes: a call's clips share one frame count T, each frame gives span / T tokens (the
    multi-scale loader's frame buckets, see the module docstring). Call ``use_tower`` before ``forward``.
    """

    def __init__(self, cfg: VideoConfig, tower_width: int, init_std: float = 0.02,
                 frames: int | None = None, span: int | None = None) -> None:
        super().__init__()
        if frames is not None and span is not None:
            raise ValueError("give frames (a fixed count, span frames x tokens_per_frame) or span (the clip's "
                             "frame count sets the tokens per frame), not both")
        self.cfg, self.init_std, self.frames, self.span = cfg, init_std, frames, span
        self.in_proj = empty_linear(tower_width, cfg.hidden_size)
        self.motion_embed = empty_linear(tower_width, cfg.motion_dim)
        self.rope = AxialRoPE(cfg.hidden_size // cfg.num_heads, axes=3, theta=cfg.rope_theta)
        self.layers = nn.ModuleList(FactorisedVideoLayer(cfg) for _ in range(cfg.num_layers))
        self.compress = FrameCompressor(cfg)
        self.norm = RMSNorm(cfg.hidden_size)
        self._tower: tuple[nn.Module, ...] = ()  # a tuple, so the tower is not registered as a child
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights_(self, self.init_std, skip=(RoutedExperts,))
        self.compress.queries.normal_(std=1.0)  # unit scale, like the normed frame tokens they read
        for layer in self.layers:
            layer.ffn.experts.init_weights(self.init_std)

    def use_tower(self, tower: nn.Module) -> None:
        """Encode frames with ``tower`` (the model's vision tower; its width must be ``in_proj``'s input)."""
        width = tower.cfg.hidden_size
        if width != self.in_proj.in_features:
            raise ValueError(f"the vision tower is {width} wide but this video encoder was built for "
                             f"{self.in_proj.in_features}: build both from the same config")
        self._tower = (tower,)

    @property
    def tower(self) -> nn.Module:
        if not self._tower:
            raise RuntimeError("TowerVideoEncoder has no vision tower: call use_tower(model.vision) first "
                               "(XoronMultimodalModel does; model.video.frame_encoder: tower needs model.vision)")
        return self._tower[0]

    def forward(self, videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not videos:
            raise ValueError("TowerVideoEncoder needs at least one video")
        tower = self.tower
        clips = [sample_frames(v, self.frames, self.cfg.max_frames) for v in videos]
        counts = [c.shape[0] for c in clips]
        k = self.cfg.tokens_per_frame if self.span is None else self._tokens_per_frame(counts)
        # one call, every frame of every video; the patch grid whatever the tower's seed-path switches say
        out = tower.encode_patches([frame for clip in clips for frame in clip])
        features, frame_mask, grids = out.features, out.mask, out.grids  # (N, P, dv), (N, P), (N, 2)
        device, dtype = features.device, self.in_proj.weight.dtype
        batch, longest, patches = len(clips), max(counts), features.shape[1]
        video_of = torch.repeat_interleave(torch.arange(batch, device=device), upload(counts, device=device),
                                           output_size=sum(counts))
        time_of = torch.cat([torch.arange(n, device=device) for n in counts])
        # motion: each patch's tower feature minus the same patch one frame back (0 in a clip's first frame)
        previous = torch.cat((features[:1], features[:-1]))
        motion = torch.where((time_of > 0)[:, None, None], features - previous, torch.zeros_like(features))
        embedded = self.in_proj(features.to(dtype))  # (N, P, d)
        x = embedded.new_zeros(batch, longest, patches, self.cfg.hidden_size).index_put((video_of, time_of), embedded)
        valid = torch.zeros(batch, longest, patches, dtype=torch.bool, device=device)
        valid = valid.index_put((video_of, time_of), frame_mask)
        motion = self.motion_embed(motion[frame_mask].to(dtype))  # (valid tokens, motion_dim), frame-major
        coords = torch.zeros(batch, longest, patches, 3, dtype=torch.long, device=device)
        cols = grids[:, 1:].clamp(min=1)
        index = torch.arange(patches, device=device)[None]
        grid_yx = torch.stack((index // cols, index % cols), dim=-1)  # (N, P, 2): row, col of each patch
        coords = coords.index_put((video_of, time_of), torch.cat((time_of[:, None, None].expand(-1, patches, 1),
                                                                 grid_yx), dim=-1))
        cos, sin = self.rope(coords)
        rope = (cos.to(dtype), sin.to(dtype))
        frames_mask = valid.reshape(batch * longest, patches)
        key_mask = None
        if not bool(frames_mask.all()):  # a padded frame (no real patch) attends anywhere; its outputs are dropped
            key_mask = (frames_mask | ~frames_mask.any(dim=-1, keepdim=True))[:, None, None, :]
        for layer in self.layers:
            x = layer(x, rope, key_mask, valid, motion)
        tokens = self.compress(x.reshape(batch * longest, patches, -1), frames_mask, k)
        mask = valid.any(dim=-1)[..., None].expand(-1, -1, k).reshape(batch, longest * k)
        return self.norm(tokens.reshape(batch, longest * k, -1)), mask

    def _tokens_per_frame(self, counts: list[int]) -> int:
        """span / T for the call's one frame count T (``span`` mode)."""
        if len(set(counts)) != 1 or self.span % counts[0]:
            raise ValueError(f"tower video encoder with a {self.span}-token span: the clips of one call need one "
                             f"frame count dividing {self.span} (data.multiscale.video_frames buckets); got {counts}")
        return self.span // counts[0]


class VideoTokenProjector(nn.Module):
    """The tower encoder's T·k tokens into the LLM's width, token by token (LLaVA's two-layer MLP):
    features (n, L, d) + mask (n, L) -> (n, L, D); medium i fills its first ``span_lengths[i]``."""

    def __init__(self, in_dim: int, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.fc1 = empty_linear(in_dim, hidden)
        self.fc2 = empty_linear(hidden, hidden)
        init_weights_(self, init_std)

    def forward(self, features: torch.Tensor, mask: torch.Tensor,
                span_lengths: Sequence[int] | None = None) -> torch.Tensor:
        if span_lengths is not None:
            emitted = mask_lengths(mask)  # the check's one read (none with a host copy)
            pairs = enumerate(zip(emitted, span_lengths, strict=True))
            bad = next((i for i, (got, span) in pairs if got != span), None)
            if bad is not None:
                raise ValueError(f"video {bad} has {emitted[bad]} tokens (frames x model.video.tokens_per_frame) "
                                 f"but its span holds {span_lengths[bad]}: the data was packed with another "
                                 "data.video_tokens")
        return self.fc2(F.gelu(self.fc1(features), approximate="tanh"))


def tower_clip_frames(cfg) -> int:
    """Frames per clip in tower mode, T = data.video_tokens / model.video.tokens_per_frame (the span is
    T·k); refuses a config where that is not a whole count in [min_frames, max_frames] or has no tower.
    ``cfg``: a ``XoronConfig``."""
    from xoron_dist.utils.typed_config import field_error

    video, tokens = cfg.model.video, cfg.data.video_tokens
    if not cfg.model.vision.enabled:
        raise field_error("model.video.frame_encoder", "tower", "runs every frame through the vision tower: set "
                          "model.vision.enabled: true, or model.video.frame_encoder: own")
    k = video.tokens_per_frame
    frames, rest = divmod(tokens, k)
    if rest or not video.min_frames <= frames <= video.max_frames:
        raise field_error("data.video_tokens", tokens,
                          f"a tower-mode video takes frames x model.video.tokens_per_frame ({k}) tokens, with "
                          f"frames in [model.video.min_frames, max_frames] = [{video.min_frames}, {video.max_frames}]:"
                          f" set it to a multiple of {k} in [{video.min_frames * k}, {video.max_frames * k}]")
    return frames


def tower_clip_sizes(cfg) -> tuple[int | None, int | None]:
    """``TowerVideoEncoder``'s ``(frames, span)`` for a ``XoronConfig``: without ``data.multiscale`` the fixed
    ``(tower_clip_frames(cfg), None)``; with it ``(None, data.video_tokens)``, the bucket's frame count T
    setting video_tokens / T tokens per frame, after checking every bucket count divides video_tokens."""
    from xoron_dist.utils.typed_config import field_error

    frames = tower_clip_frames(cfg)  # the tower and the default count are checked in any case
    buckets = cfg.data.multiscale
    if buckets is None:
        return frames, None
    tokens = cfg.data.video_tokens
    bad = [f for f in buckets.video_frames if tokens % f]
    if bad:
        divisors = [f for f in range(cfg.model.video.min_frames, cfg.model.video.max_frames + 1) if tokens % f == 0]
        raise field_error("data.multiscale.video_frames", buckets.video_frames,
                          f"in tower mode a clip of T frames takes data.video_tokens ({tokens}) / T tokens per frame, "
                          f"so T must divide {tokens}: {bad} do not; use counts from {divisors}")
    return None, tokens
