"""The multimodal parts in the plan: per-rank counts equal the parallelized meta model's, the memory
and gradient traffic carry them, and ``xoron plan`` shows them for the smoke config with every
generator switched on.

The expected counts come from the project's own transformations applied to the model on the meta
device (no process group needed): ``apply_tensor_parallel`` with the parts' entries of
``tensor_plan`` (the LLM's vocabulary layers need Megatron's groups; the planner's LLM counts have
their own multi-rank test in ``test_plan_params.py``), then ``apply_expert_parallel`` as rank r of
ep. Expert weights are the parameters of every ``MoEFeedForward``'s experts afterwards.
"""

import copy
import dataclasses

import pytest
import torch

from xoron_dist.cli import main
from xoron_dist.config import load_config
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.sharding import tensor_plan
from xoron_dist.model.summary import multimodal_parts
from xoron_dist.model.xoron import XoronMultimodalModel
from xoron_dist.parallel.experts import ExpertSplit, apply_expert_parallel
from xoron_dist.parallel.layout import validate_layout
from xoron_dist.parallel.tensor import apply_tensor_parallel
from xoron_dist.plan.cluster import load_cluster
from xoron_dist.plan.cost import estimate_step
from xoron_dist.plan.memory import TrainingShape, estimate_memory, stage_parameters
from xoron_dist.plan.parts import ParameterCount, PartSplitError, part_parameters, split_problem

SMOKE = "pipelines/smoke.yaml"
GENERATORS = ["model.image_gen.enabled=true", "model.video_gen.enabled=true"]


@pytest.fixture(scope="module")
def meta_models():
    """The single-rank smoke model with both generators on the meta device, per tp_experts."""
    models = {}
    for split_experts in (True, False):
        cfg = load_config(SMOKE, GENERATORS + [f"parallel.tp_experts={str(split_experts).lower()}"])
        with torch.device("meta"):
            models[split_experts] = (cfg, XoronMultimodalModel(cfg))
    return models


def _parallelized_counts(cfg, model, rank: int) -> dict[str, ParameterCount]:
    """Rank ``rank``'s parameters per part after the project's TP and EP swaps, on meta."""
    p = cfg.parallel
    names = [name for name, _ in multimodal_parts(cfg)]
    if p.tp > 1:
        plan = {k: v for k, v in tensor_plan(model, cfg).items() if k.split(".", 1)[0] in names}
        assert apply_tensor_parallel(model, plan, rank % p.tp, p.tp) > 0
    if p.ep > 1:  # zero3=True: the container without DeepSpeed's MoE base class, the same parameters
        assert apply_expert_parallel(model, ExpertSplit(None, rank // p.tp, p.ep, f"ep_size_{p.ep}", None,
                                                        zero3=True)) > 0
    experts = {id(q) for m in model.modules() if isinstance(m, MoEFeedForward) for q in m.experts.parameters()}
    counts = {}
    for name in names:
        params = list(getattr(model, name).parameters())
        expert = sum(q.numel() for q in params if id(q) in experts)
        counts[name] = ParameterCount(sum(q.numel() for q in params) - expert, expert)
    return counts


@pytest.mark.parametrize("tp, ep, split_experts", [(2, 1, True), (1, 2, True), (2, 2, True), (2, 2, False)])
def test_per_rank_part_counts_equal_the_parallelized_meta_model(meta_models, tp, ep, split_experts):
    base_cfg, base_model = meta_models[split_experts]
    cfg = dataclasses.replace(base_cfg, parallel=dataclasses.replace(base_cfg.parallel, tp=tp, ep=ep))
    planned = {p.name: p for p in part_parameters(cfg, tp, ep)}
    assert {name: p.whole for name, p in planned.items()} == dict(multimodal_parts(cfg))
    for rank in (0, tp * ep - 1):
        counted = _parallelized_counts(cfg, copy.deepcopy(base_model), rank)
        assert {name: p.params for name, p in planned.items()} == counted
    # the case is not trivial: TP split the encoders, EP the generators' experts (and only those)
    assert (planned["vision"].params.total < planned["vision"].whole) == (tp > 1)
    assert planned["video"].params.expert == planned["speech"].params.expert == 0
    whole = {p.name: p.params for p in part_parameters(cfg, 1, 1)}
    for name in ("image_gen", "video_gen"):
        assert planned[name].params.expert * ep * (tp if split_experts else 1) == whole[name].expert > 0


def test_memory_and_gradient_traffic_carry_the_parts():
    """ZeRO-1, dp 4 x ep 2: weights hold every part whole-per-rank, optimizer states shard dense
    weights over 4 ranks and the generators' experts over 2; synthetic text builds no parts."""
    cfg = load_config(SMOKE, GENERATORS + ["parallel.ep=2", "parallel.zero_stage=1"])
    layout = validate_layout(cfg, 4)
    shape = TrainingShape(4, 256, 1, False)
    memory = estimate_memory(cfg, layout, shape, {}, mixed=True)
    parts = part_parameters(cfg, 1, 2)
    params = sum((p.params for p in parts), stage_parameters(cfg, 1, 1, 2)[0].params)
    assert memory.params == params and memory.parts == tuple(parts)
    assert memory.weights == 2 * params.total
    assert memory.optimizer == int(12 * params.dense / 4) + int(12 * params.expert / 2)
    text = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="synthetic_text"))
    assert estimate_memory(text, layout, shape, {}, mixed=True).parts == ()
    cluster = load_cluster("h100x8", gpus_per_node=4)
    assert estimate_step(cfg, layout, shape, cluster, True).dp > estimate_step(text, layout, shape, cluster, True).dp


def test_a_part_that_does_not_split_is_named():
    cfg = load_config(SMOKE, ["model.projector.intermediate_size=130"])
    assert split_problem(cfg, 1) is None
    problem = split_problem(cfg, 4)
    assert problem.startswith("image_projector.") and "parallel.tp = 4" in problem
    with pytest.raises(PartSplitError, match="image_projector"):
        part_parameters(cfg, 4, 1)


def test_plan_verb_shows_the_parts_of_the_smoke_config_with_generators(tmp_path, capsys):
    code = main(["plan", "--config", SMOKE, "--cluster", "h100x8", "--out", str(tmp_path), "--top", "3",
                 *GENERATORS])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "plan.yaml").is_file()
    written = load_config(tmp_path / "plan.yaml")
    parts = part_parameters(written, written.parallel.tp, written.parallel.ep)
    assert "multimodal parts on each GPU of" in out
    for part in parts:
        line = next(row for row in out.splitlines() if row.split()[:1] == [part.name])
        assert line.split()[1:3] == [f"{part.whole:,}", f"{part.params.total:,}"]
    assert {p.name for p in parts} >= {"vision", "video", "audio", "fusion", "speech", "image_gen", "video_gen"}
