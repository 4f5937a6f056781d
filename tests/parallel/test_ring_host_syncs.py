"""Ring attention asks the host for a small fixed number of values per layer, however many tiles it runs.

The tile plan (which (query half, key half) pairs to skip, run whole, run with the kernel's causal
mask, or run with an explicit mask) is made once per layer call and reused by the backward:

- zig-zag rows without documents: from the layout alone (no read beyond the input check's one);
- packed documents (or rows in another order): the plan of every tile of every ring step comes
  from one device computation, read back once.

Counted with ``HostSyncCounter`` on 2 gloo ranks (SP=2 and, in subgroups of one, SP=1: 8 and 4
tiles per layer call). Before this plan the ring read 4-7 values per tile, forward and backward.
Under activation checkpointing (a block around the ring call), the recompute in backward reads nothing
either: it reuses the forward's reads (``parallel.checkpointing.host_read``), and the gradients are the
plain call's. The single-rank test checks the layout plan against the data plan tile by tile.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.parallel.harness import run_ranks
from xoron_dist.parallel import ring_attention as ra
from xoron_dist.parallel.sequence import zigzag_positions, zigzag_split
from xoron_dist.utils.host_syncs import HostSyncCounter


class _Call(nn.Module):
    """A ring call as a block that activation checkpointing can wrap."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _count(group, packed: bool, latent: bool, checkpointed: bool = False) -> dict:
    rank, sp = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(5)
    b, s, h, d = 2, 16, 2, 4
    q, k, v = (zigzag_split(t, 1, rank, sp).requires_grad_() for t in torch.randn(3, b, s, h, d, generator=gen))
    docs = None
    if packed:
        docs = zigzag_split(torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7]), 1, rank, sp)
    kw = {"group": group, "scale": 0.5, "positions": zigzag_positions(s, rank, sp)[None], "document_ids": docs}
    if checkpointed:
        from xoron_dist.parallel.checkpointing import apply_activation_checkpointing

        block = _Call(lambda q, k, v: ra.ring_attention(q, k, v, **kw))
        assert apply_activation_checkpointing(block, (_Call,)) == 1
        with HostSyncCounter() as fwd:
            out = block(q, k, v)
        with HostSyncCounter() as bwd:
            out.square().sum().backward()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        plain = ra.ring_attention(*leaves, **kw)
        plain.square().sum().backward()
        return {"forward": dict(fwd.calls), "backward": dict(bwd.calls),
                "out": ([out.detach(), q.grad, k.grad, v.grad], [plain.detach(), *(t.grad for t in leaves)])}
    with HostSyncCounter() as fwd:
        if latent:
            latent_in = k[..., 0, :].detach().requires_grad_()
            weight = torch.randn(h * (d // 2 + d), d, generator=gen, requires_grad=True)
            out = ra.ring_attention_latent(q[..., : d // 2], q[..., d // 2 :], latent_in, latent_in[..., : d // 2],
                                           weight, num_heads=h, nope_dim=d // 2, v_dim=d, **kw)
        else:
            out = ra.ring_attention(q, k, v, **kw)
    with HostSyncCounter() as bwd:  # the counter sees the ring's backward, which autograd runs
        out.square().sum().backward()
    return {"forward": dict(fwd.calls), "backward": dict(bwd.calls)}


def _body() -> dict:
    dist.init_process_group("gloo")
    solo = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    counts = {f"sp={dist.get_world_size(group)},packed={packed},latent={latent}": _count(group, packed, latent)
              for group in (None, solo) for packed in (False, True) for latent in (False, True)}
    counts |= {f"sp=2,packed={packed},checkpointed": _count(None, packed, False, checkpointed=True)
               for packed in (False, True)}
    return counts


@pytest.mark.multirank
def test_ring_reads_the_host_once_per_layer_call_unpacked_and_twice_packed():
    ranks = run_ranks(_body, 2, timeout=120)
    for rank, result in enumerate(ranks):
        for case, calls in result.items():
            # one read of the gathered input check; packed documents add one read of the whole tile plan
            expected = {"tolist": 2 if "packed=True" in case else 1}
            if "checkpointed" in case:  # the recompute in backward reuses the forward's reads
                out, plain = calls.pop("out")
                torch.testing.assert_close(out, plain, rtol=0, atol=0, msg=f"rank {rank} {case}")
            assert calls == {"forward": expected, "backward": {}}, f"rank {rank} {case}: {calls}"


@pytest.mark.parametrize("sp", [1, 2, 3, 4, 8])
def test_the_zigzag_layout_plan_is_the_plan_the_positions_give(sp):
    for chunk in (3, 1):
        seq = 2 * sp * chunk
        metas = [zigzag_positions(seq, rank, sp)[None, None] for rank in range(sp)]
        for rank in range(sp):
            layout = ra._zigzag_plans(rank, sp, seq // sp)
            data = [ra._plan(metas[rank], metas[(rank - step) % sp], True) for step in range(sp)]
            strip = [[[(t.rows, t.cols, t.causal, t.metas is None) for t in group] for group in plan]
                     for plan in layout]
            assert strip == [[[(t.rows, t.cols, t.causal, t.metas is None) for t in group] for group in plan]
                             for plan in data], f"sp={sp} rank={rank} chunk={chunk}"
