"""Monotonic Alignment Search (MAS): the most likely monotonic text -> frame alignment, and its likelihood.

Glow-TTS (Kim et al. 2020, arXiv 2005.11129, Algorithm 1) and VITS (Kim et al. 2021, arXiv 2106.06103)
align the ``t_text`` text tokens of an utterance to its ``t_frames`` latent frames by the path
A: frame j -> token A(j) that is monotonic (A(j) <= A(j+1) <= A(j) + 1), starts at token 0 and ends at
the last token (so every token gets at least one frame), and maximises sum_j L[A(j), j] for a per
(token, frame) log-likelihood L. The dynamic programme is

    Q[i, j] = L[i, j] + max(Q[i-1, j-1], Q[i, j-1]),   Q[0, 0] = L[0, 0],

then a backtrack from (t_text - 1, t_frames - 1). Its durations (frames per token) are the targets
of the duration predictor.

**No loop over frames.** Take the prefix sums S[i, j] = sum_{m<=j} L[i, m]. A path ending token i at
frame j started it at some frame k <= j, after token i-1 ended at k-1, so

    Q[i, j] = S[i, j] + max_{k<=j} (Q[i-1, k-1] - S[i, k-1])          (S[i, -1] = 0)

and the inner max is a running maximum along frames: one ``torch.cummax`` per text token, each over
(batch, t_frames) at once. Token 0 must start at frame 0 (its only candidate is k = 0 with value 0),
and token i >= 1 cannot start at frame 0. The backtrack is per token too: the start of token i is the
frame k that attains the running maximum at its end frame, and its end is the start of token i+1
minus one. Work is O(batch · t_text · t_frames) in t_text sequential steps.

**Ties** are broken as the glow-tts/VITS kernels (and the ``monotonic-alignment-search`` package) do:
going back from the last token, each token takes the *earliest* start among equal scores. The kernel
stays on the token while Q[i, j-1] >= Q[i-1, j-1]; unrolled, that moves to token i-1 only at the first
frame where the running maximum is reached. ``torch.cummax`` reports the last such frame, so we find
the first with a ``searchsorted`` on the (non-decreasing) running maxima.

**Numerics.** The search runs in float64 whatever the input dtype: with prefix sums, the score of a
token's span is a difference S[i, j] - S[i, k-1] of two large numbers: Gaussian log-likelihoods summed
over channels, early in training, reach 1e3-1e4 per entry and 1e7 over thousands of frames, where float32
steps are whole units. Unreachable states are -inf, used consistently (no -1e9 "max_neg_val", which long sums can
exceed); finite inputs are required in the valid region for the same reason (-inf - -inf is nan).

**Gradients.** MAS gives a hard path and runs under ``torch.no_grad``; the model is trained through
the likelihood the path selects (e.g. ``(path * log_likelihood).sum()``, or the prior expanded by the
path), as in Glow-TTS. MAS on raw dot products collapses onto a few tokens (glow-tts#67): search
over a real per-token likelihood such as ``gaussian_log_likelihood``.
"""

from __future__ import annotations

import math

import torch

from xoron_dist.utils.host_syncs import on_host


def alignment_mask(text_lengths: torch.Tensor, frame_lengths: torch.Tensor, t_text: int | None = None,
                   t_frames: int | None = None) -> torch.Tensor:
    """The (batch, t_text, t_frames) bool mask MAS expects: token i < text_lengths[b] and frame j < frame_lengths[b].

    ``text_lengths``, ``frame_lengths``: (batch,) integer tensors; ``t_text``/``t_frames`` default to
    their maxima (pass the padded sizes when the batch is padded further).
    """
    t_text = int(text_lengths.max()) if t_text is None else t_text
    t_frames = int(frame_lengths.max()) if t_frames is None else t_frames
    tokens = torch.arange(t_text, device=text_lengths.device) < text_lengths[:, None]  # (batch, t_text)
    frames = torch.arange(t_frames, device=frame_lengths.device) < frame_lengths[:, None]  # (batch, t_frames)
    return tokens[:, :, None] & frames[:, None, :]


