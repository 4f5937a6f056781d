"""Monotonic Alignment Search: exhaustive search, the monotonic-alignment-search package, path properties,
the Gaussian likelihood, and duration recovery on synthetic speech latents."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from xoron_dist.model.speech.alignment import alignment_mask, durations, gaussian_log_likelihood, maximum_path

mas_package = pytest.importorskip("monotonic_alignment_search")


def exhaustive_best(log_likelihood: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Best score and path of one (t_text, t_frames) matrix, trying every split of the frames into t_text spans."""
    t_text, t_frames = log_likelihood.shape
    best_score, best_path = -math.inf, None
    for cuts in itertools.combinations(range(1, t_frames), t_text - 1):
        bounds = (0, *cuts, t_frames)
        path = torch.zeros(t_text, t_frames, dtype=log_likelihood.dtype)
        for token in range(t_text):
            path[token, bounds[token]:bounds[token + 1]] = 1
        score = float((path * log_likelihood).sum())
        if score > best_score:
            best_score, best_path = score, path
    return best_score, best_path


def ragged_batch(seed: int, batch: int, max_text: int, max_extra_frames: int, pad: int = 2):
    """Random (log_likelihood, mask) with text <= frames per row, padded beyond the longest row by ``pad``;
    the padding holds huge values, which MAS must ignore."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, max_text + 1, (batch,), generator=gen)
    frames = text + torch.randint(0, max_extra_frames + 1, (batch,), generator=gen)
    mask = alignment_mask(text, frames, int(text.max()) + pad, int(frames.max()) + pad)
    value = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    return value.masked_fill(~mask, 1e6), mask


def assert_valid_path(path: torch.Tensor, mask: torch.Tensor) -> None:
    assert ((path == 0) | (path == 1)).all()
    assert (path[~mask] == 0).all(), "masked entries must stay 0"
    text_lengths, frame_lengths = mask.any(-1).sum(-1), mask.any(-2).sum(-1)
    for b in range(path.shape[0]):
        rows = path[b, : text_lengths[b], : frame_lengths[b]]
        assert (rows.sum(0) == 1).all(), "every valid frame has exactly one token"
        assert (rows.sum(1) >= 1).all(), "every valid token has at least one frame"
        token = rows.argmax(0)
        steps = token.diff()
        assert ((steps == 0) | (steps == 1)).all() and token[0] == 0, "monotonic, starting at token 0"


@pytest.mark.parametrize("seed", range(4))
def test_equals_exhaustive_search(seed):
    gen = torch.Generator().manual_seed(seed)
    for t_text in range(1, 5):
        for t_frames in range(t_text, 10):
            value = torch.randn(1, t_text, t_frames, generator=gen, dtype=torch.float64)
            path = maximum_path(value, torch.ones_like(value, dtype=torch.bool))
            score, expected = exhaustive_best(value[0])
            assert torch.equal(path[0], expected), (t_text, t_frames)
            assert float((path * value).sum()) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_equals_exhaustive_search_with_padding(seed):
    value, mask = ragged_batch(seed, batch=6, max_text=4, max_extra_frames=5)
    before = value.clone()
    path = maximum_path(value, mask)
    assert torch.equal(value, before), "the input must not be modified"
    assert_valid_path(path, mask)
    for b in range(value.shape[0]):
        t_text, t_frames = int(mask[b].any(-1).sum()), int(mask[b].any(-2).sum())
        score, expected = exhaustive_best(value[b, :t_text, :t_frames])
        assert torch.equal(path[b, :t_text, :t_frames], expected)
        assert float((path[b] * value[b].masked_fill(~mask[b], 0)).sum()) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_equals_package_on_ragged_batches(seed):
    value, mask = ragged_batch(seed, batch=8, max_text=40, max_extra_frames=200, pad=0)
    value = value.float()  # the package computes in float32
    path = maximum_path(value, mask)
    assert_valid_path(path, mask)
    for implementation in ("cython", "numpy"):
        theirs = mas_package.maximum_path(value, mask.float(), implementation=implementation)
        assert torch.equal(path, theirs), implementation


def test_ties_broken_as_the_package():
    """Integer scores make ties common and every sum exact: the package's tie rule (earliest start) holds."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, 12, (16,), generator=gen)
    mask = alignment_mask(text, text + torch.randint(0, 30, (16,), generator=gen))
    value = torch.randint(-2, 3, mask.shape, generator=gen).float()
    path = maximum_path(value, mask)
    for implementation in ("cython", "numpy"):
        assert torch.equal(path, mas_package.maximum_path(value, mask.float(), implementation=implementation))


def test_huge_sums_keep_the_path():
    """Every path covers each frame once, so adding c to all scores adds c * t_frames to every path: the path is
    unchanged. With c = -1e7 the sums reach -1e10, past any -1e9 "impossible" sentinel."""
    gen = torch.Generator().manual_seed(0)
    value = torch.randint(-8, 9, (2, 6, 1000), generator=gen).double() / 4  # exact in float64, shifted or not
    mask = alignment_mask(torch.tensor([6, 4]), torch.tensor([1000, 700]))
    assert torch.equal(maximum_path(value - 1e7, mask), maximum_path(value, mask))


