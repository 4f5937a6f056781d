"""Sequence parallelism (ring attention inside the model): SP=2 and TP=2 x SP=2 equal one rank.

Every rank holds its zig-zag rows of the same batch; the loss is the sum over all ranks' tokens
divided by the global token count, and each weight's full gradient is the sum of the SP ranks'
gradients (what DeepSpeed's all-reduce over the sequence-data-parallel group gives).
"""

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.parallel.test_tensor_parallel import _cfg, load_sharded, tensor_parallel_llm
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel.tensor import tp_slice


def _batch(cfg, packed: bool):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 33), generator=gen)
    labels = ids[:, 1:].clone()
    labels[1, :6] = -100
    positions = torch.arange(32).expand(2, -1).clone()
    documents = None
    if packed:  # two documents in row 0: positions restart, the label at the boundary is masked
        documents = torch.zeros(2, 32, dtype=torch.long)
        documents[0, 13:] = 1
        positions[0, 13:] -= 13
        labels[0, 12] = -100
    return ids[:, :-1], labels, positions, documents


def _loss_and_grads(model, batch, split=None):
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel.sequence import zigzag_split

    ids, labels, positions, documents = batch
    if split is not None:
        rank, size = split
        ids, labels, positions = (zigzag_split(t, 1, rank, size) for t in (ids, labels, positions))
        documents = None if documents is None else zigzag_split(documents, 1, rank, size)
    out = model(ids, labels=labels, position_ids=positions, document_ids=documents)
    total = torch.tensor([float(out.num_tokens)])
    local_sum = out.loss * out.num_tokens
    if split is not None:
        torch.distributed.all_reduce(total, group=ps.get_context_parallel_group())
    (local_sum / total).backward()
    loss = local_sum.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if split is not None:
        torch.distributed.all_reduce(loss, group=ps.get_context_parallel_group())
        for grad in grads.values():
            torch.distributed.all_reduce(grad, group=ps.get_context_parallel_group())
    return (loss / total).item(), grads


def _sgd_losses(model, cfg, packed, split=None, steps=3):
    """3 SGD steps (lr large enough that a wrongly scaled gradient shows) on varied batches."""
    losses = []
    for step in range(steps):
        model.zero_grad()
        batch = _batch(cfg, packed)
        batch = (batch[0].roll(step, 1), batch[1].roll(step, 1), *batch[2:])
        loss, grads = _loss_and_grads(model, batch, split)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param -= 0.5 * grads[name]
        losses.append(loss)
    return losses


def _sp_body(overrides, packed, full_state):
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state

    cfg = _cfg(*overrides)
    state.initialize(cfg)
    model = tensor_parallel_llm(cfg)
    load_sharded(model, full_state)
    split = (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size())
    loss, grads = _loss_and_grads(model, _batch(cfg, packed), split)
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}
    model.zero_grad()
    losses = _sgd_losses(model, cfg, packed, split)
    return {"loss": loss, "grads": grads, "meta": meta, "tp_rank": ps.get_tensor_model_parallel_rank(),
            "tp": ps.get_tensor_model_parallel_world_size(), "sgd": losses}


@pytest.mark.multirank
@pytest.mark.parametrize(
    "world,overrides,packed",
    [
        pytest.param(2, ["parallel.sp=2"], False, id="sp2-latent"),
        pytest.param(2, ["parallel.sp=2", "parallel.ring_latent=false"], True, id="sp2-fullkv-packed"),
        pytest.param(2, ["parallel.sp=2"], True, id="sp2-latent-packed"),
        pytest.param(4, ["parallel.sp=2", "parallel.tp=2"], True, id="tp2xsp2"),
    ],
)
def test_sequence_parallel_equals_single_rank(world, overrides, packed):
    cfg = _cfg()
    torch.manual_seed(0)
    single = XoronLLM(cfg.llm)
    full_state = {k: v.clone() for k, v in single.state_dict().items()}
    ref_loss, ref_grads = _loss_and_grads(single, _batch(cfg, packed))
    single.zero_grad()
    ref_sgd = _sgd_losses(single, cfg, packed)
    for rank, out in enumerate(run_ranks(_sp_body, world, overrides, packed, full_state)):
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-5), (rank, out["loss"], ref_loss)
        assert out["sgd"] == pytest.approx(ref_sgd, rel=1e-5), (rank, out["sgd"], ref_sgd)
        for name, grad in out["grads"].items():
            split, dim, stride = out["meta"][name]
            ref = tp_slice(ref_grads[name], dim, stride, out["tp_rank"], out["tp"]) if split else ref_grads[name]
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=2e-6, msg=f"rank {rank} grad of {name}")
