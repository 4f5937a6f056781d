"""Activation checkpointing's host tape: a checkpointed block's recompute reuses its forward's host reads.

One process, a toy block whose forward reads the device once through ``host_read`` (as the expert exchange
and the ring do) and uses the value as a shape. Checked: the recompute does not call the read again and the
gradients are the plain block's; outside a checkpointed training call (no checkpointing, ``no_grad``) every
call reads; a second backward over a kept graph replays again; a recompute that goes another way (another
witness, another shape, an extra read) stops with an error that names the block, instead of using values
that do not fit; nothing is left on the tape stack after a call, failed or not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xoron_dist.parallel import checkpointing
from xoron_dist.parallel.checkpointing import apply_activation_checkpointing, host_read


class TopRows(nn.Module):
    """Keeps the rows whose score is positive (a data-dependent count, read on the host once)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.reads = 0
        self.extra_reads = 0  # > 0: the next forward reads that many more times (a forward that changed path)
        self.shift = 0  # added to the witness from the second call on (a recompute that routes differently)
        self.calls = 0

    def read(self, positive: torch.Tensor) -> int:
        self.reads += 1
        return int(positive.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.proj(x)
        positive = (h[:, 0] > 0).to(torch.int64)
        witness = positive.sum() + (self.shift if self.calls > 1 else 0)
        n = host_read(lambda: self.read(positive), witness=witness)
        for _ in range(self.extra_reads if self.calls > 1 else 0):
            host_read(lambda: self.read(positive), witness=witness)
        order = positive.argsort(descending=True, stable=True)[:n]  # the positive rows, no boolean mask
        return h[order].tanh().sum(0)


def _pair(seed: int = 0) -> tuple[TopRows, TopRows, torch.Tensor]:
    torch.manual_seed(seed)
    plain = TopRows()
    checkpointed = TopRows()
    checkpointed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(checkpointed, (TopRows,)) == 1
    return plain, checkpointed, torch.randn(16, 4)


def test_the_recompute_reuses_the_forward_read_and_gives_the_plain_gradients():
    plain, checkpointed, x = _pair()
    for block in (plain, checkpointed):
        block(x).square().sum().backward()
    assert plain.calls == 1 and checkpointed.calls == 2  # the checkpointed block ran again in backward...
    assert plain.reads == checkpointed.reads == 1  # ...without reading again
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    assert checkpointing._tapes() == []


def test_reads_every_call_outside_a_checkpointed_training_call():
    _, checkpointed, x = _pair()
    with torch.no_grad():
        checkpointed(x)
    checkpointed.eval()
    checkpointed(x).sum().backward()
    assert checkpointed.reads == 2 and checkpointed.calls == 2
    assert host_read(lambda: 7, witness=torch.zeros(())) == 7  # no block at all


def test_a_kept_graph_replays_for_each_backward():
    _, checkpointed, x = _pair()
    loss = checkpointed(x).square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in checkpointed.parameters()]
    loss.backward()
    assert checkpointed.reads == 1 and checkpointed.calls == 3
    for a, p in zip(first, checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * a)


@pytest.mark.parametrize(("change", "match"), [
    ({"shift": 1}, r"recompute of checkpointed TopRows differs from its forward at host read 1"),
    ({"extra_reads": 1}, r"recompute of checkpointed TopRows asked for host read 2, but its forward made only 1"),
])
def test_a_recompute_that_goes_another_way_stops(change, match):
    _, checkpointed, x = _pair()
    for name, value in change.items():
        setattr(checkpointed, name, value)
    loss = checkpointed(x).square().sum()
    with pytest.raises(RuntimeError, match=match):
        loss.backward()
    assert checkpointing._tapes() == []


def test_a_witness_of_another_shape_stops():
    calls = []

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            calls.append(1)
            host_read(lambda: 0, witness=torch.zeros(len(calls)))
            return (self.w * x).sum()

    block = Block()
    apply_activation_checkpointing(block, (Block,))
    loss = block(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"host read 1 with a witness of shape \(2,\); its forward had \(1,\)"):
        loss.backward()
