"""Pipelined expert dispatch (``train.ep_overlap_chunks``): the chunked all-to-all equals the unchunked one.

Two gloo ranks, each with its own tokens routed with a skew (experts 0 and 5 take most rows), so the
exchanges carry unequal row counts; rank 1 has fewer tokens than the largest chunk count, so some of its
chunks are empty while rank 0's are not. For 1, 2 and 4 chunks: the output, the input's gradient and every
local expert's gradient (forward + backward through the started/awaited exchanges) equal those of one
chunk (to fp32 rounding: see ``SAME``), and match the single-process stacked experts over each rank's
tokens. The whole dispatch reads the host once (the counts), whatever the chunk count. With 2 chunks the
experts of one chunk run while another chunk's exchange is in flight, in forward and in backward (where
the inverse exchanges run). Under activation checkpointing the recompute reads nothing: it reuses the
forward's counts (``parallel.checkpointing.host_read``), dropless and with a capacity alike, and the
gradients are those of the plain run.
"""

import pytest
import torch
from torch import nn

from tests.parallel.harness import run_ranks
from tests.parallel.test_expert_parallel import _routing

E, H, FFN, K = 8, 16, 12, 2  # experts, hidden, expert width, top-k (test_expert_parallel's, whose _routing this uses)
TOKENS = (13, 3)  # per rank: rank 1 has fewer tokens than chunks
CHUNKS = (1, 2, 4)
# Chunked vs one chunk: the same ops per token, equal up to fp32 rounding, not bit for bit: the BLAS picks its
# kernel by row count (an expert's 1-3 row products differ in the last bit from the same rows inside a larger
# matmul) and an expert's weight gradient sums its rows in one matmul per chunk, added up, instead of one.
SAME = {"rtol": 1e-6, "atol": 1e-6}


def _stacked(gate_up, down):
    from xoron_dist.model.common.moe import RoutedExperts

    experts = RoutedExperts(E, H, FFN)
    with torch.no_grad():
        experts.gate_up.copy_(gate_up)
        experts.down.copy_(down)
    return experts


class _Block(nn.Module):
    """The experts as a block that activation checkpointing can wrap."""

    def __init__(self, experts) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x, chosen, weights):
        return self.experts(x, chosen, weights)


def _checkpointed_vs_plain(split, x, chosen, weights, gate_up, down) -> dict[str, tuple]:
    """(output, input grad, expert grads, host syncs) of one forward + backward, plain and checkpointed."""
    from xoron_dist.parallel.checkpointing import apply_activation_checkpointing
    from xoron_dist.parallel.experts import build_expert_parallel_experts
    from xoron_dist.utils.host_syncs import HostSyncCounter

    runs = {}
    for name in ("plain", "checkpointed"):
        block = _Block(build_expert_parallel_experts(_stacked(gate_up, down), split))
        if name == "checkpointed":
            assert apply_activation_checkpointing(block, (_Block,)) == 1
        leaf = x.clone().requires_grad_()
        with HostSyncCounter() as syncs:
            out = block(leaf, chosen, weights)
            out.square().sum().backward()
        runs[name] = (out.detach(), leaf.grad, {n: p.grad for n, p in block.named_parameters()}, syncs.total)
    return runs


def _watch_exchanges(experts) -> dict[str, list[int]]:
    """Record, each time a local expert runs (forward, backward), how many exchanges are in flight: started
    (``_StartAllToAll.forward``, ``_WaitAllToAll.backward``) and not yet waited for (the other two)."""
    from xoron_dist.parallel import experts as ep

    seen, flight = {"forward": [], "backward": []}, [0]

    def wrap(cls, name, change):
        original = getattr(cls, name)

        def wrapped(ctx, *args):
            flight[0] += change
            return original(ctx, *args)

        setattr(cls, name, staticmethod(wrapped))

    wrap(ep._StartAllToAll, "forward", 1)
    wrap(ep._WaitAllToAll, "forward", -1)
    wrap(ep._WaitAllToAll, "backward", 1)
    wrap(ep._StartAllToAll, "backward", -1)
    for expert in experts.local_experts:
        expert.register_forward_hook(lambda *_: seen["forward"].append(flight[0]))
        expert.register_full_backward_hook(lambda *_: seen["backward"].append(flight[0]))
    return seen


