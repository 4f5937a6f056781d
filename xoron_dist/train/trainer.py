"""The training loop. Everything else a run needs lives beside it:

    parallel/state.py   ranks, device, layout, process groups     ds_config.py   DeepSpeed JSON
    stages.py           curriculum stages                         batches.py     batch sources, data cache
    schedule.py         warmup + cosine LR                        checkpoint.py  save / resume
    tensorboard.py      events (rank 0)                           metrics.py     throughput, progress line
    moe_monitor.py      expert load scalars, starved experts

A run is a sequence of stages (one, ``main``, without ``stages:``). Each stage builds its own
engine (its trainable parameters and optimizer) and batch source (its data mix and sequence
length) and starts from the weights the previous stage left. One step = ``grad_accum_steps``
micro-batches, one optimizer update, then the expert-bias update from the load of all ranks
(so every replica keeps identical biases), then logging and, every ``save_every`` steps and at
the end of every stage, a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from data_prep.errors import PrepError
from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.data.loader import LoaderStateError
from xoron_dist.data.schema import CorruptShardError
from xoron_dist.data.shards import TokenizerMismatchError
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.xoron import XoronMultimodalModel, build_model
from xoron_dist.parallel import state as parallel_state
from xoron_dist.parallel.engine import gradient_divisor, prepare_for_deepspeed
from xoron_dist.parallel.launcher_env import LaunchError
from xoron_dist.parallel.pipeline import build_stage, train_step_1f1b
from xoron_dist.parallel.tensor import layer_builder
from xoron_dist.tokenizer import build_tokenizer
from xoron_dist.train.batches import build_source, ensure_prepared, shard_sequence
from xoron_dist.train.checkpoint import (
    CheckpointError,
    TrainerState,
    config_hash,
    latest_tag,
    load_checkpoint,
    peek_state,
    save_checkpoint,
)
from xoron_dist.train.ds_config import build_ds_config, write_ds_config
from xoron_dist.train.metrics import ProgressLog, StepTimer
from xoron_dist.train.moe_monitor import ExpertLoadMonitor
from xoron_dist.train.schedule import WarmupCosineSchedule
from xoron_dist.train.stages import StagePlan, freeze_parameters, plan_stages, stage_at
from xoron_dist.train.tensorboard import TensorBoardWriter

logger = logging.getLogger(__name__)

# Errors about the user's config, data or checkpoints (not bugs): the entry point prints their
# message, which names what is wrong and where, instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, LaunchError, CheckpointError, CorruptShardError, LoaderStateError, TokenizerMismatchError,
    PrepError, FileNotFoundError,
)


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    run_dir: Path
    interrupted: bool = False


class StopRequest:
    """SIGTERM/SIGINT (SLURM preemption, Ctrl-C) ask the loop to checkpoint and stop at the next
    step boundary instead of dying mid-step; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: will save a checkpoint and stop after this step", signum)


def parameter_groups(model: torch.nn.Module, weight_decay: float, zero_stage: int = 0) -> list[dict]:
    """Decay matrices (and stacked experts); not norms, biases or router vectors.

    Expert-parallel experts under ZeRO 0-2 go into DeepSpeed's MoE groups (``moe: True``, one per
    expert group), which it reduces and partitions over the expert-data-parallel ranks only.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if zero_stage < 3 and any(is_moe_param(p) for p in decay + no_decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def train(cfg: XoronConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or continue) ``cfg``'s training on this rank; every rank calls this."""
    plans = plan_stages(cfg)  # config errors surface before any process group exists
    ctx = parallel_state.initialize(cfg)
    try:
        return _train(cfg, ctx, plans, resume=resume, overwrite=overwrite)
    finally:
        parallel_state.destroy()


def _prepare_run_dir(cfg: XoronConfig, paths: RunPaths, ctx, resume: bool, overwrite: bool) -> None:
    existing = latest_tag(paths.checkpoints) if paths.checkpoints.exists() else None
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"run directory {paths.root} already holds checkpoint '{existing}'. Pass --resume to continue it, "
            f"--overwrite to start again (deletes the old checkpoints), or choose another train.name"
        )
    if ctx.is_main:
        if overwrite and paths.root.exists():
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
            shutil.rmtree(paths.tensorboard, ignore_errors=True)
            paths.metrics.unlink(missing_ok=True)
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "config.yaml").write_text(cfg.to_yaml())
    dist.barrier()


def _shared_tokenizer(cfg: XoronConfig, paths: RunPaths, ctx):
    """Rank 0 trains/saves the tokenizer; the others then load the saved one."""
    tokenizer = build_tokenizer(cfg, paths.tokenizer) if ctx.is_main else None
    dist.barrier()
    return tokenizer or build_tokenizer(cfg, paths.tokenizer)


