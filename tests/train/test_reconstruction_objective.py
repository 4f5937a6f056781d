"""The reconstruction objective through the trainer's step: the same loss and gradients however the step's
batch is cut into data-parallel ranks and micro-batches, under ZeRO-3.

Micro-batch A holds two images, B none (its rank encodes the blank image, whose loss enters times 0).
Per-micro-batch means would give ((l1 + l2) / 2 + 0) / 2; the step's mean over its images is
(l1 + l2) / 2. Two ZeRO-3 ranks with one micro-batch each, one rank with two accumulated
micro-batches, and two sequence-parallel ranks sharing both micro-batches (each encodes one of A's
images, and in B the blank) must all log that mean and produce the plain single-process gradients of
Σ lm / N_tokens + w · Σ reconstruction / N_images, TiTok's decoder included (it is reached by the
reconstruction alone); every weight is partitioned (persistence threshold 0), so a rank that skipped
the decoder would hang or mismatch the other's gathers.

Under pipeline parallelism (2 stages, ZeRO-1) the tower sits on stage 0, which computes the
reconstruction and back-propagates it beside the gradient the last stage sends back; the step's update
of every parameter on both stages must be the single-process gradient.

After each step the trainer's dead-code restarts (``CodebookKeeper``, nearly every code dead) must leave
TiTok's codebook in the module equal to the optimizer's fp32 copy, the same on every replica: ZeRO-3
partitions the codebook, and ZeRO-1/3 keep that separate copy, which rewrites the module's weight at
the next step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.model.test_vision_reconstruction import RECONSTRUCTION, image_batch
from tests.model.test_xoron_multimodal import tiny_cfg
from tests.parallel.harness import run_ranks, zero3_engine
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.model.xoron import XoronMultimodalModel

Z3 = ["parallel.zero_stage=3", "train.ds_config=ds_configs/zero3.json", "train.micro_batch_size=2",
      "train.grad_clip=0", "train.weight_decay=0", "data.source=arrow", "data.path=x", *RECONSTRUCTION]
WEIGHT = 0.5  # model.vision.reconstruction_weight in RECONSTRUCTION


def _micro_batches() -> list[dict]:
    return [image_batch(0), image_batch(1, images=False)]


def _step_body(full_state: dict, accum: int, sp: int = 1) -> dict:
    """One ``StepRunner`` step over a ZeRO-3 engine: data-parallel rank r takes micro-batches r*accum ...
    (``sp`` = 2: both ranks are one replica, each computing half of every row, the images shared out);
    the full gradients are read at the accumulation boundary, just before the optimizer step."""
    from types import SimpleNamespace

    from deepspeed.utils import safe_get_full_grad

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.train.build import BuiltStage
    from xoron_dist.train.objectives import TokenGroups
    from xoron_dist.train.step import StepRunner

    cfg = tiny_cfg(*Z3, f"train.grad_accum_steps={accum}", f"parallel.sp={sp}", *RESTART_ALL)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    parallelize(model, cfg)
    engine = zero3_engine(model, cfg, ctx)
    grads = {}
    real_step = engine.step

    def step():
        if engine.is_gradient_accumulation_boundary():
            grads.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        real_step()

    engine.step = step
    built = BuiltStage(engine, None, engine.module, None, None, None, 0)
    mine = _micro_batches()[ctx.dp_rank * accum : (ctx.dp_rank + 1) * accum]
    result = StepRunner(cfg, ctx, built, TokenGroups(cfg, lambda token: None)).run(
        [SimpleNamespace(**batch, image_is_target=None) for batch in mine]).read()
    codebook = _restart_codes(engine.module, ctx)
    state.destroy()
    return {"losses": result.losses, "counts": result.counts, "grads": grads, "codebook": codebook}


# Every code picked by fewer than 1/codebook_size of the ids is dead after one step: restarts are certain.
RESTART_ALL = ["model.vision.titok_dead_code_share=1.0"]


def _restart_codes(model, ctx) -> dict | None:
    """The trainer's dead-code restarts after the step (``CodebookKeeper``), then the codebook as the module
    holds it (gathered under ZeRO-3) and as the optimizer's fp32 copy holds it; None without the decoder
    (a later pipeline stage)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from xoron_dist.train.codebooks import CodebookKeeper

    if model.vision is None:
        return None
    restarted = CodebookKeeper(model).update(ctx.token_group)
    weight = model.vision.reconstruction.quantizer.codebook.weight
    with deepspeed.zero.GatheredParameters([weight]) if hasattr(weight, "ds_id") else contextlib.nullcontext():
        held = weight.detach().clone()
    return {"restarted": restarted, "module": held, "optimizer": safe_get_full_fp32_param(weight).clone()}


