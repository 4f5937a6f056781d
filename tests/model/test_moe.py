"""Expert-bias router, sorted dropless dispatch, auxiliary-loss-free balancing."""

import pytest
import torch
import torch.nn.functional as F

from xoron_dist.config import MoEConfig, XoronConfig
from xoron_dist.model.common.moe import ExpertBiasRouter, MoEFeedForward, RoutedExperts, uncounted_routing
from xoron_dist.model.llm import DecoderLayer, XoronLLM
from xoron_dist.parallel.checkpointing import apply_activation_checkpointing
from xoron_dist.train.expert_balance import ExpertBalancer
from xoron_dist.utils.host_syncs import HostSyncCounter


def test_overloaded_expert_bias_goes_down():
    router = ExpertBiasRouter(8, MoEConfig(num_experts=4, top_k=2))
    router.update_bias(torch.tensor([90.0, 30.0, 10.0, 30.0]), rate=0.01)
    bias = router.expert_bias
    assert bias[0] < 0 < bias[2]
    assert abs(bias.sum().item()) < 1e-7  # mean of the update removed: no common drift
    assert not bias.requires_grad and "expert_bias" not in dict(router.named_parameters())


def test_combine_weights_are_unbiased_normalised_scores():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, routed_scaling_factor=1.5)
    router = ExpertBiasRouter(16, cfg)
    torch.nn.init.normal_(router.weight)
    router.expert_bias.copy_(torch.linspace(-1, 1, 8))  # large enough to change the selection
    x = torch.randn(32, 16)
    chosen, weights = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    expected = scores.gather(1, chosen)
    expected = expected / expected.sum(-1, keepdim=True) * 1.5
    torch.testing.assert_close(weights, expected)
    unbiased = torch.topk(scores, 2, dim=-1).indices
    assert not torch.equal(chosen.sort(-1).values, unbiased.sort(-1).values)  # the bias did steer