@dataclass
class RunLogs:
    """What a run reports through, across its stages: events, metrics.jsonl, progress line, throughput."""

    tb: TensorBoardWriter
    metrics: MetricsLog
    progress: ProgressLog
    timer: StepTimer

    @classmethod
    def open(cls, cfg: XoronConfig, paths: RunPaths, ctx, start_step: int) -> RunLogs:
        tc = cfg.train
        tb = TensorBoardWriter(paths.tensorboard, tc.tensorboard and ctx.is_main, purge_step=start_step + 1)
        if start_step == 0:
            tb.text("config", f"```\n{cfg.to_yaml()}\n```")
        return cls(tb, MetricsLog(paths.metrics, ctx.is_main, keep_up_to=start_step),
                   ProgressLog(tc.steps, log_every=tc.log_every, start_step=start_step, rank=ctx.rank), StepTimer())

    def close(self) -> None:
        self.progress.close()
        self.tb.close()


def _train(cfg: XoronConfig, ctx, plans: list[StagePlan], *, resume: bool, overwrite: bool) -> TrainResult:
    paths = RunPaths(Path(cfg.train.output_dir) / cfg.train.name)
    _prepare_run_dir(cfg, paths, ctx, resume, overwrite)
    tokenizer = _shared_tokenizer(cfg, paths, ctx)
    if cfg.data.source == "arrow":
        if ctx.is_main:
            ensure_prepared(cfg, paths.tokenizer)
        dist.barrier()

    state = TrainerState(step=0, config_hash=config_hash(cfg))
    if resume:
        found = peek_state(paths.checkpoints)
        if found is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", paths.checkpoints)
        elif found.config_hash != state.config_hash:
            raise ConfigError(
                f"checkpoint {paths.checkpoints} was written by a run with a different model/parallel config "
                f"(hash {found.config_hash}, now {state.config_hash}); resume with the run's own "
                f"{paths.root / 'config.yaml'} or start a new train.name"
            )
        else:
            state = found
    if stage_at(plans, state.step) is None:
        logger.info("run already complete at step %d (train.steps=%d); raise train.steps to continue",
                    state.step, cfg.train.steps)
        return TrainResult(state.step, None, paths.root)

    logs = RunLogs.open(cfg, paths, ctx, state.step)
    loss, interrupted = None, False
    with StopRequest() as stop:
        while not interrupted and (plan := stage_at(plans, state.step)) is not None:
            state, loss, interrupted = _run_stage(cfg, ctx, plan, tokenizer, paths, logs, stop, state,
                                                  load=resume or plan.index > 0)
    logs.close()
    dist.barrier()  # rank 0 hosts the rendezvous store: nobody tears down while others still talk
    return TrainResult(state.step, loss, paths.root, interrupted)


