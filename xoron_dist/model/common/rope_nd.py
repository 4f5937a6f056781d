"""Axial N-D rotary position embedding: 2D over (row, col) for images, 3D over (t, row, col) for video.

RoFormer's rotation (Su et al. 2021) applied independently per axis, as in EVA-02 / Qwen2-VL's
"M-RoPE" / FiT: the head dimension is cut into ``axes`` equal chunks, chunk ``a`` is rotated by
the angle ``coord[a] * inv_freq`` where ``inv_freq_j = theta^(-2j / axis_dim)``.

Layout of one head (``head_dim`` = D, ``axes`` = A, ``axis_dim`` = 2·floor(D / 2A))::

    [ axis 0: pairs (x0,x1) (x2,x3) ... | axis 1: pairs ... | ... | pass-through (D - A·axis_dim) ]

Pairs are *interleaved* (x_{2i}, x_{2i+1}) and written back in place, so the layout of q and k
is unchanged. Dims left over when D is not a multiple of 2A are not rotated (they carry no
position). Because each pair is a 2D rotation by ``coord · freq``,

    <R(p) q, R(p') k> = <q, R(p' - p) k>

per pair, hence per head: attention scores depend only on the coordinate *offsets* p' - p,
never on absolute coordinates (the test shifts all coordinates and checks the scores).
Coordinates may be fractional (e.g. a patch grid rescaled to a reference resolution).
"""

from __future__ import annotations

import torch

from xoron_dist.model.common.rope import Fp32BufferModule


class AxialRoPE(Fp32BufferModule):
    """cos/sin tables for integer or fractional N-D coordinates; one instance per tower, shared by its layers.

    ``head_dim``: width of one attention head; ``axes``: 2 (images) or 3 (video); ``theta``: the
    base of the frequency ladder (100 for short patch grids up to 10000 for long ones). The
    frequencies stay fp32 whatever dtype the tower is cast to (``Fp32BufferModule``).
    """

    fp32_buffers = ("inv_freq",)

    def __init__(self, head_dim: int, axes: int, theta: float = 10000.0) -> None:
        super().__init__()
        if axes < 1:
            raise ValueError(f"axes = {axes}: must be at least 1")
        if head_dim < 2 * axes:
            raise ValueError(f"head_dim = {head_dim} is too small for {axes} rope axes: needs at least {2 * axes}")
        if theta <= 1:
            raise ValueError(f"theta = {theta}: must be > 1")
        self.head_dim, self.axes, self.theta = head_dim, axes, float(theta)
        self.axis_dim = 2 * (head_dim // (2 * axes))  # rotated dims per axis (even)
        self.rotary_dim = self.axis_dim * axes  # rotated dims per head; the rest pass through
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.axis_dim, 2, dtype=torch.float32) / self.axis_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (..., axes) -> cos, sin each (..., rotary_dim / 2), fp32.

        Entry ``a * axis_dim/2 + j`` is the angle of pair j of axis a: ``coords[..., a] * inv_freq[j]``.
        """
        if coords.shape[-1] != self.axes:
            raise ValueError(f"coords have {coords.shape[-1]} axes in their last dim; this rope has {self.axes}")
        angles = coords.float()[..., :, None] * self.inv_freq.to(coords.device)  # (..., axes, axis_dim/2)
        angles = angles.flatten(-2)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, axes={self.axes}, theta={self.theta}, rotary_dim={self.rotary_dim}"


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` (batch, heads, n, head_dim) pairwise.

    ``cos``/``sin``: (batch, n, pairs) or (n, pairs) from ``AxialRoPE`` (a head axis is inserted),
    or anything already broadcastable to (batch, heads, n, pairs). Computed in fp32, returned in
    ``x``'s dtype; dims beyond the rotary ones are returned unchanged.
    """
    pairs = cos.shape[-1]
    if 2 * pairs > x.shape[-1]:
        raise ValueError(f"rope rotates {2 * pairs} dims but x has head_dim {x.shape[-1]}")
    if cos.dim() == x.dim() - 1:
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    rot, rest = x[..., : 2 * pairs].float(), x[..., 2 * pairs:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def grid_coords(*sizes: int, device: torch.device | None = None) -> torch.Tensor:
    """Integer coordinates of a row-major grid: ``grid_coords(h, w)`` -> (h*w, 2) rows (y, x);
    ``grid_coords(t, h, w)`` -> (t*h*w, 3) rows (t, y, x)."""
    axes = torch.meshgrid(*[torch.arange(s, device=device) for s in sizes], indexing="ij")
    return torch.stack([a.flatten() for a in axes], dim=-1)
