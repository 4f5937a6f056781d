"""The planner's parameter counts equal the real model's, built on the meta device, rank by rank.

Single rank: ``XoronLLM`` on the meta device for several model shapes. Several ranks: each rank
builds its part of the model with the run's own builder (TP layers, EP experts) and, with pp > 1,
cuts its pipeline stage with ``parallelize``; the counts (dense weights and routed experts apart)
must equal ``stage_parameters`` for that rank's stage.
"""

import pytest
import torch

from tests.parallel.harness import run_ranks
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.plan.memory import ParameterCount, stage_parameters

BASE = ["preset=tiny", "model.llm.pad_vocab_multiple=32", "train.seq_len=32"]


def _count(model: torch.nn.Module) -> ParameterCount:
    dense = expert = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if ".ffn.experts." in f".{name}":
            expert += param.numel()
        else:
            dense += param.numel()
    return ParameterCount(dense, expert)


@pytest.mark.parametrize("extra", [
    [],
    ["model.llm.dense_layers=1", "model.llm.num_layers=3"],
    ["model.llm.q_lora_rank=null", "model.llm.tie_word_embeddings=true"],
    ["model.llm.moe.num_shared_experts=0", "model.llm.moe.top_k=1"],
    ["model.llm.moe_layer_freq=2", "model.llm.num_layers=4", "model.llm.moe.router_norm=true"],
])
def test_single_rank_counts_equal_the_meta_build(extra):
    cfg = load_config(None, BASE + extra)
    with torch.device("meta"):
        model = XoronLLM(cfg.llm)
    [stage] = stage_parameters(cfg, tp=1, pp=1, ep=1)
    assert stage.params == _count(model)


def _rank_counts(overrides):
    from megatron.core import parallel_state as mps

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = load_config(None, overrides)
    state.initialize(cfg)
    with torch.device("meta"):
        model = parallelize(XoronLLM(cfg.llm), cfg).model
    return mps.get_pipeline_model_parallel_rank(), _count(model)


@pytest.mark.parametrize("world, layout", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.tp_experts=false"]),
    (4, ["parallel.tp=2", "parallel.ep=2"]),
    (4, ["parallel.tp=2", "parallel.pp=2", "model.llm.num_layers=3", "model.llm.dense_layers=1",
         "train.grad_accum_steps=2"]),
])
def test_per_rank_counts_equal_the_distributed_meta_build(world, layout):
    overrides = BASE + ["parallel.zero_stage=1"] + layout
    cfg = load_config(None, overrides)
    stages = stage_parameters(cfg, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    results = run_ranks(_rank_counts, world, overrides)
    for stage_rank, counted in results:
        assert stages[stage_rank].params == counted
    if cfg.parallel.pp > 1:  # the stages differ (embedding first, head last): the partition is exercised
        assert {r for r, _ in results} == set(range(cfg.parallel.pp))
