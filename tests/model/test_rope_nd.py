"""Axial N-D rope: scores depend only on coordinate offsets; layout and pass-through dims."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.model.common.rope_nd import AxialRoPE, apply_axial_rope, grid_coords


def _scores(rope: AxialRoPE, q: torch.Tensor, k: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    cos, sin = rope(coords)
    return apply_axial_rope(q, cos, sin) @ apply_axial_rope(k, cos, sin).transpose(-1, -2)


@pytest.mark.parametrize("axes,head_dim", [(2, 16), (3, 24), (3, 20), (2, 18)])
def test_scores_depend_only_on_offsets(axes: int, head_dim: int) -> None:
    torch.manual_seed(0)
    rope = AxialRoPE(head_dim, axes, theta=100.0)
    sizes = (3, 4, 5)[-axes:]
    coords = grid_coords(*sizes)  # (n, axes)
    n = coords.shape[0]
    q, k = torch.randn(2, 3, n, head_dim), torch.randn(2, 3, n, head_dim)
    base = _scores(rope, q, k, coords)
    shift = torch.tensor([7, -3, 11][:axes])
    torch.testing.assert_close(_scores(rope, q, k, coords + shift), base, atol=1e-4, rtol=1e-4)
    # Per-batch coordinates (batch, n, axes) broadcast the same way.
    shifted = torch.stack([coords, coords + shift])
    torch.testing.assert_close(_scores(rope, q, k, shifted), base, atol=1e-4, rtol=1e-4)
    # The position is really encoded: moving one axis of only the keys changes the scores.
    cos_q, sin_q = rope(coords)
    for axis in range(axes):
        moved = coords.clone()
        moved[:, axis] += 1
        cos_k, sin_k = rope(moved)
        other = apply_axial_rope(q, cos_q, sin_q) @ apply_axial_rope(k, cos_k, sin_k).transpose(-1, -2)
        assert (other - base).abs().max() > 1e-2, f"axis {axis} carries no position"


def test_layout_and_pass_through() -> None:
    rope = AxialRoPE(head_dim=20, axes=3, theta=10000.0)
    assert (rope.axis_dim, rope.rotary_dim) == (6, 18)
    x = torch.randn(1, 2, 4, 20, dtype=torch.float64)
    cos, sin = rope(grid_coords(1, 2, 2))
    assert cos.shape == (4, 9)
    out = apply_axial_rope(x, cos, sin)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out[..., 18:], x[..., 18:])  # pass-through dims untouched
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    # Pair j of axis a turns by coords[a] * theta^(-2j/axis_dim): check one entry by hand.
    coords = torch.tensor([[0, 3, 0]])
    c, s = rope(coords)
    angle = 3 * 10000.0 ** (-2 / 6)
    torch.testing.assert_close(c[0, 3 + 1], torch.tensor(angle).cos())
    torch.testing.assert_close(s[0, 0], torch.tensor(0.0))


def test_errors() -> None:
    with pytest.raises(ValueError, match="too small"):
        AxialRoPE(4, 3)
    rope = AxialRoPE(16, 2)
    with pytest.raises(ValueError, match="axes"):
        rope(torch.zeros(4, 3))
    cos, sin = rope(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="head_dim"):
        apply_axial_rope(torch.zeros(1, 1, 4, 8), cos, sin)


def test_frequencies_stay_fp32_after_a_bf16_cast() -> None:
    rope = AxialRoPE(64, 3, theta=10000.0)
    coords = grid_coords(4, 64, 64).float() * 16  # large coordinates: where rounded frequencies show
    cos, sin = rope(coords)
    torch.nn.Sequential(rope).to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    cos_after, sin_after = rope(coords)
    assert torch.equal(cos_after, cos) and torch.equal(sin_after, sin)
