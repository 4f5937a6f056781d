"""Expert parallelism through the real trainer and DeepSpeed: ZeRO stages, checkpoints, TP x EP, SP x EP.

The single-rank reference runs EP=1 with the whole global batch (micro batch 8) under ZeRO-1 (one run
per session, shared: the ``reference`` fixture); the expert-parallel runs split it over 2 data-parallel
ranks (micro batch 4 each) whose experts are spread over the same 2 ranks. (One rank's ZeRO-1 and
ZeRO-3 runs log the same 5 steps to 1e-7. DeepSpeed's ZeRO-0 clips gradients through other code; with
clipping active at these steps, Adam turns its last-bit differences into ~1e-4 by step 4, so a ZeRO-0
reference would test DeepSpeed's clipping, not expert parallelism.)
"""

from __future__ import annotations

import pytest

from tests.train.runs import LAYOUT_COMMON, REFERENCE_MB8, assert_same_steps, records, run_train

COMMON = (*LAYOUT_COMMON, "train.save_every=3")


@pytest.mark.multirank
@pytest.mark.parametrize("zero", [1, 3])
def test_expert_parallel_zero_run_and_resume_match_single_rank(tmp_path, zero, reference):
    """EP=2 under ZeRO-1 (DeepSpeed's MoE groups, per-expert checkpoint files) and ZeRO-3 (experts
    partitioned over their expert-data-parallel group): 3 steps equal the single-rank EP=1 run, and a
    run resumed from the step-3 checkpoint continues with the same losses."""
    single = reference(*REFERENCE_MB8)
    layout = ("parallel.ep=2", f"parallel.zero_stage={zero}", "train.micro_batch_size=4")
    proc = run_train(tmp_path, "ep2", "train.steps=3", *layout, *COMMON, world=2)
    assert "ep 2" in proc.stderr
    run_train(tmp_path, "ep2", "train.steps=5", *layout, *COMMON, world=2, flags=("--resume",))
    ep2 = records(tmp_path, "ep2")
    assert [r["step"] for r in ep2] == [1, 2, 3, 4, 5]
    assert_same_steps(single, ep2)
    checkpoint = tmp_path / "ep2" / "checkpoints" / "step00000003"
    if zero == 3:  # every rank's partition (its experts included) in its own file
        assert (checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    else:  # DeepSpeed's MoE layout: one file per expert of every MoE layer
        assert (checkpoint / "layer_1_expert_7_mp_rank_00_model_states.pt").is_file()


@pytest.mark.multirank
def test_tensor_and_expert_parallel_four_ranks_match_single_rank(tmp_path, reference):
    """4 ranks: TP=2 x EP=2 (dp 2, experts split on their FFN dim over TP) under ZeRO-2: losses and grad
    norms of 3 steps equal one rank's."""
    layout = ("parallel.ep=2", "parallel.tp=2", "parallel.zero_stage=2", "train.micro_batch_size=4")
    proc = run_train(tmp_path, "tp2ep2", "train.steps=3", *layout, *COMMON, world=4)
    assert "world 4 = dp 2 x tp 2" in proc.stderr and "ep 2" in proc.stderr
    ours = records(tmp_path, "tp2ep2")
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert_same_steps(reference(*REFERENCE_MB8), ours)


@pytest.mark.multirank
def test_sequence_and_expert_parallel_under_zero3_four_ranks_match_single_rank(tmp_path, reference):
    """4 ranks: dp 2 x sp 2 with EP=2 carved out of the sequence ranks, ZeRO-3. ZeRO-3 partitions (and
    reduces) dense weights over data x sequence ranks and experts over their replicas; the loss scale
    cancels its divisor (parallel/engine.py), so losses and grad norms equal one rank's."""
    layout = ("parallel.ep=2", "parallel.sp=2", "parallel.zero_stage=3", "train.micro_batch_size=4")
    proc = run_train(tmp_path, "sp2ep2", "train.steps=3", *layout, *COMMON, world=4)
    assert "world 4 = dp 2 x tp 1 x pp 1 x sp 2; ep 2; ZeRO-3" in proc.stderr
    ours = records(tmp_path, "sp2ep2")
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert_same_steps(reference(*REFERENCE_MB8), ours)
