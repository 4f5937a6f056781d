"""Expert-bias router, sorted dropless dispatch, auxiliary-loss-free balancing."""

import torch
import torch.nn.functional as F

from xoron_dist.config import MoEConfig, XoronConfig
from xoron_dist.model.layers import LayerBuilder
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.moe import ExpertBiasRouter, MoEFeedForward, RoutedExperts


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
        for router in model.routers():
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
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = model.expert_load.clone()
    model.expert_load.zero_()
    model.activation_checkpointing = True
    model(ids, labels=ids).loss.backward()
    assert torch.equal(model.expert_load, plain)
    assert plain.sum().item() == cfg.num_layers * 2 * 16 * cfg.moe.top_k


def test_bias_updates_even_out_a_skewed_load():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=8)
    moe = MoEFeedForward(16, cfg, LayerBuilder())
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 preferred by most tokens
    x = torch.randn(512, 16) + 1.0

    def imbalance() -> float:
        moe.router(x)
        load = moe.router.last_load
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(300):
        moe.router(x)
        moe.router.update_bias(moe.router.last_load, rate=0.01)
    after = imbalance()
    assert before > 2.0
    assert after < 1.5 and after < before / 2, (before, after)

