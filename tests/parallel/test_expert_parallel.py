"""Expert parallelism: experts spread over EP ranks (all-to-all dispatch) equal the single-rank model.

The single-rank model sees the union of every data-parallel rank's batch; each EP rank routes its own
rows and the experts' gradients come back through the all-to-all. Compared after one step: the loss,
every dense gradient (summed over the data-parallel group, as the engine does) and every local
expert's gradient (summed over its expert-data-parallel replicas) against the matching expert of the
single-rank gradient; then the losses of 3 SGD steps (Adam's scale invariance would hide a wrong
gradient scale, so SGD it is). Routing is skewed (large biases on experts of one EP rank) so the
dropless all-to-all carries unequal row counts. The expert biases move after every step from the
loads summed over the data-parallel ranks, and stay bit-identical on every rank.
"""

import pytest
import torch

from tests.parallel.harness import run_ranks
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel.tensor import tp_slice

BASE = ["preset=tiny", "model.llm.pad_vocab_multiple=32", "train.seq_len=32"]
ROWS_PER_RANK = 2
SKEW = {0: 0.1, 1: 0.05}  # expert -> router bias: experts 0 and 1 (EP rank 0) take most tokens, not all


def _cfg(*overrides):
    return load_config(None, BASE + list(overrides))


def _batches(cfg, rows, n=3):
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.llm.usable_vocab_size, (rows, 33), generator=gen)
        labels = ids[:, 1:].clone()
        labels[0, :5] = -100
        out.append((ids[:, :-1], labels))
    return out


def _skew(model):
    from xoron_dist.train.expert_balance import ExpertBalancer

    balancer = ExpertBalancer(model)
    for router in balancer.routers:
        for expert, bias in SKEW.items():
            router.expert_bias[expert] = bias
    return balancer


def _is_expert(name: str) -> bool:
    """An expert-parallel parameter (DeepSpeed's MoE naming)."""
    return ".deepspeed_experts." in name


def _expert_ref(name: str, full: dict[str, torch.Tensor], first: int, tp_rank: int, tp_size: int):
    """The single-rank tensor matching an EP parameter ``...experts.deepspeed_moe.experts.deepspeed_experts.i.w``."""
    prefix, rest = name.split(".deepspeed_moe.experts.deepspeed_experts.")
    local, weight = rest.split(".")
    stacked = full[f"{prefix}.{weight}"][first + int(local)]
    if weight == "gate_up":
        return tp_slice(stacked, 0, 2, tp_rank, tp_size)
    return tp_slice(stacked, 1, 1, tp_rank, tp_size)


def _ep_body(overrides, world, full_state, batches):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.parallel.test_tensor_parallel import tensor_parallel_llm
    from xoron_dist.parallel import state

    cfg = _cfg(*overrides)
    state.initialize(cfg)
    model = tensor_parallel_llm(cfg)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    experts = model.layers[str(cfg.llm.num_layers - 1)].ffn.experts
    first = experts.first_expert
    eb = tp if cfg.parallel.tp_experts else (0, 1)  # TP split of the experts (none if kept whole)
    same_init = all(torch.equal(p, _expert_ref(n, full_state, first, *eb))
                    for n, p in model.named_parameters() if _is_expert(n))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_expert(name):
                param.copy_(_expert_ref(name, full_state, first, *eb))
            elif getattr(param, "tensor_model_parallel", False):
                param.copy_(tp_slice(full_state[name], param.partition_dim, param.partition_stride, *tp))
            else:
                param.copy_(full_state[name])
    balancer = _skew(model)

    dp_rank = ps.get_data_parallel_rank()
    total_tokens = [int((labels != -100).sum()) for _, labels in batches]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, first_grads, loads = [], None, []
    for (ids, labels), tokens in zip(batches, total_tokens, strict=True):
        rows = slice(dp_rank * ROWS_PER_RANK, (dp_rank + 1) * ROWS_PER_RANK)
        opt.zero_grad()
        out = model(ids[rows], labels=labels[rows])
        local_load = torch.stack(balancer.load).clone()  # this rank's own tokens per expert
        loss = out.loss * out.num_tokens / tokens  # this rank's share of the global token mean
        loss.backward()
        for name, p in model.named_parameters():
            group = ps.get_expert_data_parallel_group() if _is_expert(name) else ps.get_data_parallel_group()
            dist.all_reduce(p.grad, group=group)
        summed = loss.detach().clone()
        dist.all_reduce(summed, group=ps.get_data_parallel_group())
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(summed.item())
        loads.append(balancer.update(ps.get_data_parallel_group())["llm"])
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters() if not _is_expert(n)}
    return {"losses": losses, "grads": first_grads, "meta": meta, "same_init": same_init, "first": first,
            "tp": tp, "expert_tp": eb, "loads": loads,
            "biases": torch.stack(balancer.biases()), "local_load": local_load}


