"""Layout validation: each rule's message, dp arithmetic, and the compatibility table the README embeds."""

from __future__ import annotations

import pytest

from xoron_dist.config import ConfigError, load_config
from xoron_dist.parallel.layout import (
    RULES,
    SUPPORTED,
    Layout,
    LayoutError,
    compatibility_markdown,
    validate_layout,
)


def _cfg(*overrides: str):
    return load_config(None, ["preset=tiny", *overrides])  # tiny: 4 heads, 2 layers, 8 experts, seq 128


def _error(world: int, *overrides: str) -> str:
    with pytest.raises(LayoutError) as err:
        validate_layout(_cfg(*overrides), world)
    return str(err.value)


def test_layout_error_is_a_config_error():
    assert issubclass(LayoutError, ConfigError)


def test_single_rank_default_layout():
    assert validate_layout(_cfg(), 1) == Layout(world=1, dp=1, tp=1, pp=1, sp=1, ep=1, zero_stage=1)


def test_valid_eight_rank_layout_computes_dp():
    layout = validate_layout(_cfg("parallel.tp=2", "parallel.pp=2", "parallel.ep=2"), 8)
    assert (layout.dp, layout.tp, layout.pp, layout.sp, layout.ep) == (2, 2, 2, 1, 2)
    assert layout.expert_dp == 1
    layout = validate_layout(_cfg("parallel.sp=2", "parallel.ep=4"), 8)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    assert validate_layout(_cfg("parallel.zero_stage=3"), 8).dp == 8


@pytest.mark.parametrize(
    ("world", "overrides", "fragments"),
    [
        (6, ["parallel.tp=2", "parallel.pp=2"],
         ["world size 6 is not divisible by tp*pp*sp = 4", "launch a multiple of 4", "1, 2, 3, 6"]),
        (3, ["parallel.tp=3"], ["model.llm.num_heads = 4", "parallel.tp = 3", "pick tp from 1, 2, 4"]),
        (3, ["parallel.pp=3"], ["model.llm.num_layers = 2 is fewer than parallel.pp = 3", "pick pp from 1 to 2"]),
        (3, ["parallel.ep=3"], ["model.llm.moe.num_experts = 8", "parallel.ep = 3", "pick ep from 1, 2, 4, 8"]),
        (4, ["parallel.tp=2", "parallel.ep=4"],
         ["parallel.ep = 4 does not divide dp*sp = 2", "world % (tp*ep*pp)", "use ep from 1, 2"]),
        (2, ["parallel.sp=2", "train.seq_len=130"],
         ["train.seq_len = 130 is not divisible by 2*sp = 4", "zig-zag", "128 or 132"]),
        (2, ["parallel.pp=2", "parallel.zero_stage=3"],
         ["parallel.zero_stage = 3 with parallel.pp = 2", "use parallel.zero_stage=1"]),
        (2, ["parallel.pp=2", "parallel.zero_stage=2"], ["ZeRO-2 and ZeRO-3 are incompatible"]),
        (2, ["parallel.pp=2", "parallel.zero_stage=0"],
         ["parallel.zero_stage = 0 with parallel.pp = 2", "first pipeline stage only", "use parallel.zero_stage=1"]),
        (2, ["parallel.pp=2", "model.llm.tie_word_embeddings=true", "train.precision=bf16",
             "train.grad_accum_dtype=fp32"],
         ["model.llm.tie_word_embeddings = true with parallel.pp = 2 and bf16 weights", "BF16_Optimizer",
          "set train.grad_accum_dtype=bf16"]),
    ],
)
def test_each_rule_says_what_is_wrong_the_numbers_and_the_fix(world, overrides, fragments):
    message = _error(world, *overrides)
    for fragment in fragments:
        assert fragment in message


def test_stage_seq_len_is_checked_too():
    cfg = load_config(None, ["preset=tiny", "parallel.sp=2"])
    cfg.stages = [type(cfg).from_dict({"stages": [{"name": "long", "seq_len": 1030}]}).stages[0]]
    with pytest.raises(LayoutError, match=r"stages\[0\].seq_len \(long\) = 1030"):
        validate_layout(cfg, 2)


def test_all_problems_reported_at_once():
    message = _error(6, "parallel.tp=3", "parallel.ep=3")
    # heads, FFN dims, experts, ep vs dp*sp = 2
    assert message.count("\n  - ") == 4
    assert message.startswith("parallel layout (tp=3, pp=1, sp=1, ep=3, zero_stage=1) does not fit a world of 6")


def test_pipeline_parallel_is_built_and_splits_unevenly():
    layout = validate_layout(_cfg("parallel.pp=2", "parallel.tp=2"), 8)
    assert (layout.dp, layout.tp, layout.pp) == (2, 2, 2)
    assert validate_layout(_cfg("parallel.pp=2", "model.llm.num_layers=3"), 2).pp == 2  # 3 layers on 2 stages


def test_arithmetic_problems_name_the_product():
    message = _error(4, "parallel.tp=3")
    assert "not divisible by tp*pp*sp = 3" in message


def test_compatibility_table_lists_every_dimension_and_rule():
    table = compatibility_markdown()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Dimension |") and len(lines) == 2 + len(SUPPORTED)
    for dim in SUPPORTED:
        assert dim.title in table and dim.engine in table
    for rule in RULES:
        assert rule.requirement in table


def test_encoder_heads_must_divide_over_tp():
    message = _error(2, "parallel.tp=2", "data.source=arrow", "data.path=x", "model.vision.enabled=true",
                     "model.vision.num_heads=3", "model.vision.hidden_size=48", "model.fusion.layers=[0]")
    assert "model.vision.num_heads = 3 is not divisible by parallel.tp = 2" in message


def test_tensor_parallel_rules():
    assert "expert_intermediate_size = 64 is not divisible by parallel.tp = 3" in _error(
        3, "parallel.tp=3", "model.llm.num_heads=3", "model.llm.moe.num_shared_experts=0")
    assert "tp_experts=false keeps routed experts whole" in _error(
        3, "parallel.tp=3", "model.llm.num_heads=3", "model.llm.moe.num_shared_experts=0")
    validate_layout(_cfg("parallel.tp=2"), 2)
    message = _error(2, "parallel.tp=2", "parallel.sequence_parallel=true")
    assert "parallel.sequence_parallel = true" in message and "not built yet" in message


def test_expert_parallel_layouts_are_accepted():
    assert validate_layout(_cfg("parallel.ep=2", "parallel.zero_stage=3"), 2).ep == 2
    assert validate_layout(_cfg("parallel.ep=2", "parallel.tp=2"), 4).expert_dp == 1
    assert validate_layout(_cfg("parallel.ep=2", "parallel.sp=2"), 2).dp == 1  # experts over sequence ranks
    assert validate_layout(_cfg("parallel.ep=2", "parallel.sp=2", "parallel.zero_stage=3"), 4).expert_dp == 2
