"""The trainer end to end, through the real entry points (subprocesses, gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.runs import (
    LAYOUT_COMMON,
    REFERENCE_MB4,
    REFERENCE_MB8,
    REPO,
    SMOKE,
    TEXT,
    assert_same_steps,
    clean_env,
    deepspeed_launcher,
    finish,
    losses,
    records,
    run_rank,
    run_train,
    start_ranks,
)
from xoron_dist.parallel.launcher_env import free_port
from xoron_dist.train.tensorboard import read_media_tags, read_scalars, read_text


def test_smoke_run_end_to_end_with_tensorboard_and_resume(tmp_path, smoke_data):
    """The README's main job: loss falls, events and a checkpoint are written, --resume continues."""
    cmd = [shutil.which("xoron") or "xoron", "train", "--config", str(SMOKE), f"train.output_dir={tmp_path}",
           f"data.path={smoke_data}"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = tmp_path / "smoke"
    scalars = read_scalars(run / "tensorboard")
    loss = dict(scalars["train/loss"])
    steps = sorted(loss)
    assert steps[-1] == 120 and len(steps) == 12
    # visibly learning, not noise: the mean of the last three logged losses (one logged loss is a 10-step mean
    # that swings by ~0.5 with the mix of kinds in those steps)
    assert sum(loss[s] for s in steps[-3:]) / 3 < loss[steps[0]] - 3.0, loss
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "moe/layer0/max_over_mean",
                "moe/layer1/expert7/tokens", "moe/layer1/expert7/bias"):
        assert tag in scalars, tag
    tokens = sum(scalars[f"moe/layer0/expert{j}/tokens"][-1][1] for j in range(8))
    assert tokens == 4 * 256 * 2  # every token of the step routed to top-2 experts
    assert "model:" in read_text(run / "tensorboard")["config"][0][1]
    media = read_media_tags(run / "tensorboard")  # what the generators made at steps 60 and 120
    assert {"samples/image/0", "samples/video/0"} <= set(media["images"]) and "samples/speech/0" in media["audio"]
    logged_steps = records(tmp_path, "smoke")
    for name in ("image_vae", "text_to_image", "video_vae", "text_to_video", "codec", "tts"):
        logged = [r[f"loss_{name}"] for r in logged_steps if f"loss_{name}" in r]
        assert logged and all(math.isfinite(v) and v != 0.0 for v in logged), name  # only steps with its items
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000120"
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    assert "using cached prepared data" in proc.stderr
    again = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 2 and "Pass --resume to continue it" in again.stderr

    run_train(tmp_path, "smoke", f"data.path={smoke_data}", "train.steps=125", flags=("--resume",))
    assert sorted(losses(tmp_path, "smoke")) == list(range(1, 126))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000125"


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    common = (TEXT, "train.save_every=3", "train.log_every=1", "train.micro_batch_size=2",
              "train.grad_accum_steps=2")
    run_train(tmp_path, "straight", "train.steps=6", "train.peak_tflops=0.001", *common)
    run_train(tmp_path, "split", "train.steps=3", *common)
    # the resumed run profiles steps 5..6 (train.profile): tracing changes no loss
    run_train(tmp_path, "split", "train.steps=6", "train.profile.start=5", *common, flags=("--resume",))
    straight, split = losses(tmp_path, "straight"), losses(tmp_path, "split")
    assert sorted(p.name for p in (tmp_path / "split" / "profile").iterdir()) == [
        "rank0_steps5-6.json.gz", "rank0_steps5-6.txt"]
    # The expert biases travel in the checkpoint (module buffers) and have moved from zero.
    states = torch.load(tmp_path / "split" / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert states["layers.0.ffn.router.expert_bias"].abs().sum() > 0
    assert sorted(split) == list(range(1, 7))
    for step in range(4, 7):
        assert split[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), (step, split, straight)
    # TFLOP/s in the log of every timed step (not the warm-up step); MFU only with a peak (CPU: the override)
    peaked = records(tmp_path, "straight")
    assert peaked[0]["tflops"] is None and "mfu" not in peaked[0]
    assert all(r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.001) for r in peaked[1:])
    scalars = read_scalars(tmp_path / "straight" / "tensorboard")
    assert [step for step, _ in scalars["perf/tflops"]] == [step for step, _ in scalars["perf/mfu"]] == [2, 3, 4, 5, 6]
    unpeaked = records(tmp_path, "split")
    assert unpeaked[1]["tflops"] > 0 and not any("mfu" in r for r in unpeaked)