def _chunked_body(xs, chosen, weights, gate_up, down):
    from dataclasses import replace

    from xoron_dist.config import load_config
    from xoron_dist.parallel import state
    from xoron_dist.parallel.experts import build_expert_parallel_experts, expert_split
    from xoron_dist.utils.host_syncs import HostSyncCounter

    cfg = load_config(None, ["preset=tiny", "parallel.ep=2"])
    ctx = state.initialize(cfg)
    results = {}
    for chunks in CHUNKS:
        experts = build_expert_parallel_experts(_stacked(gate_up, down), replace(expert_split(cfg),
                                                                                 overlap_chunks=chunks))
        x = xs[ctx.dp_rank].clone().requires_grad_()
        with HostSyncCounter() as syncs:
            out = experts(x, chosen[ctx.dp_rank], weights[ctx.dp_rank])
            out.square().sum().backward()
        grads = {n: p.grad for n, p in experts.named_parameters()}
        results[chunks] = (out.detach(), x.grad, grads, syncs.total)
    # The pipeline overlaps: with 2 chunks, experts run while exchanges travel, forward and backward.
    experts = build_expert_parallel_experts(_stacked(gate_up, down), replace(expert_split(cfg), overlap_chunks=2))
    overlap = _watch_exchanges(experts)
    experts(xs[ctx.dp_rank], chosen[ctx.dp_rank], weights[ctx.dp_rank]).square().sum().backward()
    mine = xs[ctx.dp_rank], chosen[ctx.dp_rank], weights[ctx.dp_rank], gate_up, down
    recompute = {"dropless": _checkpointed_vs_plain(replace(expert_split(cfg), overlap_chunks=2), *mine),
                 "capacity": _checkpointed_vs_plain(replace(expert_split(cfg), capacity_factor=1.0), *mine)}
    return results, experts.first_expert, overlap, recompute


@pytest.mark.multirank
def test_chunked_dispatch_equals_one_chunk_and_the_single_process_experts():
    xs, chosen, weights = _routing(3, TOKENS)
    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(E, 2 * FFN, H, generator=gen) * 0.2
    down = torch.randn(E, H, FFN, generator=gen) * 0.2
    results = run_ranks(_chunked_body, 2, xs, chosen, weights, gate_up, down)
    reference = _stacked(gate_up, down)  # every rank's tokens through the whole stack: experts' grads summed
    ref_outs, ref_x_grads = [], []
    for x, c, w in zip(xs, chosen, weights, strict=True):
        x = x.clone().requires_grad_()
        out = reference(x, c, w)
        out.square().sum().backward()
        ref_outs.append(out.detach())
        ref_x_grads.append(x.grad)
    for rank, (by_chunks, first, overlap, recompute) in enumerate(results):
        # one host read per layer (the exchanged counts; the kept rows with a capacity), and the recompute
        # reuses it (it used to read again): the plain run's count, and the plain run's numbers exactly
        for kind in ("dropless", "capacity"):
            plain, checkpointed = recompute[kind]["plain"], recompute[kind]["checkpointed"]
            assert plain[3] == checkpointed[3] == 1, (rank, kind, plain[3], checkpointed[3])
            torch.testing.assert_close(checkpointed[:3], plain[:3], rtol=0, atol=0, msg=f"rank {rank} {kind}")
        # expert calls (2 per local expert: one per chunk) that ran with an exchange in flight
        assert sum(n > 0 for n in overlap["forward"]) >= 4, overlap
        assert sum(n > 0 for n in overlap["backward"]) >= 4, overlap
        one_out, one_x_grad, one_grads, _ = by_chunks[1]
        for chunks, (out, x_grad, grads, syncs) in by_chunks.items():
            assert syncs == 1, (rank, chunks, syncs)  # the counts, read once per layer whatever the chunks
            torch.testing.assert_close(out, one_out, **SAME)
            torch.testing.assert_close(x_grad, one_x_grad, **SAME)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, one_grads[name], **SAME, msg=f"rank {rank} chunks {chunks} {name}")
        torch.testing.assert_close(one_out, ref_outs[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one_x_grad, ref_x_grads[rank], rtol=1e-5, atol=1e-6)
        for name, grad in one_grads.items():
            local, weight = name.split(".")[-2:]
            ref = getattr(reference, weight).grad[first + int(local)]
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_overlap_chunks_is_checked_and_leaves_the_config_hash_alone():
    from xoron_dist.config import load_config
    from xoron_dist.train.checkpoint import config_hash
    from xoron_dist.utils.typed_config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.ep_overlap_chunks.*must be > 0"):
        load_config(None, ["preset=tiny", "train.ep_overlap_chunks=0"])
    # an execution choice: a checkpoint written with one chunk count resumes with another
    assert config_hash(load_config(None, ["preset=tiny", "train.ep_overlap_chunks=4"])) == "4cd82170a206a87d"
