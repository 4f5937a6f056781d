"""Pipeline parallelism, model level: the partitioner, the stage modules, and the layouts refused.

The stage chain is checked against the single-rank ``XoronLLM`` on the same weights and data
(loss, every gradient, the parameter names); the schedule itself runs through the real trainer
in ``tests/train/test_pipeline_runs.py``.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tests.parallel.harness import run_ranks
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel.layout import LayoutError
from xoron_dist.parallel.pipeline.partition import StageCosts, partition_layers
from xoron_dist.parallel.pipeline.split import measured_costs, parameter_costs, prune_to_stage
from xoron_dist.train.expert_balance import ExpertBalancer

BASE = ["preset=tiny", "model.llm.num_layers=4", "model.llm.dense_layers=1"]


def _llm_cfg(*overrides):
    return load_config(None, BASE + list(overrides)).llm


# --------------------------------------------------------------------------- partitioning


def test_partition_balances_around_the_embedding_and_head():
    costs = StageCosts(layers=(1.0,) * 6, first=2.0, last=0.0)
    part = partition_layers(costs, 2)
    assert part.bounds == ((0, 2), (2, 6)) and part.stage_costs == (4.0, 4.0)
    assert list(part.layers_of(1)) == [2, 3, 4, 5]
    # equal layers, nothing extra: the even split; a heavy last layer gets a stage of its own
    assert partition_layers(StageCosts((1.0,) * 4), 2).bounds == ((0, 2), (2, 4))
    assert partition_layers(StageCosts((1.0, 1.0, 1.0, 5.0)), 2).bounds == ((0, 3), (3, 4))
    assert partition_layers(StageCosts((1.0,) * 3), 3).bounds == ((0, 1), (1, 2), (2, 3))


def test_partition_is_optimal_against_brute_force():
    rng = random.Random(3)
    for _ in range(40):
        n, pp = rng.randint(2, 8), rng.randint(1, 4)
        if pp > n:
            continue
        costs = StageCosts(tuple(rng.uniform(0.1, 5) for _ in range(n)), rng.uniform(0, 4), rng.uniform(0, 4))
        part = partition_layers(costs, pp)
        assert part.bounds[0][0] == 0 and part.bounds[-1][1] == n
        assert all(a < b for a, b in part.bounds) and all(
            part.bounds[i][1] == part.bounds[i + 1][0] for i in range(pp - 1))
        best = min(_largest_stage(costs, cuts) for cuts in itertools.combinations(range(1, n), pp - 1))
        assert max(part.stage_costs) == pytest.approx(best)


def _largest_stage(costs: StageCosts, cuts: tuple[int, ...]) -> float:
    """The largest stage cost when the layers are cut before each index in ``cuts``."""
    edges = (0, *cuts, len(costs.layers))
    last = len(edges) - 2
    return max(sum(costs.layers[a:b]) + (costs.first if s == 0 else 0) + (costs.last if s == last else 0)
               for s, (a, b) in enumerate(itertools.pairwise(edges)))


def test_partition_needs_a_layer_per_stage():
    with pytest.raises(ValueError, match="2 layer\\(s\\) cannot fill 3 pipeline stages"):
        partition_layers(StageCosts((1.0, 1.0)), 3)


def test_parameter_and_measured_costs_cover_every_layer():
    torch.manual_seed(0)
    model = XoronLLM(_llm_cfg())
    params = parameter_costs(model)
    assert params.layers[0] < params.layers[1] == params.layers[3]  # layer 0 is dense, the rest MoE
    assert params.first == model.embed_tokens.weight.numel()
    assert params.last == model.norm.weight.numel() + model.lm_head.weight.numel()
    timed = measured_costs(model, micro_batch_size=1, seq_len=16, repeats=1)
    assert len(timed.layers) == 4 and all(t > 0 for t in timed.layers) and timed.last > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(r.load.sum() == 0 for r in ExpertBalancer(model).routers)  # the random tokens are not load


# --------------------------------------------------------------------------- stage modules


def _batch(cfg, seed=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.usable_vocab_size, (2, 17), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    return ids[:, :-1], labels


def _stages(cfg, pp):
    """The single-rank model's ``pp`` stages: each the model (same seed) pruned to its part."""
    torch.manual_seed(0)
    partition = partition_layers(parameter_costs(XoronLLM(cfg)), pp)
    stages = []
    for s in range(pp):
        torch.manual_seed(0)
        stage = XoronLLM(cfg)
        prune_to_stage(stage, partition, s)
        stages.append(stage)
    return stages


@pytest.mark.parametrize("pp", [2, 3])
def test_stage_chain_equals_the_single_rank_model(pp):
    cfg = _llm_cfg()
    torch.manual_seed(0)
    full = XoronLLM(cfg)
    full_balancer = ExpertBalancer(full)
    stages = _stages(cfg, pp)
    balancers = [ExpertBalancer(stage) for stage in stages]
    ids, labels = _batch(cfg)

    expected = full(ids, labels=labels)
    expected.loss.backward()
    x = stages[0](ids).hidden
    for stage in stages[1:-1]:
        assert x.shape == (2, 16, cfg.hidden_size)
        x = stage(inputs_embeds=x).hidden
    out = stages[-1](inputs_embeds=x, labels=labels)
    out.loss.backward()

    assert out.num_tokens == expected.num_tokens
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    reference = dict(full.named_parameters())
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert sorted(names) == sorted(reference)  # same names as the single-rank model, each on one stage
    for stage in stages:
        for name, param in stage.named_parameters():
            torch.testing.assert_close(param.grad, reference[name].grad, rtol=0, atol=0, msg=name)
    # each stage counts the expert load of its own MoE layers; together they are the model's
    assert [i for b in balancers for i in b.layer_ids()] == full_balancer.layer_ids()
    torch.testing.assert_close(torch.cat([torch.stack(b.load) for b in balancers]), torch.stack(full_balancer.load))
    loads = torch.cat([b.update()["llm"] for b in balancers])
    torch.testing.assert_close(loads, full_balancer.update()["llm"])
    for a, b in zip([r for bal in balancers for r in bal.routers], full_balancer.routers, strict=True):
        torch.testing.assert_close(a.expert_bias, b.expert_bias)