def _run_stage(cfg: XoronConfig, ctx, plan: StagePlan, tokenizer, paths: RunPaths, logs: RunLogs,
               stop: StopRequest, state: TrainerState, *, load: bool) -> tuple[TrainerState, float | None, bool]:
    """Train one curriculum stage from ``state`` to its last step (or until a stop is requested)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    builder = layer_builder(cfg)
    # XoronMultimodalModel when an encoder is enabled; synthetic_text batches hold no media to encode
    model = build_model(cfg, builder) if cfg.data.source == "arrow" else XoronLLM(cfg.llm, builder)
    multimodal = isinstance(model, XoronMultimodalModel)  # its layout limits are checked by validate_layout
    model.activation_checkpointing = tc.activation_checkpointing
    model.loss_chunk_tokens = tc.loss_chunk_tokens
    frozen = freeze_parameters(model, plan)
    if ctx.layout.pp > 1:
        model = build_stage(model)  # this rank's pipeline stage, cut out before it moves to the device
    model = model.to(ctx.device)
    prepare_for_deepspeed(model, cfg, ctx)  # ZeRO-3: MoE leaf modules, partition groups with SP
    ds_config = build_ds_config(cfg, ctx.dp_size, ctx.device_info.dtype, ctx.device_info.kind)
    if ctx.is_main:
        write_ds_config(paths.root / "ds_config.json", ds_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, tc.weight_decay, cfg.parallel.zero_stage),
        config=ds_config,
        lr_scheduler=WarmupCosineSchedule.factory(plan.train),
        mpu=parallel_state.mpu(),
    )
    model.keep_router_state_fp32()
    source = build_source(cfg, tokenizer, plan, ctx.dp_rank, ctx.dp_size, pin_memory=ctx.device.type == "cuda")

    found = peek_state(paths.checkpoints) if load else None
    if found is not None and found.stage_index == plan.index:  # resume inside this stage
        state = load_checkpoint(engine, paths.checkpoints)
        source.load_state_dict(state.data_position["source"])
    elif found is not None:  # a new stage starts from the previous stage's weights and expert biases
        carried = load_checkpoint(engine, paths.checkpoints, module_only=True)
        state = dataclasses.replace(carried, step=plan.first_step, data_position={})
    state.stage_index, state.stage_name = plan.index, plan.name
    logger.info("stage %d '%s': steps %d..%d, seq_len %d, lr %.2e%s; data: %s", plan.index, plan.name,
                state.step + 1, plan.last_step, plan.seq_len, plan.train.lr,
                f", {frozen:,} parameters frozen" if frozen else "", source.describe())

    monitor = ExpertLoadMonitor(model.moe_layer_ids, cfg.llm.moe.num_experts, cfg.llm.moe.starved_expert_warn_steps)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * ctx.dp_size * plan.seq_len
    loss_value = None
    while state.step < plan.last_step:
        wall_start = time.perf_counter()
        batches = [source.next_batch().to(ctx.device) for _ in range(tc.grad_accum_steps)]
        if ctx.sp_size > 1:
            batches = [shard_sequence(b, ctx.sp_rank, ctx.sp_size) for b in batches]
        # The loss is the mean over every labelled token of the step on all data-parallel (and
        # sequence-parallel) ranks: weight each micro-batch's sum so that DeepSpeed's 1/accum and
        # 1/divisor averaging of the gradients summed over dp x sp yield exactly that (the divisor
        # depends on the ZeRO stage: parallel/engine.py).
        label_tokens = torch.tensor([float(sum(b.num_label_tokens for b in batches))], device=ctx.device)
        dist.all_reduce(label_tokens, group=ctx.token_group)
        scale = gradient_divisor(ctx.layout) * tc.grad_accum_steps / max(label_tokens.item(), 1.0)
        if ctx.layout.pp > 1:  # every micro-batch through the pipeline's stages (1F1B), same scaling
            loss_sum = train_step_1f1b(engine, model, batches, scale)
        else:
            loss_sum = torch.zeros((), device=ctx.device)
            for batch in batches:
                media = model.media_inputs(batch) if multimodal else {}  # images/videos + spans to understand
                out = engine(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                             document_ids=batch.document_ids, **media)
                micro_sum = out.loss * out.num_tokens
                engine.backward(micro_sum * scale)
                engine.step()
                loss_sum += micro_sum.detach().float()
        load = model.update_expert_biases(ctx.token_group, enabled=plan.bias_update, rate=plan.bias_update_rate)
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.data_position = {"source": source.state_dict()}

        dist.all_reduce(loss_sum, group=ctx.token_group)
        loss_value = loss_sum.item() / max(label_tokens.item(), 1.0)
        stop_flag = torch.tensor([float(stop.requested)], device=ctx.device)
        dist.all_reduce(stop_flag)  # all ranks stop together, whichever got the signal
        stop_now = stop_flag.item() > 0

        logs.timer.step(tokens_per_step)
        state.wall_time_s += time.perf_counter() - wall_start
        lr = scheduler.get_last_lr()[0]
        grad_norm = _grad_norm(engine)
        monitor.update(state.step, load)
        logs.metrics.write({"step": state.step, "stage": plan.name, "loss": loss_value, "lr": lr,
                            "grad_norm": grad_norm, "label_tokens": int(label_tokens.item()),
                            "tokens_per_s": logs.timer.tokens_per_s, "tokens_seen": state.tokens_seen})
        if state.step % tc.log_every == 0 or state.step == plan.last_step:
            scalars = {"train/loss": loss_value, "train/lr": lr, "train/tokens_seen": state.tokens_seen,
                       "train/stage": plan.index}
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            if logs.timer.tokens_per_s is not None:
                scalars["perf/tokens_per_s"] = logs.timer.tokens_per_s
                scalars["perf/step_s"] = logs.timer.mean_step_s
            scalars.update(monitor.scalars(load, [r.expert_bias for r in model.routers()], ctx.pipeline_group))
            logs.tb.scalars(state.step, scalars)
        logs.progress.update(state.step, loss=loss_value, lr=lr, grad_norm=grad_norm,
                             tokens_per_s=logs.timer.tokens_per_s, eta_s=logs.timer.eta(tc.steps - state.step))
        if state.step % tc.save_every == 0 or state.step == plan.last_step or stop_now:
            save_checkpoint(engine, paths.checkpoints, state, keep=tc.keep_checkpoints)
        if stop_now:
            logger.warning("stopped at step %d after a signal; continue with --resume", state.step)
            return state, loss_value, True
    return state, loss_value, False


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step on rank 0, for scripts and tests.

    On resume the lines after the checkpoint's step (written by the run that crashed after
    it) are dropped, so the file always describes one consistent history.
    """

    def __init__(self, path: Path, enabled: bool, keep_up_to: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_up_to]
            path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
