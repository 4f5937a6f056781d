"""The model-parallel paths keep every tensor on the training device: 2 gloo ranks run the tiny text model's
forward and backward under tensor, sequence (ring attention over packed documents) and expert parallelism
(the dropless all-to-all, chunked to overlap) on the stand-in accelerator (tests/model/device_standin.py),
where a host tensor mixed into device tensors raises as on a GPU, and each rank's loss and gradients equal
the same rank's CPU run. (That the CPU runs equal one rank is each layout's own test.)
"""

from __future__ import annotations

import pytest
import torch

from tests.model.device_standin import ACCEL, OnAccel, standin_accelerator
from tests.parallel.harness import run_ranks

pytestmark = pytest.mark.multirank


def _batch(vocab: int, device) -> dict:
    """Two rows of 32 tokens; row 0 packs two documents (positions restart at 13, the boundary label masked)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (2, 33), generator=gen)
    labels = ids[:, 1:].clone()
    labels[1, :6] = -100
    labels[0, 12] = -100
    positions = torch.arange(32).expand(2, -1).clone()
    positions[0, 13:] -= 13
    documents = torch.zeros(2, 32, dtype=torch.long)
    documents[0, 13:] = 1
    batch = dict(input_ids=ids[:, :-1], labels=labels, position_ids=positions, document_ids=documents)
    return {k: v.to(device) for k, v in batch.items()}


def _loss_and_grads(model, batch: dict, group) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's share of the token mean over ``group`` (its ranks hold different tokens), backward; the
    loss and the gradients as host tensors."""
    import torch.distributed as dist

    out = model(**batch)
    total = out.num_tokens.detach().float().reshape(1) if torch.is_tensor(out.num_tokens) else \
        torch.tensor([float(out.num_tokens)], device=out.loss.device)
    dist.all_reduce(total, group=group)
    share = out.loss * out.num_tokens / total
    share.backward()
    return share.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def _layout_rank(overrides: list[str]) -> dict:
    from megatron.core import parallel_state as ps

    from tests.parallel.test_tensor_parallel import _cfg, tensor_parallel_llm
    from xoron_dist.parallel import state
    from xoron_dist.parallel.sequence import zigzag_split

    cfg = _cfg(*overrides)
    state.initialize(cfg)
    cpu, accel = tensor_parallel_llm(cfg), tensor_parallel_llm(cfg)  # seeded: the same weights
    sp, sp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    group = ps.get_data_parallel_group(with_context_parallel=True)

    def rows(batch: dict) -> dict:
        if sp > 1:  # this rank's zig-zag chunks of every row
            return {k: zigzag_split(v, 1, sp_rank, sp) for k, v in batch.items()}
        if dp > 1:  # this rank's row
            return {k: v[dp_rank : dp_rank + 1] for k, v in batch.items()}
        return batch

    out = {"cpu": _loss_and_grads(cpu, rows(_batch(cfg.llm.usable_vocab_size, "cpu")), group)}
    with standin_accelerator():
        accel.to(ACCEL)
        out["on_accel"] = all(isinstance(p, OnAccel) for p in accel.parameters())
        out["accel"] = _loss_and_grads(accel, rows(_batch(cfg.llm.usable_vocab_size, ACCEL)), group)
    return out


@pytest.mark.parametrize("overrides", [
    pytest.param(["parallel.tp=2"], id="tp2"),
    pytest.param(["parallel.sp=2"], id="sp2-latent-ring-packed"),
    pytest.param(["parallel.ep=2", "train.ep_overlap_chunks=2"], id="ep2-overlap2"),
])
def test_parallel_layouts_keep_every_tensor_on_the_device(overrides):
    for rank, got in enumerate(run_ranks(_layout_rank, 2, overrides, timeout=180)):
        assert got["on_accel"], rank
        (cpu_loss, cpu_grads), (loss, grads) = got["cpu"], got["accel"]
        assert loss == pytest.approx(cpu_loss, rel=1e-5), (rank, loss, cpu_loss)
        assert grads.keys() == cpu_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, cpu_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