def test_stage_with_activation_checkpointing_counts_tokens_once():
    from xoron_dist.model.llm import DecoderLayer
    from xoron_dist.parallel.checkpointing import apply_activation_checkpointing

    cfg = _llm_cfg()
    stage = _stages(cfg, 2)[1]
    assert apply_activation_checkpointing(stage, (DecoderLayer,)) == len(stage.layers)
    balancer = ExpertBalancer(stage)
    hidden = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    stage(inputs_embeds=hidden, labels=_batch(cfg)[1]).loss.backward()
    routed = cfg.moe.top_k * 2 * 16
    assert [load.sum().item() for load in balancer.load] == [routed] * len(balancer.routers)
    assert hidden.grad is not None
    with pytest.raises(ValueError, match="inputs_embeds"):
        stage(_batch(cfg)[0])  # a later stage has no embedding


# --------------------------------------------------------------------------- refused layouts


REFUSED = [
    (["parallel.zero_stage=2"], "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"),
    (["parallel.zero_stage=3"], "parallel.zero_stage = 3 with parallel.pp = 2"),
    (["parallel.zero_stage=0"], "parallel.zero_stage = 0 with parallel.pp = 2"),
    (["model.llm.tie_word_embeddings=true", "train.precision=bf16", "train.grad_accum_steps=2"],
     "model.llm.tie_word_embeddings = true with parallel.pp = 2 and bf16 weights"),
    (["model.llm.num_layers=1", "model.llm.dense_layers=0"], "model.llm.num_layers = 1 is fewer than parallel.pp = 2"),
]


def _refused_body(overrides: list[str]) -> tuple[str, bool]:
    import torch.distributed as dist

    from xoron_dist.parallel import state

    try:
        state.initialize(load_config(None, ["preset=tiny", "parallel.pp=2", *overrides]))
    except LayoutError as err:
        return str(err), dist.is_initialized()
    raise AssertionError(f"initialize accepted pp=2 with {overrides}")


@pytest.mark.multirank
@pytest.mark.parametrize(("overrides", "fragment"), REFUSED, ids=[r[1].split(" ")[0] for r in REFUSED])
def test_refused_pipeline_layouts_fail_before_any_process_group(overrides, fragment):
    for message, initialized in run_ranks(_refused_body, 2, overrides):
        assert fragment in message
        assert initialized is False


# --------------------------------------------------------------------------- the 1F1B schedule


def _schedule_body(micro: int) -> dict:
    """Every rank: one 1F1B step of ``micro`` micro-batches through its stage's ZeRO-1 engine (SGD,
    lr 1), against the single-rank model's gradient on the same micro-batches, computed locally."""
    import deepspeed

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.parallel.pipeline.schedule import train_step_1f1b

    cfg = load_config(None, [*BASE, "model.llm.num_layers=3", "parallel.pp=3"])
    state.initialize(cfg)
    torch.manual_seed(0)
    reference = XoronLLM(cfg.llm)
    torch.manual_seed(0)
    parallel = parallelize(XoronLLM(cfg.llm), cfg)
    stage = parallel.model
    before = {name: p.detach().clone() for name, p in stage.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=stage, optimizer=torch.optim.SGD(stage.parameters(), lr=1.0),
                                      config=config, mpu=state.mpu())
    batches = [dict(zip(("input_ids", "labels"), _batch(cfg.llm, seed=10 + i), strict=True)) for i in range(micro)]
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    loss_sum = train_step_1f1b(engine, parallel.stage, batches, scale=micro / tokens)

    expected_sum = sum(reference(b["input_ids"], labels=b["labels"]).loss * (b["labels"] != -100).sum()
                       for b in batches)
    (expected_sum / tokens).backward()
    grads = dict(reference.named_parameters())
    errors = {name: float((before[name] - p.detach() - grads[name].grad).abs().max())
              for name, p in stage.named_parameters()}
    out = {"loss_sum": (float(loss_sum), float(expected_sum.detach())), "max_error": max(errors.values()),
           "names": sorted(errors), "grad_norm": float(engine.get_global_grad_norm()),
           "expected_norm": sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters()) ** 0.5}
    state.destroy()
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("micro", [2, 5], ids=["fewer-micro-batches-than-stages", "five-micro-batches"])
def test_three_stage_1f1b_step_gives_the_single_rank_gradients(micro):
    """3 stages (the middle one both receives and sends), with fewer micro-batches than stages
    (warm-up and cool-down only) and with more: every parameter's update is the single-rank gradient."""
    results = run_ranks(_schedule_body, 3, micro)
    names = [r["names"] for r in results]
    assert any("embed_tokens.weight" in n for n in names[:1]) and "lm_head.weight" in names[2]
    assert sum(len(n) for n in names) == len(set().union(*names))  # every parameter on exactly one stage
    for r in results:
        got, expected = r["loss_sum"]
        assert got == pytest.approx(expected, rel=1e-6)
        assert r["max_error"] < 1e-6
        assert r["grad_norm"] == pytest.approx(r["expected_norm"], rel=1e-5)
