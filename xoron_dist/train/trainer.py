"""The training loop. Everything else a run needs lives beside it:

    parallel/state.py   ranks, device, layout, process groups     build.py       model -> parallelize -> engine
    step.py             one optimizer step (micro-batches | 1F1B)  objectives.py  losses and their weights
    expert_balance.py   expert-bias updates of every MoE          stages.py      curriculum stages
    sources.py          batch sources                             data_cache.py  prepared synthetic data
    ds_config.py        DeepSpeed JSON                            schedule.py    warmup + cosine LR
    checkpoint.py       save / resume                             tensorboard.py events (rank 0)
    metrics.py          throughput, progress line, metrics.jsonl  moe_monitor.py expert load, starved experts

A run is a sequence of stages (one, ``main``, without ``stages:``). Each stage builds its own
engine (its trainable parameters and optimizer) and batch source (its data mix and sequence
length) and starts from the weights the previous stage left. One step = ``grad_accum_steps``
micro-batches, one optimizer update, then the expert-bias update from the load of all ranks
(so every replica keeps identical biases), then logging and, every ``save_every`` steps and at
the end of every stage, a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.errors import PrepError
from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.data.loader import LoaderStateError
from xoron_dist.data.schema import CorruptShardError
from xoron_dist.data.shards import TokenizerMismatchError
from xoron_dist.parallel import state as parallel_state
from xoron_dist.parallel.launcher_env import LaunchError
from xoron_dist.tokenizer import build_tokenizer
from xoron_dist.train.build import BuiltStage, build_stage
from xoron_dist.train.checkpoint import (
    CheckpointError,
    TrainerState,
    config_hash,
    hash_matches,
    latest_tag,
    load_checkpoint,
    peek_state,
    save_checkpoint,
)
from xoron_dist.train.data_cache import ensure_prepared
from xoron_dist.train.metrics import MetricsLog, ProgressLog, StepTimer
from xoron_dist.train.moe_monitor import ExpertLoadMonitor
from xoron_dist.train.objectives import TokenGroups
from xoron_dist.train.sources import build_source
from xoron_dist.train.stages import StagePlan, plan_stages, stage_at
from xoron_dist.train.step import StepResult, StepRunner
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
        elif not hash_matches(found.config_hash, cfg):
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
    built = build_stage(cfg, ctx, plan, paths.root)
    source = build_source(cfg, tokenizer, plan, ctx.dp_rank, ctx.dp_size, pin_memory=ctx.device.type == "cuda")
    state = _enter_stage(built, source, paths, state, plan, load)
    logger.info("stage %d '%s': steps %d..%d, seq_len %d, lr %.2e%s; data: %s", plan.index, plan.name,
                state.step + 1, plan.last_step, plan.seq_len, plan.train.lr,
                f", {built.frozen:,} parameters frozen" if built.frozen else "", source.describe())
    runner = StepRunner(cfg, ctx, built, TokenGroups(cfg, tokenizer.token_id))
    monitor = ExpertLoadMonitor(built.balancer.layer_ids(), cfg.llm.moe.num_experts,
                                cfg.llm.moe.starved_expert_warn_steps)
    tc = cfg.train
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * ctx.dp_size * plan.seq_len
    loss_value = None
    while state.step < plan.last_step:
        wall_start = time.perf_counter()
        result = runner.run([source.next_batch().to(ctx.device) for _ in range(tc.grad_accum_steps)])
        loads = built.balancer.update(ctx.token_group, enabled=plan.bias_update, rates={"llm": plan.bias_update_rate})
        built.codebooks.update(ctx.token_group)
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.data_position = {"source": source.state_dict()}
        loss_value = result.losses["lm"]
        stop_now = _stop_agreed(stop, ctx)
        logs.timer.step(tokens_per_step)
        state.wall_time_s += time.perf_counter() - wall_start
        llm_load = loads.get("llm", torch.zeros(0, cfg.llm.moe.num_experts))  # (MoE layers here, experts)
        _log_step(cfg, ctx, plan, state, result, built, logs, monitor, llm_load)
        if state.step % tc.save_every == 0 or state.step == plan.last_step or stop_now:
            save_checkpoint(built.engine, paths.checkpoints, state, keep=tc.keep_checkpoints)
        if stop_now:
            logger.warning("stopped at step %d after a signal; continue with --resume", state.step)
            return state, loss_value, True
    return state, loss_value, False


def _enter_stage(built: BuiltStage, source, paths: RunPaths, state: TrainerState, plan: StagePlan,
                 load: bool) -> TrainerState:
    """The state to continue from: the checkpoint's inside this stage (engine, data position), the
    previous stage's weights and expert biases at a stage boundary, or ``state`` as it is."""
    found = peek_state(paths.checkpoints) if load else None
    if found is not None and found.stage_index == plan.index:  # resume inside this stage
        state = load_checkpoint(built.engine, paths.checkpoints)
        source.load_state_dict(state.data_position["source"])
    elif found is not None:  # a new stage starts from the previous stage's weights and expert biases
        carried = load_checkpoint(built.engine, paths.checkpoints, module_only=True)
        state = dataclasses.replace(carried, step=plan.first_step, data_position={})
    state.stage_index, state.stage_name = plan.index, plan.name
    return state


def _stop_agreed(stop: StopRequest, ctx) -> bool:
    """Whether any rank got a stop signal: all ranks stop together, at the same step."""
    flag = torch.tensor([float(stop.requested)], device=ctx.device)
    dist.all_reduce(flag)
    return flag.item() > 0


def _log_step(cfg: XoronConfig, ctx, plan: StagePlan, state: TrainerState, result: StepResult, built: BuiltStage,
              logs: RunLogs, monitor: ExpertLoadMonitor, load: torch.Tensor) -> None:
    """metrics.jsonl every step; TensorBoard every ``log_every`` steps; the progress line."""
    tc = cfg.train
    loss = result.losses["lm"]
    lr = built.scheduler.get_last_lr()[0]
    grad_norm = _grad_norm(built.engine)
    monitor.update(state.step, load)
    record = {"step": state.step, "stage": plan.name, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "label_tokens": result.counts["lm"], "tokens_per_s": logs.timer.tokens_per_s,
              "tokens_seen": state.tokens_seen}
    record.update({f"loss_{name}": value for name, value in result.losses.items() if name != "lm"})
    logs.metrics.write(record)
    if state.step % tc.log_every == 0 or state.step == plan.last_step:
        scalars = {"train/loss": loss, "train/lr": lr, "train/tokens_seen": state.tokens_seen,
                   "train/stage": plan.index}
        scalars.update({f"train/loss_{name}": value for name, value in result.losses.items() if name != "lm"})
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if logs.timer.tokens_per_s is not None:
            scalars["perf/tokens_per_s"] = logs.timer.tokens_per_s
            scalars["perf/step_s"] = logs.timer.mean_step_s
        scalars.update(monitor.scalars(load, built.balancer.biases(), ctx.pipeline_group))
        logs.tb.scalars(state.step, scalars)
    logs.progress.update(state.step, loss=loss, lr=lr, grad_norm=grad_norm,
                         tokens_per_s=logs.timer.tokens_per_s, eta_s=logs.timer.eta(tc.steps - state.step))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