def _lengths(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and frame lengths (batch,) of a rectangular ``alignment_mask``; raises if it is not one (checked
    on the mask's host copy when it keeps one: ``SpeechGenerator.forward``'s does)."""
    on_host(_check_rectangle, mask)
    return mask[:, :, 0].sum(-1), mask[:, 0, :].sum(-1)


def _check_rectangle(mask: torch.Tensor) -> None:
    text_lengths, frame_lengths = mask[:, :, 0].sum(-1), mask[:, 0, :].sum(-1)
    rectangle = alignment_mask(text_lengths, frame_lengths, mask.shape[1], mask.shape[2])
    if not torch.equal(mask, rectangle):
        row = int((mask != rectangle).flatten(1).any(-1).nonzero()[0])
        raise ValueError(f"mask row {row} is not a (text prefix) x (frame prefix) rectangle: MAS reads each row's "
                         "lengths from it and needs padding after the valid tokens and frames; build it with "
                         "alignment_mask(text_lengths, frame_lengths) or "
                         "text_mask[:, :, None] & frame_mask[:, None, :]")
    too_long = text_lengths > frame_lengths
    if too_long.any():
        row = int(too_long.nonzero()[0])
        raise ValueError(f"batch row {row} has {int(text_lengths[row])} text tokens but only "
                         f"{int(frame_lengths[row])} frames: MAS gives every token at least one frame, so it needs "
                         "text tokens <= frames (the monotonic-alignment-search kernel reads out of bounds here). "
                         "Drop or re-cut such clips before batching, or use a higher latent frame rate")


def _prefix_sums(log_likelihood: torch.Tensor, mask: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """S[i, b, j] = sum_{m<=j} L[b, i, m] over the valid entries: float64 (t_text, batch, t_frames).

    Token-major so that each token's (batch, t_frames) slice is contiguous for cummax and searchsorted.
    Raises if L is not finite inside ``mask``: a row's total S[i, b, -1] is finite exactly when all its
    (zero-padded) entries are, so one look at the totals replaces a full ``isfinite`` pass. Without
    ``check_finite`` non-finite entries become finite (nan 0, inf ±1e4): the search runs and the path is some
    valid alignment.
    """
    batch, t_text, t_frames = log_likelihood.shape
    prefix = torch.empty(t_text, batch, t_frames, dtype=torch.float64, device=log_likelihood.device)
    scores = log_likelihood.transpose(0, 1)
    if not check_finite:
        scores = scores.nan_to_num(nan=0.0, posinf=1e4, neginf=-1e4)
    prefix.copy_(scores).masked_fill_(~mask.transpose(0, 1), 0.0).cumsum_(-1)
    if not check_finite:
        return prefix
    finite = torch.isfinite(prefix[:, :, -1]).all(0)  # (batch,)
    if not finite.all():
        raise ValueError(f"log_likelihood of batch row {int((~finite).nonzero()[0])} has inf/nan (or sums past "
                         "float64) inside the mask; MAS needs finite scores there: clamp them, e.g. "
                         "log_likelihood.clamp(min=-1e4)")
    return prefix


def _running_best_starts(prefix: torch.Tensor) -> torch.Tensor:
    """Forward pass: best[i, b, j] = max_{k<=j} (Q[i-1, k-1] - S[i, k-1]), float64 (t_text, batch, t_frames).

    ``prefix``: S from ``_prefix_sums``, overwritten token by token with ``best`` (S[i] is not needed once
    Q[i] = S[i] + best[i] is known), which halves the memory. Token 0 may only start at frame 0, with
    nothing before it (best[0] = 0, Q[0] = S[0]); token i >= 1 starts at a frame k >= 1 after token i-1
    ended at k-1 (its candidate at k = 0 is -inf).
    """
    t_text, batch, t_frames = prefix.shape
    score = prefix[0].clone()  # Q[i-1, b, :]
    prefix[0] = 0.0
    candidates = torch.full_like(score, -math.inf)
    best = torch.empty_like(score)
    indices = torch.empty(batch, t_frames, dtype=torch.long, device=prefix.device)  # cummax's, unused
    for i in range(1, t_text):
        torch.sub(score[:, :-1], prefix[i, :, :-1], out=candidates[:, 1:])
        torch.cummax(candidates, dim=-1, out=(best, indices))
        torch.add(prefix[i], best, out=score)
        prefix[i] = best
    return prefix


def _token_starts(best: torch.Tensor, text_lengths: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
    """Backtrack: the first frame of every token (batch, t_text) long, non-decreasing along tokens.

    ``best``: (t_text, batch, t_frames) from ``_running_best_starts``. Token i ending at frame e starts
    at the first frame where the running maximum best[i, b, :] reaches best[i, b, e] (earliest start on
    ties). Padded tokens (i >= text length) take no frames: they start at the frame length.
    """
    t_text, batch, t_frames = best.shape
    present = torch.arange(t_text, device=best.device)[:, None] < text_lengths  # (t_text, batch)
    starts = torch.empty(batch, t_text, dtype=torch.long, device=best.device)
    end = (frame_lengths - 1).clamp(min=0)[:, None]  # (batch, 1): the last token ends at the last valid frame
    for i in reversed(range(t_text)):
        start = torch.searchsorted(best[i], best[i].gather(1, end))  # (batch, 1)
        start = torch.where(present[i, :, None], start, end + 1)
        starts[:, i] = start[:, 0]
        end = start - 1
    return starts


@torch.no_grad()
def maximum_path(log_likelihood: torch.Tensor, mask: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """The most likely monotonic, surjective alignment of text tokens to frames (Glow-TTS Algorithm 1).

    Args:
        log_likelihood: (batch, t_text, t_frames) float, L[b, i, j] = log p(frame j | token i); must be
            finite where ``mask`` is set (values elsewhere are ignored).
        mask: (batch, t_text, t_frames) bool (or 0/1), the rectangle token < text length and frame < frame
            length of each row (``alignment_mask``); rows may have different lengths, and an empty row
            gives an empty path.
        check_finite: raise on a non-finite log-likelihood inside the mask (a read of the device). Off, such
            entries are made finite and the path is some valid alignment: for a caller whose loss then
            turns non-finite anyway (``SpeechGenerator.forward``: the trainer's numerics guard skips the step).

    Returns:
        path (batch, t_text, t_frames), 0/1 in ``log_likelihood``'s dtype: every valid frame has exactly
        one token, tokens advance by at most one per frame, every valid token has >= 1 frame, and masked
        entries are 0. No gradient (see the module docstring).

    Raises:
        ValueError: on a shape mismatch, a non-rectangular mask, a row with more tokens than frames, or a
            non-finite log-likelihood inside the mask (with ``check_finite``).
    """
    if log_likelihood.dim() != 3 or mask.shape != log_likelihood.shape or 0 in log_likelihood.shape[1:]:
        raise ValueError(f"log_likelihood and mask must both be (batch, t_text, t_frames) with t_text, t_frames >= 1; "
                         f"got {tuple(log_likelihood.shape)} and {tuple(mask.shape)}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    text_lengths, frame_lengths = _lengths(mask)
    best = _running_best_starts(_prefix_sums(log_likelihood, mask, check_finite))
    starts = _token_starts(best, text_lengths, frame_lengths)  # (batch, t_text)
    batch, t_text, t_frames = log_likelihood.shape
    frames = torch.arange(t_frames, device=mask.device).expand(batch, t_frames).contiguous()
    token_of_frame = torch.searchsorted(starts, frames, right=True) - 1  # (batch, t_frames); -1 in empty rows
    valid_frame = (frames < frame_lengths[:, None]).to(log_likelihood.dtype)
    path = torch.zeros_like(log_likelihood, memory_format=torch.contiguous_format)
    return path.scatter_(1, token_of_frame.clamp(min=0)[:, None, :], valid_frame[:, None, :])


def durations(path: torch.Tensor) -> torch.Tensor:
    """Frames per token (batch, t_text) long from a (batch, t_text, t_frames) 0/1 path (0 for padded tokens)."""
    return (path != 0).sum(-1)  # counted as integers: a bf16 sum would round durations above 256


def gaussian_log_likelihood(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z_j; mean_i, diag(exp(log_std_i))^2) summed over channels, for every (token i, frame j).

    The Glow-TTS prior likelihood log N(z_j; mu_A(j), sigma_A(j)) that MAS maximises over alignments A
    (Kim et al. 2020, arXiv 2005.11129; glow-tts ``models.py``, glow-tts#72), expanded into four terms so
    that no (t_text, t_frames, channels) tensor is built:

        log N = sum_c [-log sqrt(2 pi) - log s_ic]      (per token)
              - 1/2 sum_c z_jc^2 / s_ic^2                (matmul of 1/s^2 with z^2)
              + sum_c m_ic z_jc / s_ic^2                 (matmul of m/s^2 with z)
              - 1/2 sum_c m_ic^2 / s_ic^2                (per token)

    Computed in at least float32 (the expansion cancels large terms; bf16 would lose the result).

    Args:
        z: (batch, t_frames, channels) latent frames.
        mean, log_std: (batch, t_text, channels) the prior's per-token mean and log standard deviation.

    Returns:
        (batch, t_text, t_frames) log-likelihoods in the promoted float dtype (float32 or float64); padded
        tokens and frames give finite garbage that ``maximum_path``'s mask ignores.
    """
    if z.dim() != 3 or mean.dim() != 3 or mean.shape != log_std.shape:
        raise ValueError(f"z must be (batch, t_frames, channels) and mean, log_std (batch, t_text, channels) alike; "
                         f"got z {tuple(z.shape)}, mean {tuple(mean.shape)}, log_std {tuple(log_std.shape)}")
    if z.shape[0] != mean.shape[0] or z.shape[2] != mean.shape[2]:
        raise ValueError(f"z {tuple(z.shape)} and mean {tuple(mean.shape)} must agree in batch and channels")
    dtype = torch.promote_types(torch.promote_types(z.dtype, mean.dtype), torch.float32)
    z, mean, log_std = z.to(dtype), mean.to(dtype), log_std.to(dtype)
    inv_var = torch.exp(-2.0 * log_std)  # (batch, t_text, channels)
    token_terms = (-0.5 * math.log(2 * math.pi) - log_std - 0.5 * mean.square() * inv_var).sum(-1, keepdim=True)
    z_t = z.transpose(1, 2)  # (batch, channels, t_frames)
    quadratic = torch.bmm(inv_var, -0.5 * z_t.square())  # (batch, t_text, t_frames)
    cross = torch.bmm(mean * inv_var, z_t)
    return token_terms + quadratic + cross