def _check_codebooks(results: list[dict], label: str) -> None:
    """Codes restarted; the module's codebook is the optimizer's (the restart survives the next step) and
    the same on every replica."""
    books = [r["codebook"] for r in results if r["codebook"] is not None]
    assert books and all(b["restarted"] > 0 for b in books), label
    for book in books:
        torch.testing.assert_close(book["module"], book["optimizer"], rtol=0, atol=0, msg=label)
        torch.testing.assert_close(book["module"], books[0]["module"], rtol=0, atol=0, msg=label)


def _single_process_step(model) -> tuple[int, dict[str, float]]:
    """The step of both micro-batches in this process (the gradients left in ``model``): the LM's token
    count, and each objective's loss (the LM's mean over the tokens, reconstruction's over the 2 images)."""
    batches = _micro_batches()
    outs = [model(**batch) for batch in batches]
    tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    lm = sum(out.loss * out.num_tokens for out in outs)
    reconstruction = sum(out.objective_sums["reconstruction"] for out in outs)
    (lm / tokens + WEIGHT * reconstruction / 2).backward()
    return tokens, {"lm": lm.item() / tokens, "reconstruction": reconstruction.item() / 2}


@pytest.mark.multirank
def test_two_ranks_and_two_micro_batches_give_the_single_process_step():
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg(*Z3)).train()
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, expected = _single_process_step(model)

    runs = {"dp2": run_ranks(_step_body, 2, full_state, 1), "accum2": run_ranks(_step_body, 1, full_state, 2),
            "sp2": run_ranks(_step_body, 2, full_state, 2, 2)}
    for run, results in runs.items():
        for rank, result in enumerate(results):
            assert result["counts"] == {"lm": tokens, "reconstruction": 2}, (run, rank)
            for name, value in expected.items():
                assert result["losses"][name] == pytest.approx(value, rel=1e-5), (run, rank, name)
            for name, param in model.named_parameters():
                torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=2e-6,
                                           msg=f"{run}, rank {rank}: {name}")
        _check_codebooks(results, run)
    decoder = model.vision.reconstruction.pixel_out.weight.grad
    assert decoder.abs().sum() > 0


def _pipeline_body(full_state: dict) -> dict:
    """One ``StepRunner`` step of both micro-batches through 2 pipeline stages (1F1B), SGD with lr 1: each
    parameter's update is its gradient."""
    from types import SimpleNamespace

    import deepspeed

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.train.build import BuiltStage
    from xoron_dist.train.objectives import TokenGroups
    from xoron_dist.train.step import StepRunner

    cfg = tiny_cfg(*PIPELINE, *RESTART_ALL)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    parallel = parallelize(model, cfg)
    stage = parallel.model.train()
    before = {name: p.detach().clone() for name, p in stage.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=stage, optimizer=torch.optim.SGD(stage.parameters(), lr=1.0),
                                      config=config, mpu=state.mpu())
    built = BuiltStage(engine, None, engine.module, parallel.stage, None, None, 0)
    result = StepRunner(cfg, ctx, built, TokenGroups(cfg, lambda token: None)).run(
        [SimpleNamespace(**batch, image_is_target=None) for batch in _micro_batches()]).read()
    out = {"losses": result.losses, "counts": result.counts,
           "updates": {name: before[name] - p.detach() for name, p in stage.named_parameters()},
           "codebook": _restart_codes(engine.module, ctx)}
    state.destroy()
    return out


PIPELINE = [*RECONSTRUCTION, "model.fusion.layers=[0,1]", "data.source=arrow", "data.path=x", "train.seq_len=32",
            "parallel.pp=2", "parallel.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum_steps=2"]


@pytest.mark.multirank
def test_two_pipeline_stages_give_the_single_process_step():
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg(*PIPELINE)).train()
    with torch.no_grad():  # open the fusion gates: the tower also learns through stage 1's fusion layer
        for layer in model.fusion.layers:
            layer.attn_gate.fill_(0.5)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, expected = _single_process_step(model)

    results = run_ranks(_pipeline_body, 2, full_state)
    held = {name for result in results for name in result["updates"]}
    assert held == {name for name, _ in model.named_parameters()}
    for rank, result in enumerate(results):
        assert result["counts"] == {"lm": tokens, "reconstruction": 2}, rank
        for name, value in expected.items():
            assert result["losses"][name] == pytest.approx(value, rel=1e-5), (rank, name)
        for name, update in result["updates"].items():
            torch.testing.assert_close(update, model.get_parameter(name).grad, rtol=1e-4, atol=2e-6,
                                       msg=f"stage {rank}: {name}")
    assert any(name.startswith("vision.reconstruction.") for name in results[0]["updates"])
    _check_codebooks(results, "pp2")