def test_dtype_no_grad_and_durations():
    value, mask = ragged_batch(1, batch=3, max_text=5, max_extra_frames=6)
    value = value.float().requires_grad_()
    path = maximum_path(value, mask)
    assert path.dtype == torch.float32 and not path.requires_grad
    (path * value).sum().backward()  # the gradient reaches the selected likelihood only
    assert torch.equal(value.grad, path)
    assert maximum_path(value.detach().bfloat16(), mask).dtype == torch.bfloat16
    lengths = durations(path)
    assert lengths.dtype == torch.long
    assert torch.equal(lengths.sum(-1), mask.any(-2).sum(-1))
    assert torch.equal(lengths > 0, mask.any(-1))
    assert durations(torch.ones(1, 1, 257, dtype=torch.bfloat16)).item() == 257  # 257 is not a bf16 number


def test_empty_row_gives_empty_path():
    mask = alignment_mask(torch.tensor([3, 0]), torch.tensor([5, 0]), 3, 5)
    path = maximum_path(torch.randn(2, 3, 5), mask)
    assert path[1].sum() == 0 and path[0].sum() == 5


def test_more_tokens_than_frames_is_refused():
    mask = alignment_mask(torch.tensor([2, 5]), torch.tensor([4, 3]), 5, 4)
    with pytest.raises(ValueError, match=r"batch row 1 has 5 text tokens but only 3 frames.*Drop or re-cut"):
        maximum_path(torch.randn(2, 5, 4), mask)


def test_bad_masks_and_scores_are_refused():
    mask = alignment_mask(torch.tensor([3]), torch.tensor([5]))
    holed = mask.clone()
    holed[0, 1, 2] = False
    with pytest.raises(ValueError, match=r"mask row 0 is not a .* rectangle.*alignment_mask"):
        maximum_path(torch.randn(1, 3, 5), holed)
    value = torch.randn(1, 3, 5)
    value[0, 2, 4] = -math.inf
    with pytest.raises(ValueError, match=r"batch row 0 has inf/nan .*inside the mask.*clamp"):
        maximum_path(value, mask)
    with pytest.raises(ValueError, match=r"must both be \(batch, t_text, t_frames\)"):
        maximum_path(torch.randn(3, 5), mask[0])


def test_gaussian_log_likelihood_equals_direct_formula():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 5, generator=gen)
    mean = torch.randn(2, 4, 5, generator=gen)
    log_std = 0.3 * torch.randn(2, 4, 5, generator=gen)
    ours = gaussian_log_likelihood(z, mean, log_std)
    assert ours.shape == (2, 4, 7) and ours.dtype == torch.float32
    direct = torch.distributions.Normal(mean[:, :, None].double(), log_std[:, :, None].double().exp())
    expected = direct.log_prob(z[:, None].double()).sum(-1)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-4)
    assert gaussian_log_likelihood(z.bfloat16(), mean.bfloat16(), log_std.bfloat16()).dtype == torch.float32


def test_mas_recovers_known_durations():
    """Frames drawn from per-token Gaussians for known durations: MAS over the Gaussian likelihood returns them."""
    gen = torch.Generator().manual_seed(0)
    batch, t_text, channels = 4, 12, 16
    text = torch.tensor([12, 9, 5, 12])
    true = torch.randint(1, 9, (batch, t_text), generator=gen) * (torch.arange(t_text) < text[:, None])
    frames = true.sum(-1)
    mean = torch.randn(batch, t_text, channels, generator=gen)
    log_std = torch.log(0.2 + 0.3 * torch.rand(batch, t_text, 1, generator=gen)).expand(-1, -1, channels)
    z = torch.zeros(batch, int(frames.max()), channels)
    for b in range(batch):
        token = torch.repeat_interleave(torch.arange(t_text), true[b])
        z[b, : len(token)] = mean[b, token] + log_std[b, token].exp() * torch.randn(len(token), channels, generator=gen)
    mask = alignment_mask(text, frames, t_text, z.shape[1])
    path = maximum_path(gaussian_log_likelihood(z, mean, log_std), mask)
    assert torch.equal(durations(path), true)


def test_the_mask_checks_read_its_host_copy():
    """A mask derived from masks the host knows (as ``SpeechGenerator.forward`` makes it) is checked on its
    host copy: the only read left is the log-likelihood's finite check, and a bad mask is still refused."""
    from xoron_dist.utils.host_syncs import HostSyncCounter, keep_host_copy, prefix_mask, with_host_copy

    text, frames = prefix_mask([2, 3], 3, "cpu"), prefix_mask([4, 3], 5, "cpu")
    mask = with_host_copy(lambda t, f: alignment_mask(t.sum(1), f.sum(1), t.shape[1], f.shape[1]), text, frames)
    value = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as syncs:
        path = maximum_path(value, mask)
    assert syncs.calls == {"__bool__": 1}, syncs.calls
    assert torch.equal(path, maximum_path(value, mask.clone()))  # the same path from a mask read on the device
    with HostSyncCounter() as syncs:
        maximum_path(value, mask.clone())
    assert syncs.calls == {"equal": 1, "__bool__": 2}, syncs.calls
    holed = mask.clone()
    holed[1, 1, 2] = False
    keep_host_copy(holed, holed)
    with pytest.raises(ValueError, match=r"mask row 1 is not a .* rectangle"):
        maximum_path(value, holed)


def test_without_the_finite_check_a_non_finite_score_still_gives_a_valid_path():
    value, mask = ragged_batch(3, batch=3, max_text=4, max_extra_frames=3)
    torch.testing.assert_close(maximum_path(value, mask, check_finite=False), maximum_path(value, mask))
    value[0, 0, 0], value[1, 1, 1], value[2, 0, 1] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match="inf/nan"):
        maximum_path(value, mask)
    assert_valid_path(maximum_path(value, mask, check_finite=False), mask)
