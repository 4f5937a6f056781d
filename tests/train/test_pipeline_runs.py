"""Pipeline parallelism through the real trainer and DeepSpeed (subprocesses, gloo on CPU).

Every run takes 4 micro-batches of gradient accumulation per step (the pipeline's micro-batches)
and is compared, step by step, with the single-rank run on the same data: the logged loss (the
token-weighted mean of the whole step) and the gradient norm, which DeepSpeed sums over the stages.
"""

from __future__ import annotations

import pytest
import torch

from tests.train.runs import TEXT, assert_same_steps, records, run_train
from xoron_dist.train.tensorboard import read_scalars

# 3 layers, the first dense: the two stages get different numbers and kinds of layers.
COMMON = (TEXT, "model.llm.num_layers=3", "model.llm.dense_layers=1", "model.llm.pad_vocab_multiple=32",
          "train.seq_len=128", "train.grad_accum_steps=4", "train.log_every=1", "train.save_every=3")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    """The single-rank reference, 5 steps of micro-batch 2, run once for every test here."""
    root = tmp_path_factory.mktemp("pipeline-single")
    run_train(root, "single", "train.steps=5", "train.micro_batch_size=2", *COMMON)
    return records(root, "single")


def _assert_same_run(single: list[dict], ours: list[dict]) -> None:
    assert_same_steps(single, ours)
    for a, b in zip(single, ours, strict=False):
        assert b["label_tokens"] == a["label_tokens"], (a, b)
    assert single[-1]["loss"] < single[0]["loss"]


@pytest.mark.multirank
def test_two_stage_pipeline_and_its_resume_match_single_rank(tmp_path, single):
    """PP=2 (ZeRO-1) for 3 steps, then --resume to step 5: every step equals the uninterrupted
    single-rank run. Balanced by parameter count, stage 0 holds the embedding, the dense layer 0 and
    MoE layer 1, stage 1 MoE layer 2 and the head; each stage wrote its own checkpoint file."""
    proc = run_train(tmp_path, "pp2", "train.steps=3", "train.micro_batch_size=2", "parallel.pp=2", *COMMON,
                     world=2)
    assert "world 2 = dp 1 x tp 1 x pp 2" in proc.stderr
    assert "stage 0: layers 0-1" in proc.stderr and "stage 1: layers 2-2" in proc.stderr
    run_train(tmp_path, "pp2", "train.steps=5", "train.micro_batch_size=2", "parallel.pp=2", *COMMON,
              world=2, flags=("--resume",))
    _assert_same_run(single, records(tmp_path, "pp2"))
    assert len(records(tmp_path, "pp2")) == 5

    ckpt = tmp_path / "pp2" / "checkpoints" / "step00000003"
    last = torch.load(ckpt / "mp_rank_01_model_states.pt", map_location="cpu", weights_only=False)["module"]
    first = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert "embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {k.split(".")[1] for k in last if k.startswith("layers.")} == {"2"}
    assert last["layers.2.ffn.router.expert_bias"].abs().sum() > 0  # the bias update ran on stage 1
    # rank 0 (stage 0) writes TensorBoard, with the expert load of both stages' MoE layers
    tags = set(read_scalars(tmp_path / "pp2" / "tensorboard"))
    assert "moe/layer1/max_over_mean" in tags and "moe/layer2/max_over_mean" in tags


@pytest.mark.multirank
@pytest.mark.parametrize(("layout", "micro", "dp_tp"),
                         [(("parallel.tp=2",), 2, (1, 2)), ((), 1, (2, 1)), (("parallel.ep=2",), 1, (2, 1))],
                         ids=["pp2xtp2", "pp2xdp2", "pp2xdp2xep2"])
def test_four_rank_pipeline_layouts_match_single_rank(tmp_path, single, layout, micro, dp_tp):
    """PP=2 x TP=2, PP=2 x DP=2 and PP=2 x DP=2 with the experts of each stage spread over the 2 data
    ranks (EP=2, DeepSpeed's MoE path under ZeRO-1 in each stage's engine) on 4 ranks: 3 steps equal
    the single-rank run (DP: each data rank takes half of every micro-batch)."""
    proc = run_train(tmp_path, "pp", "train.steps=3", f"train.micro_batch_size={micro}", "parallel.pp=2", *layout,
                     *COMMON, world=4)
    assert "world 4 = dp {} x tp {} x pp 2".format(*dp_tp) in proc.stderr
    _assert_same_run(single, records(tmp_path, "pp"))