def test_bias_never_changes_gradients():
    """A bias that leaves the selection alone leaves outputs and every gradient bit-identical."""
    cfg = XoronConfig.preset("tiny").llm
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = grads()
    with torch.no_grad():
        for router in ExpertBalancer(model).routers:
            router.expert_bias.add_(0.37)  # same shift for every expert: same top-k
    loss_b, grads_b = grads()
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_sorted_dispatch_equals_per_token_reference():
    torch.manual_seed(1)
    experts = RoutedExperts(num_experts=4, hidden=8, intermediate=6)
    torch.nn.init.normal_(experts.gate_up)
    torch.nn.init.normal_(experts.down)
    x = torch.randn(10, 8)
    chosen = torch.tensor([[0, 1], [1, 0], [3, 2], [3, 0], [0, 2], [1, 3], [3, 1], [0, 3], [2, 1], [3, 2]])
    chosen[:, 0] = 3  # skewed: expert 3 gets every token once
    weights = torch.rand(10, 2)
    got = experts(x, chosen, weights)
    ref = torch.zeros_like(x)
    for t in range(10):
        for j in range(2):
            e = chosen[t, j]
            gate, up = (experts.gate_up[e] @ x[t]).chunk(2)
            ref[t] += weights[t, j] * (experts.down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(got, ref)


def test_expert_load_not_double_counted_with_activation_checkpointing():
    cfg = XoronConfig.preset("tiny").llm
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    balancer = ExpertBalancer(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = torch.stack(balancer.load).clone()
    balancer.update(enabled=False)
    assert apply_activation_checkpointing(model, (DecoderLayer,)) == cfg.num_layers
    model(ids, labels=ids).loss.backward()  # backward recomputes every layer, routers included
    assert torch.equal(torch.stack(balancer.load), plain)
    assert torch.equal(torch.stack([r.load for r in balancer.routers]), 2 * plain)  # the recompute did count ...
    model(ids, labels=ids)
    assert torch.equal(torch.stack(balancer.load), 2 * plain)  # ... and the next forward cleared it first
    assert plain.sum().item() == cfg.num_layers * 2 * 16 * cfg.moe.top_k


def test_balancer_counts_training_forwards_only_and_skips_uncounted_routing():
    cfg = XoronConfig.preset("tiny").llm
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    balancer = ExpertBalancer(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    model.train()
    assert all(load.sum() == 0 for load in balancer.load)
    with uncounted_routing(model):
        model.layers["0"].ffn(torch.randn(1, 5, cfg.hidden_size))
    model(ids)
    assert [load.sum().item() for load in balancer.load] == [2 * 16 * cfg.moe.top_k] * cfg.num_layers


def test_checkpointing_every_second_block_and_equal_gradients():
    cfg = XoronConfig.preset("tiny").llm
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert apply_activation_checkpointing(model, (DecoderLayer,), every=2) == 1  # layer 0 of 2
    model(ids, labels=ids).loss.backward()
    for name, grad in plain.items():
        assert torch.equal(model.get_parameter(name).grad, grad), name


def test_bias_updates_even_out_a_skewed_load():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=8)
    moe = MoEFeedForward(16, cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 preferred by most tokens
    x = torch.randn(512, 16) + 1.0

    def routed_load():
        moe.router.load.zero_()
        moe.router(x)
        return moe.router.load

    def imbalance() -> float:
        load = routed_load()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(300):
        moe.router.update_bias(routed_load(), rate=0.01)
    after = imbalance()
    assert before > 2.0
    assert after < 1.5 and after < before / 2, (before, after)



def test_softmax_router_with_input_norm_is_the_seeds_router():
    """``router_score: softmax`` + ``router_norm``: softmax over the experts of gate(RMSNorm(x)), top-k by
    score + bias, the chosen scores normalised (the seed's AuxLosslessMoERouter, with our bias rule)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, top_k=2, router_score="softmax", router_norm=True)
    router = ExpertBiasRouter(16, cfg)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.input_norm.weight)
    x = torch.randn(20, 16) * 3
    chosen, weights = router(x)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * router.input_norm.weight
    probs = (normed @ router.weight.T).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(chosen.sort(-1).values, top.indices.sort(-1).values)
    expected = top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.sort(-1).values, expected.sort(-1).values)


def test_moe_every_second_layer_builds_dense_ffns_between():
    cfg = XoronConfig.preset("tiny").llm
    from dataclasses import replace

    cfg = replace(cfg, num_layers=4, moe_layer_freq=2)
    model = XoronLLM(cfg)
    kinds = [type(layer.ffn).__name__ for layer in model.layers.values()]
    assert kinds == ["SwiGLU", "MoEFeedForward", "SwiGLU", "MoEFeedForward"]
    assert len(ExpertBalancer(model).routers) == 2


def _moe(hidden: int, intermediate: int, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(hidden, MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=intermediate))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return moe


def test_local_dropless_layer_makes_no_host_sync():
    """Router + sorted dispatch + grouped expert GEMMs + combine, forward and backward: nothing read on the host
    (on a GPU each read would stall the launch queue)."""
    moe = _moe(hidden=16, intermediate=8)  # widths grouped_mm takes (16-byte strides)
    x = torch.randn(2, 24, 16, requires_grad=True)
    with HostSyncCounter() as syncs:
        moe(x).square().sum().backward()
    assert syncs.total == 0, syncs.calls


def test_per_expert_loop_reads_the_slice_sizes_once():
    """Where grouped_mm cannot run (an odd width here) the loop reads all expert sizes in one sync per layer."""
    moe = _moe(hidden=8, intermediate=6)
    with HostSyncCounter() as syncs:
        moe(torch.randn(2, 24, 8)).sum().backward()
    assert syncs.calls == {"tolist": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_equal_the_per_expert_loop(dtype, monkeypatch):
    moe = _moe(hidden=16, intermediate=8).to(dtype)
    x = torch.randn(40, 16, dtype=dtype)
    chosen = torch.randint(0, 8, (40, 2))
    chosen[:, 0] = 5  # skewed, and some experts get no token
    chosen[:, 1] = chosen[:, 1] % 3
    weights = torch.rand(40, 2)

    def run(grouped: bool):
        monkeypatch.setattr(RoutedExperts, "use_grouped_mm", grouped)
        moe.zero_grad()
        inp = x.clone().requires_grad_()
        out = moe.experts(inp, chosen, weights)
        out.float().square().sum().backward()
        return out, inp.grad, moe.experts.gate_up.grad, moe.experts.down.grad

    for got, ref in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, ref)


def test_router_scores_and_weights_stay_fp32_under_autocast():
    torch.manual_seed(0)
    router = ExpertBiasRouter(32, MoEConfig(num_experts=8, top_k=2))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, 32)
    chosen, weights = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen_bf16, weights_bf16 = router(x)
    assert weights_bf16.dtype == torch.float32
    assert torch.equal(chosen_bf16, chosen) and torch.equal(weights_bf16, weights)