def launch_two_ranks(launcher: str, tmp_path: Path, name: str, *overrides: str) -> str:
    """Start a 2-rank CPU training job the way ``launcher`` would; return rank 0's stderr."""
    args = ["--config", str(SMOKE), f"train.output_dir={tmp_path}", f"train.name={name}", *overrides]
    port = str(free_port())
    commands = {
        "deepspeed": [deepspeed_launcher(2) + args],
        "torchrun": [[shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m",
                      "xoron_dist.train", *args]],
        "mpiexec": [[shutil.which("mpiexec") or "mpiexec", "-n", "2", sys.executable, "-m", "xoron_dist.train", *args]],
        # srun starts each task itself with these variables; no launcher process in between.
        "srun": [[sys.executable, "-m", "xoron_dist.train", *args] for _ in range(2)],
    }[launcher]
    procs = []
    for task, cmd in enumerate(commands):
        env = clean_env()
        if launcher == "srun":
            env.update(SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=port)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{launcher} run failed:\n{err[-5000:]}"
    return outputs[0][1]


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpiexec", "srun"])
def test_two_rank_data_parallel_matches_single_rank(tmp_path, launcher, reference):
    """Every launcher: 2 CPU ranks, ZeRO-1, micro batch 4 each == 1 rank with micro batch 8."""
    if launcher == "mpiexec" and shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec (pip install mpich)")
    single = reference(*REFERENCE_MB8)
    # one launcher's run also profiles step 2 on every rank (train.profile): it changes no step
    profile = ("train.profile.start=2", "train.profile.steps=1", "train.profile.ranks=[]") if launcher == "srun" else ()
    err = launch_two_ranks(launcher, tmp_path, "dp2", *LAYOUT_COMMON, "train.steps=3", "train.micro_batch_size=4",
                           "train.save_every=100", *profile)
    assert "world 2 = dp 2" in err
    dp2 = records(tmp_path, "dp2")
    assert [r["step"] for r in dp2] == [1, 2, 3]
    assert_same_steps(single, dp2)
    if profile:
        assert sorted(p.name for p in (tmp_path / "dp2" / "profile").glob("*.txt")) == [
            "rank0_steps2-2.txt", "rank1_steps2-2.txt"]
    assert single[2]["loss"] < single[0]["loss"]


