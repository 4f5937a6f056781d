"""Causal 3D convolution over (batch, channels, frames, height, width), and per-frame application of 2D layers.

``CausalConv3d`` pads only the past in time, with ``kernel_t - 1`` copies of the first frame, and
zeros in space (CogVideoX's ``CogVideoXCausalConv3d`` with ``pad_mode="constant"``, which equals it
with copied weights). Output frame j then reads input frames ``j·s - k_t + 1 .. j·s`` only (``s`` the
time stride), so no frame sees a later one.

Streaming: pass one ``ConvCache`` (a dict) through a network and feed the frames in chunks; each
layer keeps the tail of its padded input that the next output window still needs (the last
``k_t - 1`` frames at stride 1, what is left after the last window at stride 2), and chunked
output equals one-shot output. The first chunk pads with its first frame as the one-shot call does.

Images: a 4D input (batch, channels, height, width) is a one-frame video. All ``k_t`` taps then see
the same (replicated) frame, so the layer is the 2D convolution with the kernel summed over time:
``k_t`` times cheaper, and equal to the 5D call on one frame.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ConvCache = dict[nn.Module, torch.Tensor]


def per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame: (batch, C, T, H, W) -> (batch, C', T, H', W'); a 4D image goes straight in."""
    if x.dim() == 4:
        return fn(x)
    batch, channels, frames, height, width = x.shape
    y = fn(x.transpose(1, 2).reshape(batch * frames, channels, height, width))
    return y.reshape(batch, frames, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Module):
    """(batch, C_in, T, H, W) -> (batch, C_out, T', H', W'), causal in time (module docstring).

    ``kernel`` and ``stride`` are (t, h, w); the spatial padding is ``k // 2`` (odd kernels keep the size
    at stride 1). ``T' = (T - 1) // s_t + 1`` on a first call: frame 0 alone makes output 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.time_kernel, self.time_stride = kernel[0], stride[0]
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel, stride=stride, padding=(0, kernel[1] // 2, kernel[2] // 2)
        )

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(
                x, self.conv.weight.sum(2), self.conv.bias, stride=self.conv.stride[1:], padding=self.conv.padding[1:]
            )
        past = cache.get(self) if cache is not None else None
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1)
        padded = torch.cat([past, x], dim=2)
        out = self.conv(padded)
        if cache is not None:
            cache[self] = padded[:, :, out.shape[2] * self.time_stride :]
        return out

    @torch.no_grad()
    def init_last_tap_identity(self) -> None:
        """Weights that copy each window's last frame (channel c of every output group reads input channel c):
        a temporal down/upsampler starts as frame subsampling/repetition rather than noise."""
        out_channels, in_channels = self.conv.weight.shape[:2]
        self.conv.weight.zero_()
        self.conv.bias.zero_()
        eye = torch.eye(in_channels, dtype=self.conv.weight.dtype)
        for start in range(0, out_channels, in_channels):
            self.conv.weight[
                start : start + in_channels, :, -1, self.conv.weight.shape[3] // 2, self.conv.weight.shape[4] // 2
            ] = eye
