"""A parallel layout per curriculum stage (``stages[i].parallel``; issue 15 item 4) and the CPU-sized full
curriculum (``pipelines/curriculum_smoke.yaml``; item 5).

At a stage boundary where the layout changes, the trainer destroys the engine, re-forms the groups
(``parallel_state.switch_layout``) and reslices the finished stage's final checkpoint into the new layout
with the ``--reshard`` code (``train/reshard.py``). The proof is the one ``test_reshard.py`` uses: the first
loss of the new stage equals a one-rank reference that loads the same consolidated weights (its helpers are
imported, not copied). The trainer runs in-process on the multi-rank harness's forked ranks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.parallel.harness import run_ranks
from tests.train.runs import losses, records
from tests.train.test_reshard import _moments, _reference_loss, _train_rank

REPO = Path(__file__).resolve().parents[2]
CURRICULUM = REPO / "pipelines" / "curriculum_smoke.yaml"
# dp2 ZeRO-1 for 2 steps (global batch 2 ranks x 4 rows), then tp2 (dp 1, 4 rows) carrying Adam's moments, then
# sp2 x dp1 (ring attention, 4 rows): the batch of step k + 1 is the one test_reshard's reference takes at
# position k (4 rows of 64 tokens)
DP_TP_SP = ("train.micro_batch_size=4", "train.steps=4", "train.keep_checkpoints=3",
            "stages=[{name: dp, steps: 2}, {name: tp, steps: 1, parallel: {tp: 2}, carry_optimizer: true}, "
            "{name: sp, steps: 1, parallel: {sp: 2}}]")


@pytest.mark.multirank
def test_dp2_then_tp2_then_sp2_first_losses_equal_one_rank_on_the_consolidated_weights(tmp_path):
    """Two layout changes in one run: dp2 ZeRO-1 -> tp2 (Adam's moments carried: the stage sets
    carry_optimizer) -> sp2 x dp1. The first loss of each new stage equals a one-rank reference that loads the
    same consolidated weights."""
    run_ranks(_train_rank, 2, str(tmp_path), DP_TP_SP, False, timeout=240)
    run = tmp_path / "run"
    logged = records(tmp_path, "run")
    assert [r["stage"] for r in logged] == ["dp", "dp", "tp", "sp"]
    loss = losses(tmp_path, "run")
    assert loss[3] == pytest.approx(_reference_loss(tmp_path), rel=1e-5, abs=1e-6)
    assert loss[4] == pytest.approx(_reference_loss(tmp_path, step=3), rel=1e-5, abs=1e-6)
    # each stage's checkpoint is written in its own layout and names it by its config hash
    assert not (run / "checkpoints" / "step00000002" / "mp_rank_01_model_states.pt").exists()
    assert (run / "checkpoints" / "step00000003" / "mp_rank_01_model_states.pt").is_file()
    hashes = {json.loads((run / "checkpoints" / tag / "trainer_state.json").read_text())["state"]["config_hash"]
              for tag in ("step00000002", "step00000003", "step00000004")}
    assert len(hashes) == 3

    # The tp stage continued the dp stage's Adam: step count 2 + 1, and exp_avg_sq = beta2 * the carried one
    # + (1 - beta2) * grad^2 >= beta2 * the carried one everywhere (fresh moments, (1 - beta2) * grad^2 alone,
    # fall below it almost everywhere)
    first, carried = _moments(tmp_path, "step00000002"), _moments(tmp_path, "step00000003")
    assert (first.step, carried.step) == (2, 3)
    for name, before in first.moments["exp_avg_sq"].items():
        assert (carried.moments["exp_avg_sq"][name] >= 0.95 * before * (1 - 1e-5)).all(), name

    from xoron_dist.config import ConfigError, load_config
    from xoron_dist.export import consolidate
    from xoron_dist.train.stages import plan_stages
    from xoron_dist.train.trainer import RunPaths, _layout_to_reshard

    assert consolidate(run / "checkpoints" / "step00000003").cfg.parallel.tp == 2  # found by the stage's hash
    # a resume of the tp2 stage's checkpoint on 1 rank is compared with that stage's layout (tp2, not the run's
    # tp1: only the world size differs): refused without --reshard, naming the change; with it, resliced
    cfg = load_config(run / "config.yaml")
    with pytest.raises(ConfigError, match=r"saved with another layout \(world size 2 -> 1\); pass --reshard"):
        _layout_to_reshard(cfg, plan_stages(cfg), RunPaths(run), "step00000003", 1)
    cfg = load_config(run / "config.yaml", ["train.reshard=true"])
    assert _layout_to_reshard(cfg, plan_stages(cfg), RunPaths(run), "step00000003", 1).cfg.parallel.tp == 2


def test_stage_layouts_are_validated_by_the_rules_and_leave_the_run_hash_alone():
    from xoron_dist.config import ConfigError, load_config
    from xoron_dist.parallel.layout import LayoutError, validate_layouts
    from xoron_dist.train.checkpoint import config_for_hash, config_hash, layout_configs

    cfg = load_config(CURRICULUM)
    layouts = validate_layouts(cfg, 2)
    assert [(lay.dp, lay.tp, lay.zero_stage) for lay in layouts] == [(2, 1, 1), (2, 1, 1), (2, 1, 2), (2, 1, 2),
                                                                     (1, 2, 1), (1, 2, 1)]
    # per-stage sections do not change the run's hash; a run without them hashes as before
    plain = dataclasses.replace(cfg, stages=[dataclasses.replace(s, parallel={}) for s in cfg.stages])
    assert config_hash(plain) == config_hash(cfg) == config_hash(dataclasses.replace(cfg, stages=[]))
    stage4 = layout_configs(cfg)[3]  # [run, pretrain, generation, long_context, instruct]
    assert config_for_hash(config_hash(stage4), cfg).parallel.tp == 2

    stages = list(cfg.stages)
    stages[2] = dataclasses.replace(stages[2], parallel={"zero_stage": 3, "tp": 3, "ep": 2})
    with pytest.raises(LayoutError) as err:
        validate_layouts(dataclasses.replace(cfg, stages=stages), 2)
    assert "stages[2] ('pretrain') parallel layout (tp=3" in str(err.value)
    assert "not divisible by stages[2].parallel.tp = 3" in str(err.value)
    assert "tp_experts = true with stages[2].parallel.ep=2, stages[2].parallel.tp=3" in str(err.value)
    stages[2] = dataclasses.replace(stages[2], parallel={"zero_stag": 3})
    with pytest.raises(ConfigError, match=r"unknown config key 'stages\[2\]\.parallel\.zero_stag'; did you mean"):
        dataclasses.replace(cfg, stages=stages)
    from xoron_dist.train.stages import plan_stages

    stages = [dataclasses.replace(cfg.stages[0], carry_optimizer=True), *cfg.stages[1:]]
    with pytest.raises(ConfigError, match=r"'stages\[0\]\.carry_optimizer' = True is invalid: the first stage has no "
                                          r"previous stage"):
        plan_stages(dataclasses.replace(cfg, stages=stages))

    # the full recipe: each stage's xoron plan layout for 4 nodes x 8 GPUs
    full = load_config(REPO / "pipelines" / "xoron_full.yaml")
    assert [(lay.dp, lay.tp, lay.sp) for lay in validate_layouts(full, 32)] == [
        (32, 1, 1), (32, 1, 1), (32, 1, 1), (16, 2, 1), (4, 1, 8), (32, 1, 1)]


class InjectedCrash(RuntimeError):
    """Raised on every rank inside a step: the run dies there without a checkpoint, as a killed job does."""


def _curriculum_cfg(root: str, data: str, steps: tuple[int, ...]):
    from xoron_dist.config import load_config

    cfg = load_config(CURRICULUM, [f"data.path={data}", f"train.output_dir={root}", "train.name=run",
                                   f"train.steps={sum(steps)}", "train.micro_batch_size=1", "train.save_every=4",
                                   "train.log_every=1", "train.keep_checkpoints=10",
                                   "data.num_workers=0"])  # harness ranks are daemons: no loader workers
    stages = [dataclasses.replace(stage, steps=n) for stage, n in zip(cfg.stages, steps, strict=True)]
    return dataclasses.replace(cfg, stages=stages)


def _curriculum_rank(root: str, data: str, steps: tuple[int, ...], crash_at: int | None, resume: bool):
    """One rank of the curriculum run; ``crash_at``: the step (counted in this process) that raises
    ``InjectedCrash``. Returns how the run ended and how many steps this process started."""
    from xoron_dist.train import step
    from xoron_dist.train.trainer import train

    started, real_run = [], step.StepRunner.run

    def run(self, batches):
        started.append(1)
        if len(started) == crash_at:
            raise InjectedCrash(f"injected crash in this process's step {crash_at}")
        return real_run(self, batches)

    step.StepRunner.run = run
    try:
        train(_curriculum_cfg(root, data, steps), resume=resume)
    except InjectedCrash:
        return "crashed", len(started)
    return "done", len(started)


@pytest.mark.multirank
def test_curriculum_smoke_killed_in_its_generation_stage_resumes_there(tmp_path, smoke_data):
    """All six stages of curriculum_smoke.yaml on 2 ranks (1, 1, 1, 2, 1, 1 steps; layouts dp2 ZeRO-1 ->
    dp2 ZeRO-1 -> dp2 ZeRO-2 -> dp2 ZeRO-2 -> tp2 -> tp2), crashed in the second step of the generation
    stage (after its step-4 checkpoint), resumed: it continues at step 5 in that stage's own layout, trains
    only steps 5-7, and crosses the later layout change."""
    steps = (1, 1, 1, 2, 1, 1)
    first = run_ranks(_curriculum_rank, 2, str(tmp_path), str(smoke_data), steps, 5, False, timeout=400)
    assert first == [("crashed", 5)] * 2
    run = tmp_path / "run"
    assert json.loads((run / "checkpoints" / "step00000004" / "trainer_state.json").read_text()
                      )["state"]["stage_name"] == "generation"
    second = run_ranks(_curriculum_rank, 2, str(tmp_path), str(smoke_data), steps, None, True, timeout=400)
    assert second == [("done", 3)] * 2  # steps 5, 6, 7: no finished stage again
    logged = records(tmp_path, "run")
    assert [(r["step"], r["stage"]) for r in logged] == [
        (1, "codec"), (2, "align"), (3, "pretrain"), (4, "generation"), (5, "generation"), (6, "long_context"),
        (7, "instruct")]
    assert all(r["loss"] == r["loss"] for r in logged)  # finite
    assert logged[0]["loss_codec"] == logged[0]["loss_codec"]  # the codec stage's objective ran (finite)
    assert (run / "checkpoints" / "step00000007" / "mp_rank_01_model_states.pt").is_file()  # tp2 at the end
    hashes = [json.loads((run / "checkpoints" / f"step{i:08d}" / "trainer_state.json").read_text()
                         )["state"]["config_hash"] for i in range(1, 8)]
    assert hashes[0] == hashes[1] != hashes[2] == hashes[3] == hashes[4] != hashes[5] == hashes[6]  # ZeRO-1 | 2 | tp2