def _single(cfg, batches):
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    balancer = _skew(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads, loads = [], None, []
    for ids, labels in batches:
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
        loads.append(balancer.update()["llm"])
    return full_state, losses, grads, loads


@pytest.mark.multirank
@pytest.mark.parametrize(
    "world,overrides",
    [
        pytest.param(2, ["parallel.ep=2"], id="ep2"),
        pytest.param(2, ["parallel.ep=2", "model.llm.dense_layers=0"], id="ep2-all-moe"),
        pytest.param(2, ["parallel.ep=2", "train.ep_overlap_chunks=2"], id="ep2-overlap2"),
        pytest.param(4, ["parallel.ep=2"], id="ep2xdp2"),
        pytest.param(4, ["parallel.ep=2", "parallel.tp=2"], id="ep2xtp2"),
        pytest.param(4, ["parallel.ep=2", "parallel.tp=2", "parallel.tp_experts=false"], id="ep2xtp2-whole"),
    ],
)
def test_expert_parallel_equals_single_rank(world, overrides):
    cfg = _cfg(*overrides)
    tp = cfg.parallel.tp
    dp = world // tp
    batches = _batches(cfg, ROWS_PER_RANK * dp)
    full_state, ref_losses, ref_grads, ref_loads = _single(cfg, batches)
    results = run_ranks(_ep_body, world, overrides, world, full_state, batches)
    counts = ref_loads[0][-1]
    assert counts[0] + counts[1] > 0.6 * counts.sum(), counts  # the skew really sends most rows to EP rank 0
    # Every rank applied the same bias updates, bit for bit, although its own loads differed.
    assert all(torch.equal(out["biases"], results[0]["biases"]) for out in results)
    assert not torch.equal(results[0]["local_load"], results[-1]["local_load"])
    assert not torch.equal(results[0]["biases"], torch.zeros_like(results[0]["biases"]))
    for rank, out in enumerate(results):
        assert out["same_init"], rank  # EP experts are cut from the single-rank draw
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (rank, out["losses"], ref_losses)
        for step, (load, ref) in enumerate(zip(out["loads"], ref_loads, strict=True)):
            assert torch.equal(load, ref), (rank, step)  # routing identical, loads summed over dp
        tp_rank, tp_size = out["tp"]
        for name, grad in out["grads"].items():
            if _is_expert(name):
                ref = _expert_ref(name, ref_grads, out["first"], *out["expert_tp"])
            else:
                ref = ref_grads[name]
                split, dim, stride = out["meta"][name]
                if split:
                    ref = tp_slice(ref, dim, stride, tp_rank, tp_size)
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} grad of {name}")


# ---------------------------------------------------------------------------- capacity factor

E, H, FFN, T, K = 8, 16, 12, 12, 2  # experts, hidden, expert width, tokens per rank, top-k


def _routing(seed, tokens=(T, T)):
    """Per-rank tokens (``tokens[r]`` on rank r), expert choices skewed towards experts 0 and 5, and
    combine weights."""
    gen = torch.Generator().manual_seed(seed)
    xs, chosen, weights = [], [], []
    for count in tokens:
        xs.append(torch.randn(count, H, generator=gen))
        logits = torch.randn(count, E, generator=gen)
        logits[:, 0] += 2.0
        logits[:, 5] += 1.0
        chosen.append(torch.topk(logits, K, dim=-1).indices)
        weights.append(torch.rand(count, K, generator=gen))
    return xs, chosen, weights


def _capacity_body(capacity_factor, xs, chosen, weights, gate_up, down):
    from xoron_dist.model.common.moe import RoutedExperts
    from xoron_dist.parallel import state
    from xoron_dist.parallel.experts import build_expert_parallel_experts, expert_split

    cfg = _cfg("parallel.ep=2", f"parallel.expert_capacity_factor={capacity_factor}")
    ctx = state.initialize(cfg)
    stacked = RoutedExperts(E, H, FFN)
    with torch.no_grad():
        stacked.gate_up.copy_(gate_up)
        stacked.down.copy_(down)
    experts = build_expert_parallel_experts(stacked, expert_split(cfg))
    x = xs[ctx.dp_rank].clone().requires_grad_()
    out = experts(x, chosen[ctx.dp_rank], weights[ctx.dp_rank])
    out.square().sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters()}
    return out.detach(), x.grad, grads, experts.first_expert, experts.capacity(T * K)


def _capacity_reference(capacity, xs, chosen, weights, gate_up, down):
    """Single process: each rank's choices beyond ``capacity`` rows per expert (later tokens first) get
    weight 0, then the plain stacked experts run every rank's tokens."""
    from xoron_dist.model.common.moe import RoutedExperts

    experts = RoutedExperts(E, H, FFN)
    with torch.no_grad():
        experts.gate_up.copy_(gate_up)
        experts.down.copy_(down)
    outs, x_grads = [], []
    for x, c, w in zip(xs, chosen, weights, strict=True):
        keep = torch.zeros(T * K, dtype=torch.bool)
        taken = [0] * E
        for pair in range(T * K):  # token order, as the dispatch's stable sort keeps it
            e = int(c.flatten()[pair])
            keep[pair] = taken[e] < capacity
            taken[e] += 1
        x = x.clone().requires_grad_()
        out = experts(x, c, w * keep.view(T, K))
        out.square().sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad)
    return outs, x_grads, {"gate_up": experts.gate_up.grad, "down": experts.down.grad}


@pytest.mark.multirank
@pytest.mark.parametrize("capacity_factor", [0.75, 8.0], ids=["dropping", "roomy"])
def test_capacity_factor_drops_the_latest_rows_per_expert_and_matches_the_reference(capacity_factor):
    xs, chosen, weights = _routing(3)
    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(E, 2 * FFN, H, generator=gen) * 0.2
    down = torch.randn(E, H, FFN, generator=gen) * 0.2
    results = run_ranks(_capacity_body, 2, capacity_factor, xs, chosen, weights, gate_up, down)
    capacity = results[0][4]
    ref_out, ref_x_grads, ref_grads = _capacity_reference(capacity, xs, chosen, weights, gate_up, down)
    busiest = max(int((c == 0).sum()) for c in chosen)
    assert (busiest > capacity) == (capacity_factor < 1), (busiest, capacity)  # "dropping" really drops
    for rank, (out, x_grad, grads, first, _) in enumerate(results):
        torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_grad, ref_x_grads[rank], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            local, weight = name.split(".")[-2:]
            torch.testing.assert_close(grad, ref_grads[weight][first + int(local)], rtol=1e-5, atol=1e-6)