def test_build_prints_the_full_model_on_meta():
    proc = subprocess.run([shutil.which("xoron") or "xoron", "build"], env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12 layers, hidden 1024, 16 heads, 8+1 experts (top-2; MoE on layers 1, 3, 5, 7, 9, 11)" in proc.stdout
    total = next(line for line in proc.stdout.splitlines() if line.startswith("total"))
    # embedding 151,936 x 1024 (tied head); 12 x MLA (q 1536, kv 512 + 32 rope, up 2048, out 1024) and norms;
    # 6 dense + 6 shared SwiGLUs of 2048, 6 x 8 routed experts of 2048, 6 routers
    assert int(total.split()[-1].replace(",", "")) == 583_875_584


def module_state(run: Path, step: int) -> dict:
    path = run / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


STAGES = (TEXT, "train.steps=7", "train.save_every=1", "train.log_every=1", "train.keep_checkpoints=10",
          "stages=[{name: warm, steps: 4, lr: 0.003}, "
          "{name: frozen, steps: 3, lr: 0.001, seq_len: 128, freeze: [embed_tokens], expert_bias_update: false}]")


def test_curriculum_stages_freeze_and_resume_across_the_boundary(tmp_path):
    run_train(tmp_path, "staged", *STAGES)
    staged = records(tmp_path, "staged")
    assert [r["stage"] for r in staged] == ["warm"] * 4 + ["frozen"] * 3
    assert staged[4]["label_tokens"] == staged[0]["label_tokens"] // 2  # stage 2 trains on 128-token rows
    # each stage's own peak lr (train.lr is the smoke run's 3e-3): stage 2 warms up towards 0.001
    assert max(r["lr"] for r in staged[4:]) <= 0.001 * (1 + 1e-6) < max(r["lr"] for r in staged[:4])
    warm_end, frozen_end = module_state(tmp_path / "staged", 4), module_state(tmp_path / "staged", 7)
    assert torch.equal(warm_end["embed_tokens.weight"], frozen_end["embed_tokens.weight"])
    assert torch.equal(warm_end["layers.0.ffn.router.expert_bias"], frozen_end["layers.0.ffn.router.expert_bias"])
    assert not torch.equal(warm_end["lm_head.weight"], frozen_end["lm_head.weight"])

    # A crash right after the checkpoint at the stage boundary (step 4), or inside stage 2 (step 6):
    # keep only the checkpoints up to there, resume, and get the straight run's losses.
    straight = losses(tmp_path, "staged")
    for crash_after in (4, 6):
        name = f"crash{crash_after}"
        shutil.copytree(tmp_path / "staged", tmp_path / name)
        ckpts = tmp_path / name / "checkpoints"
        for tag in ckpts.glob("step*"):
            if int(tag.name[4:]) > crash_after:
                shutil.rmtree(tag)
        (ckpts / "latest").write_text(f"step{crash_after:08d}")
        run_train(tmp_path, name, *STAGES, flags=("--resume",))
        resumed = losses(tmp_path, name)
        assert sorted(resumed) == list(range(1, 8))
        for step in range(crash_after + 1, 8):
            assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), (crash_after, step)


def test_stage_config_errors_come_before_training(tmp_path):
    proc = run_rank(["--config", str(SMOKE), f"train.output_dir={tmp_path}", TEXT, "train.steps=5",
                     "stages=[{name: a, steps: 2}, {name: b, steps: 2}]"], timeout=120)
    assert proc.returncode == 2
    assert ("'train.steps' = 5 is invalid: with curriculum stages it must equal the sum of stages[*].steps (4)"
            in proc.stderr)
    assert "joined" not in proc.stderr  # refused before any process group


def test_arrow_data_resume_is_exact_with_loader_workers(tmp_path, smoke_data):
    """Mid-epoch resume on prepared shards with a loader worker and gradient accumulation."""
    common = (f"data.path={smoke_data}", "data.num_workers=1", "train.save_every=3", "train.log_every=1",
              "train.micro_batch_size=2", "train.grad_accum_steps=2")
    run_train(tmp_path, "straight", "train.steps=6", *common)
    run_train(tmp_path, "split", "train.steps=3", *common)
    run_train(tmp_path, "split", "train.steps=6", *common, flags=("--resume",))
    straight, split = losses(tmp_path, "straight"), losses(tmp_path, "split")
    for step in range(4, 7):
        assert split[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), (step, split, straight)


