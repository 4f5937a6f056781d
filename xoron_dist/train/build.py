"""Build what a curriculum stage trains: model -> freeze -> parallelize -> DeepSpeed engine -> balancer.

    torch.manual_seed(seed)              every rank draws the same single-rank weights
    model = build_model(cfg)             XoronLLM, or XoronMultimodalModel with encoders (Arrow data)
    add_adapters(model, cfg)             model.lora's adapters (train/lora.py), when enabled
    freeze_parameters(model, stage)      the stage's frozen prefixes and its ``trains``, on the whole model's names
    parallelize(model, cfg)              pipeline stage, TP, EP, SP, checkpointing, ZeRO-3 marks
    deepspeed.initialize(...)            one engine (per pipeline stage) on Megatron-core's groups (mpu)
    compile_blocks(model)                train.compile: torch.compile each decoder block in place (train/compile.py)
    ExpertBalancer(model)                every bias-routed MoE, balanced after each optimizer step
    CodebookKeeper(model)                every vector quantiser's dead codes, restarted after each step
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.head import LMHead
from xoron_dist.model.xoron import build_model
from xoron_dist.parallel import state as parallel_state
from xoron_dist.parallel.parallelize import parallelize
from xoron_dist.parallel.pipeline.split import StageInfo
from xoron_dist.train.codebooks import CodebookKeeper
from xoron_dist.train.compile import compile_blocks
from xoron_dist.train.ds_config import build_ds_config, write_ds_config
from xoron_dist.train.expert_balance import ExpertBalancer
from xoron_dist.train.lora import add_adapters, lora_plus_groups
from xoron_dist.train.schedule import WarmupCosineSchedule
from xoron_dist.train.stages import StagePlan, freeze_parameters


@dataclass
class BuiltStage:
    """A stage's engine and what the step needs beside it."""

    engine: object  # deepspeed.DeepSpeedEngine
    scheduler: WarmupCosineSchedule
    model: nn.Module  # engine.module: this rank's part of the model
    pipeline: StageInfo | None  # this rank's pipeline stage (None without pipeline parallelism)
    balancer: ExpertBalancer
    codebooks: CodebookKeeper
    frozen: int  # parameters frozen by the stage


def parameter_groups(model: nn.Module, weight_decay: float, zero_stage: int = 0,
                     lora_b_lr: tuple[float, float] | None = None) -> list[dict]:
    """Decay matrices (and stacked experts); not norms, biases or router vectors. ``lora_b_lr`` = (lr,
    ratio): LoRA adapters' B matrices in groups of their own at ratio x lr (LoRA+, ``train/lora.py``).

    Expert-parallel experts under ZeRO 0-2 go into DeepSpeed's MoE groups (``moe: True``, one per
    expert group), which it reduces and partitions over the expert-data-parallel ranks only.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if lora_b_lr is not None:
        groups = lora_plus_groups(groups, model, *lora_b_lr)
    if zero_stage < 3 and any(is_moe_param(p) for p in decay + no_decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_stage(cfg: XoronConfig, ctx, plan: StagePlan, run_root: Path) -> BuiltStage:
    """The engine of curriculum stage ``plan`` on this rank (``ctx``: the ParallelContext)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    # XoronMultimodalModel when an encoder is enabled; synthetic_text batches hold no media to encode
    model = build_model(cfg) if cfg.data.source == "arrow" else XoronLLM(cfg.llm)
    for head in (m for m in model.modules() if isinstance(m, LMHead)):
        head.chunk_tokens = tc.loss_chunk_for(ctx.device.type)
    add_adapters(model, cfg)  # model.lora: adapters on the plain model, split by parallelize like their layers
    frozen = freeze_parameters(model, plan)
    parallel = parallelize(model, cfg)  # pruned and split on the host, before it moves to the device
    model = parallel.model.to(ctx.device)
    # the stage's view of train (its lr, steps, seq_len): the optimizer's base lr is the stage's peak
    stage_cfg = replace(cfg, train=plan.train)
    ds_config = build_ds_config(stage_cfg, ctx.dp_size, ctx.device_info.dtype, ctx.device_info.kind)
    if ctx.is_main:
        write_ds_config(run_root / "ds_config.json", ds_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, tc.weight_decay, cfg.parallel.zero_stage,
                                          lora_b_lr=(plan.train.lr, cfg.model.lora.plus_ratio)),
        config=ds_config,
        lr_scheduler=WarmupCosineSchedule.factory(plan.train),
        mpu=parallel_state.mpu(),
        # DeepSpeed's engine would move to cuda:<LOCAL_RANK>; a GPU bound per task is cuda:0 (parallel/device.py)
        args=SimpleNamespace(device_rank=ctx.device.index) if ctx.device.type == "cuda" else None,
    )
    if plan.train.compile:
        compile_blocks(engine.module, ctx.device)  # in place: the engine and checkpoints see the same module
    balancer = ExpertBalancer(engine.module)
    balancer.keep_fp32()
    return BuiltStage(engine, scheduler, engine.module, parallel.stage, balancer, CodebookKeeper(engine.module), frozen)


__all__ = ["BuiltStage", "build_stage", "parameter_groups"]
