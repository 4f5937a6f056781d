"""LoRA adapters on routed experts under expert parallelism (model/lora.py ``StackedLoRA.expert``,
parallel/experts.py): equal to one rank, marked as DeepSpeed expert parameters, and stacked back by
expert id on consolidation.

EP=2 on 2 ranks is also DP=2 (EP ranks are data-parallel peers): the single-rank model sees both
ranks' rows, each rank routes its own row, its share of the global token-mean loss is backpropagated,
and gradients are summed as the engine sums them (dense adapters over the data-parallel group, expert
adapters over the expert-data-parallel group). Compared: the loss of 2 SGD steps, and the first-step
gradient of every adapter; an expert adapter's gradient is each rank's local experts' slice, checked
by stacking both ranks' slices back by global expert id (``stack_experts``, the consolidation rule)
and comparing with the single-rank stacked gradient, so a wrong slice, id or name fails.
"""

import pytest
import torch

from tests.model.test_lora import _adapted, _batches, _cfg
from tests.parallel.harness import run_ranks
from xoron_dist.model.lora import LoRARoutedExperts, is_adapter
from xoron_dist.train.deepspeed_shards import ConsolidationError, global_expert_name, stack_experts
from xoron_dist.train.lora import freeze_for_stage

EP = ("parallel.ep=2",)
_MARK = ".deepspeed_moe.experts.deepspeed_experts."


def _stacked(per_rank: list[dict[str, torch.Tensor]], ep_ranks: list[int], local: dict[str, int]):
    """Every rank's EP-named tensors under global expert ids, stacked back by ``stack_experts``."""
    state = {}
    for tensors, ep_rank in zip(per_rank, ep_ranks, strict=True):
        for name, tensor in tensors.items():
            state[global_expert_name(name, ep_rank, local)] = lambda t=tensor: t
    return {name: piece() for name, piece in stack_experts(state, {m: n * 2 for m, n in local.items()}).items()}


def _ep_body(batches):
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.train.build import parameter_groups

    cfg = _cfg(*EP)
    state.initialize(cfg)
    model = _adapted(cfg, random_b=True)  # the single-rank draw; parallelize cuts this rank's experts from it
    freeze_for_stage(model, "adapters")
    model = parallelize(model, cfg).model
    experts = model.layers["1"].ffn.experts
    saved = {n: t.detach().clone() for n, t in model.state_dict().items()}  # checked against the stacks
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    # DeepSpeed's view: expert adapters are MoE parameters of the ep_size_2 group, in its MoE optimizer groups
    marks = {n: (is_moe_param(p), getattr(p, "group_name", None)) for n, p in model.named_parameters()}
    moe_groups = {id(p) for g in parameter_groups(model, 0.1, 1) if g.get("moe") for p in g["params"]}
    in_moe_group = {n for n, p in model.named_parameters() if id(p) in moe_groups}

    dp_rank = ps.get_data_parallel_rank()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, first_grads = [], None
    for ids, labels in batches:
        opt.zero_grad()
        out = model(ids[dp_rank:dp_rank + 1], labels=labels[dp_rank:dp_rank + 1])
        loss = out.loss * out.num_tokens / int(labels.numel())  # this rank's share of the global token mean
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                group = ps.get_expert_data_parallel_group() if _MARK in name else ps.get_data_parallel_group()
                dist.all_reduce(p.grad, group=group)
        summed = loss.detach().clone()
        dist.all_reduce(summed, group=ps.get_data_parallel_group())
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(summed.item())
    return {"losses": losses, "grads": first_grads, "saved": saved, "trained": trained, "marks": marks,
            "in_moe_group": in_moe_group, "ep_rank": ps.get_expert_model_parallel_rank(),
            "local": experts.num_local_experts}


@pytest.mark.multirank
def test_ep2_routed_expert_adapters_equal_single_rank_and_stack_back():
    cfg = _cfg(*EP)
    single = _adapted(cfg, random_b=True)
    assert isinstance(single.layers["1"].ffn.experts, LoRARoutedExperts)
    full_state = {k: v.detach().clone() for k, v in single.state_dict().items()}
    freeze_for_stage(single, "adapters")
    batches = _batches(cfg, n=2, seed=5)
    opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.5)
    ref_losses, ref_grads = [], None
    for ids, labels in batches:
        opt.zero_grad()
        loss = single(ids, labels=labels).loss
        loss.backward()
        if ref_grads is None:
            ref_grads = {n: p.grad.detach().clone() for n, p in single.named_parameters() if p.grad is not None}
        opt.step()
        ref_losses.append(loss.item())

    results = run_ranks(_ep_body, 2, batches)
    local = {"layers.1.ffn.experts": results[0]["local"]}
    ep_ranks = [out["ep_rank"] for out in results]
    assert sorted(ep_ranks) == [0, 1]
    expert_adapters = {"layers.1.ffn.experts.gate_up_lora.A", "layers.1.ffn.experts.gate_up_lora.B",
                       "layers.1.ffn.experts.down_lora.A", "layers.1.ffn.experts.down_lora.B"}
    assert expert_adapters <= set(ref_grads)
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (out["losses"], ref_losses)
        experts_ep = {n for n in out["trained"] if _MARK in n}
        assert experts_ep and all(is_adapter(n) for n in out["trained"])  # only adapters train, experts' too
        for name, (moe, group) in out["marks"].items():
            assert moe == (_MARK in name) and (group == "ep_size_2") == (_MARK in name), name
        assert out["in_moe_group"] == experts_ep  # reduced over the expert-data-parallel group by DeepSpeed
    # each rank's experts were cut from the single-rank stacks (adapters too), and the consolidation rule
    # (both ranks' expert tensors stacked by global id) gives back exactly the single-rank tensors
    saved = _stacked([out["saved"] for out in results], ep_ranks, local)
    assert saved.keys() == full_state.keys()
    for name, tensor in full_state.items():
        assert torch.equal(saved[name], tensor), name
    grads = _stacked([{n: g for n, g in out["grads"].items() if _MARK in n} for out in results], ep_ranks, local)
    assert set(grads) == expert_adapters
    for out in results:
        grads.update({n: g for n, g in out["grads"].items() if _MARK not in n})
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    for leaf in ("gate_up_lora.B", "down_lora.B"):  # both EP ranks' experts took rows: a real exchange
        grad = grads[f"layers.1.ffn.experts.{leaf}"]
        assert all(grad[r * local["layers.1.ffn.experts"]:(r + 1) * local["layers.1.ffn.experts"]].abs().sum() > 0
                   for r in (0, 1))


def test_stack_experts_refuses_an_adapter_slice_missing():
    """An expert adapter whose slice of one EP rank is absent is named, not stacked short."""
    moe = "layers.1.ffn.experts"
    state = {f"{moe}{_MARK}{e}.gate_up_lora.A": (lambda: torch.zeros(4, 8)) for e in (0, 1, 3)}
    with pytest.raises(ConsolidationError, match=r"experts of layers.1.ffn.experts .*missing ids \[2\]"):
        stack_experts(state, {moe: 4})