def test_arrow_stages_choose_kinds_and_a_corrupt_shard_is_named(tmp_path, smoke_data):
    run_train(tmp_path, "kinds", f"data.path={smoke_data}", "train.steps=4", "train.save_every=2",
              "stages=[{name: all, steps: 2}, {name: captions, steps: 2, kinds: [image_caption, video_caption], "
              "mix: {image_caption: 3, video_caption: 1}}]")
    state = torch.load(tmp_path / "kinds" / "checkpoints" / "step00000004" / "rng_rank0.pt", weights_only=False)
    assert set(state["data_position"]["source"]["datasets"]) == {"image_caption", "video_caption"}

    broken = tmp_path / "broken-data"
    shutil.copytree(smoke_data, broken)
    shard = next((broken / "text").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = run_rank(["--config", str(SMOKE), f"train.output_dir={tmp_path}", "train.name=broken",
                     f"data.path={broken}"], timeout=120)
    assert proc.returncode == 2
    assert f"CorruptShardError: shard {shard}" in proc.stderr and "truncated or replaced" in proc.stderr


@pytest.mark.multirank
def test_tensor_parallel_run_and_resume_match_single_rank(tmp_path, reference):
    """TP=2 through DeepSpeed (mpu, ZeRO-1, grad clipping): the logged losses and grad norms equal one
    rank's, unscaled by TP; a resumed TP run (per-rank mp_rank_XX checkpoint files) continues exactly."""
    tp2 = (*LAYOUT_COMMON, "parallel.tp=2", "train.save_every=3")
    proc = run_train(tmp_path, "tp2", "train.steps=3", *tp2, world=2)
    assert "world 2 = dp 1 x tp 2" in proc.stderr
    run_train(tmp_path, "tp2", "train.steps=5", *tp2, world=2, flags=("--resume",))
    ours = records(tmp_path, "tp2")
    assert [r["step"] for r in ours] == [1, 2, 3, 4, 5]
    assert_same_steps(reference(*REFERENCE_MB4), ours)
    assert (tmp_path / "tp2" / "checkpoints" / "step00000003" / "mp_rank_01_model_states.pt").is_file()


@pytest.mark.multirank
@pytest.mark.parametrize("world,layout", [(2, ("parallel.sp=2",)), (4, ("parallel.sp=2", "parallel.tp=2"))],
                         ids=["sp2", "tp2xsp2"])
def test_sequence_parallel_runs_match_single_rank(tmp_path, world, layout, reference):
    """Ring attention through DeepSpeed: each SP rank holds half of every row; the logged loss and
    grad norm of 3 AdamW steps equal one rank's (DeepSpeed sums gradients over dp x sp)."""
    proc = run_train(tmp_path, "parallel", *layout, *LAYOUT_COMMON, "train.steps=3",
                     world=world)
    assert "sp 2" in proc.stderr
    ours = records(tmp_path, "parallel")
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert_same_steps(reference(*REFERENCE_MB4), ours)


def test_sequence_that_does_not_split_is_refused_before_any_collective(tmp_path):
    args = ["--config", str(SMOKE), f"train.output_dir={tmp_path}", TEXT, "parallel.sp=2", "train.seq_len=250"]
    for status, err in finish(start_ranks(2, args, launcher="deepspeed"), timeout=180, stop_others=False):
        assert status == 2, err[-3000:]
        assert "train.seq_len = 250 is not divisible by 2*sp = 4" in err
        assert "joined" not in err  # refused before torch.distributed or any group existed


def test_chunked_loss_run_matches_the_one_piece_run(tmp_path):
    """train.loss_chunk_tokens: the same losses and gradient norms as the one-piece head (3 steps)."""
    common = (TEXT, "train.steps=3", "train.log_every=1")
    run_train(tmp_path, "whole", *common, "train.loss_chunk_tokens=0")
    run_train(tmp_path, "chunked", *common, "train.loss_chunk_tokens=100")
    whole, chunked = records(tmp_path, "whole"), records(tmp_path, "chunked")
    assert [r["step"] for r in chunked] == [1, 2, 3]
    assert_same_steps(whole, chunked)


def test_bf16_lane_on_cpu_tracks_the_fp32_run(tmp_path):
    """train.precision=bf16 on CPU: DeepSpeed's bf16 path (fp32 master weights; at ZeRO-1 the BF16_Optimizer,
    summing 2 micro-batches' gradients in fp32) gives the fp32 run's losses and gradient norms within bf16
    tolerance over 5 steps; a gradient counted twice in the accumulation is 1.5x off."""
    common = (TEXT, "train.steps=5", "train.log_every=1", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    run_train(tmp_path, "fp32", *common, "train.precision=fp32")
    run_train(tmp_path, "bf16", *common, "train.precision=bf16")
    ds = json.loads((tmp_path / "bf16" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["data_types"]["grad_accum_dtype"] == "fp32"
    fp32, bf16 = records(tmp_path, "fp32"), records(tmp_path, "bf16")
    assert [r["step"] for r in bf16] == [1, 2, 3, 4, 5]
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2), (a, b)
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32, bf16, strict=True))  # it did compute in bf16


def test_bf16_lane_trains_every_modality(tmp_path, smoke_data):
    """The multimodal smoke model (every encoder and generator) trains in bf16 on CPU: the first GPU smoke run
    died on dtype mixes the text lane cannot reach (the speaker encoder's fp32 filters and BatchNorm
    statistics beside bf16 activations); each objective's loss is finite. Its TensorBoard samples are made
    from the bf16 weights at step 2 (speech generation took fp32 inputs: a bf16 smoke run died at step 60)."""
    run_train(tmp_path, "bf16", f"data.path={smoke_data}", "train.steps=2", "train.log_every=1",
              "train.precision=bf16", "train.sample_every=2")
    assert json.loads((tmp_path / "bf16" / "ds_config.json").read_text())["bf16"]["enabled"] is True
    logged = records(tmp_path, "bf16")
    assert [r["step"] for r in logged] == [1, 2]
    objectives = {k: v for r in logged for k, v in r.items() if k == "loss" or k.startswith("loss_")}
    assert {"loss_codec", "loss_tts"} <= objectives.keys(), objectives  # the speech path that failed
    assert all(math.isfinite(v) for v in objectives.values()), objectives


@pytest.mark.multirank
@pytest.mark.skipif(not os.environ.get("XORON_MORE_LAYOUTS"), reason="by hand (8 ranks): XORON_MORE_LAYOUTS=1")
def test_multimodal_eight_rank_layout_matches_single_rank(tmp_path, smoke_data):
    """The multimodal smoke model (vision, video and audio encoders, fusion; no generators: SP refuses them)
    on PP2 x TP2 x SP2 with the experts over EP2 (dp 1, so the same global batch): the logged loss and
    grad norm of 3 steps equal one rank's. 8 ranks on 2 CPU cores: minutes, so by hand, not in CI."""
    common = (f"data.path={smoke_data}", "model.speech.enabled=false", "model.image_gen.enabled=false",
              "model.video_gen.enabled=false", "train.sample_every=0", "train.log_every=1", "train.steps=3",
              "train.grad_accum_steps=4", "parallel.zero_stage=1")
    run_train(tmp_path, "single", *common, timeout=600)
    layout = ("parallel.pp=2", "parallel.tp=2", "parallel.sp=2", "parallel.ep=2")
    run_train(tmp_path, "parallel", *layout, *common, world=8, timeout=1200)
    ours = records(tmp_path, "parallel")
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert_same_steps(records(tmp_path, "single"), ours)


@pytest.mark.multirank
@pytest.mark.skipif(not os.environ.get("XORON_MORE_LAYOUTS"), reason="by hand (4 ranks): XORON_MORE_LAYOUTS=1")
def test_multimodal_zero3_with_generators_under_tp_and_ep_matches_data_parallel(tmp_path, smoke_data):
    """The whole smoke model (every encoder and generator) under ZeRO-3 with samples: DP2 x TP2 (4 ranks) and
    DP2 with EP2 log the losses and grad norms of plain DP2 over 4 steps (the same global batch; DP2 under
    ZeRO-3 equals one rank in tests/model/test_gen_heads.py and test_speech_head.py). Minutes on 2 cores."""
    common = (f"data.path={smoke_data}", "model.image_gen.enabled=true", "model.video_gen.enabled=true",
              "train.sample_every=2", "train.log_every=1", "train.steps=4", "parallel.zero_stage=3",
              "train.ds_config=ds_configs/zero3.json")
    runs = {"dp2": (2, ()), "dp2xtp2": (4, ("parallel.tp=2",)), "dp2xep2": (2, ("parallel.ep=2",))}
    for name, (ranks, layout) in runs.items():
        run_train(tmp_path, name, *layout, *common, world=ranks, timeout=900)
    logged = {name: records(tmp_path, name) for name in runs}
    assert [r["step"] for r in logged["dp2"]] == [1, 2, 3, 4]
    for name in ("dp2xtp2", "dp2xep2"):
        for a, b in zip(logged["dp2"], logged[name], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (name, a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a, b)
