"""The training loop. Everything else a run needs lives beside it:

    parallel/state.py   ranks, device, layout, process groups     build.py       model -> parallelize -> engine
    step.py             one optimizer step (micro-batches | 1F1B)  objectives.py  losses and their weights
    expert_balance.py   expert-bias updates of every MoE          stages.py      curriculum stages
    sources.py          batch sources                             data_cache.py  prepared synthetic data
    ds_config.py        DeepSpeed JSON                            schedule.py    warmup + cosine LR
    checkpoint.py       save / resume                             tensorboard.py events (rank 0)
    metrics.py          throughput, progress line, metrics.jsonl  moe_monitor.py expert load, starved experts
    guard.py            non-finite steps, rollback                checkpoint_integrity.py  hashes, safe loading
    run_lock.py         one run per run directory                 watchdog.py    hang reports
    readout.py          the step's values agreed and read once    profiler.py    step profiles (torch.profiler)

A run is a sequence of stages (one, ``main``, without ``stages:``). Each stage builds its own
engine (its trainable parameters and optimizer) and batch source (its data mix and sequence
length) and starts from the weights the previous stage left. One step = ``grad_accum_steps``
micro-batches, one optimizer update, then the expert-bias update from the load of all ranks
(so every replica keeps identical biases) and one host read of everything the host needs to know
of the step (``readout.py``), then logging and, every ``save_every`` steps and at
the end of every stage, a checkpoint. A step whose loss or gradients are not finite is skipped
(``guard.py``); a run that diverges rolls back to an earlier checkpoint or stops (exit status 4).
A signal saves and stops (exit status 3).

A stage may set its own parallel layout (``stages[i].parallel``; the world size stays). At a boundary
where the layout changes, the finished stage's engine is destroyed, the process groups are re-formed
(``parallel_state.switch_layout``) and the next stage's engine takes the finished stage's final
checkpoint resliced into its layout (``reshard.py``, the code ``--resume --reshard`` runs). Its
checkpoints carry that layout's config hash, so a resume inside it compares the checkpoint with that
stage's layout. Without a change: no extra work. A new stage's optimizer starts afresh, unless the stage
sets ``carry_optimizer``: then Adam's moments and step count come through the same reslicing, whether or
not the layout changes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.errors import PrepError
from xoron_dist.config import ConfigError, ParallelConfig, XoronConfig
from xoron_dist.data.loader import LoaderStateError
from xoron_dist.data.schema import CorruptShardError
from xoron_dist.data.shards import TokenizerMismatchError
from xoron_dist.parallel import state as parallel_state
from xoron_dist.parallel.launcher_env import LaunchError
from xoron_dist.parallel.layout import stage_layout_config
from xoron_dist.tokenizer import build_tokenizer
from xoron_dist.train.build import BuiltStage, build_stage
from xoron_dist.train.checkpoint import (
    CheckpointError,
    NonFiniteStateError,
    TrainerState,
    config_hash,
    hash_matches,
    latest_tag,
    load_checkpoint,
    peek_state,
    resolve_tag,
    resume_tag,
    save_checkpoint,
)
from xoron_dist.train.checkpoint_integrity import broadcast_from_rank0
from xoron_dist.train.data_cache import ensure_prepared
from xoron_dist.train.guard import Divergence, NumericsGuard, TrainingDiverged, install_update_gate, rollback_tag
from xoron_dist.train.metrics import MetricsLog, ProgressLog, StepTimer, step_flops_rates
from xoron_dist.train.moe_monitor import ExpertLoadMonitor
from xoron_dist.train.objectives import TokenGroups
from xoron_dist.train.profiler import StepProfiler
from xoron_dist.train.readout import StepReadout, read_step
from xoron_dist.train.reshard import (
    SavedLayout,
    archive_config,
    check_layout,
    layout_changes,
    load_resharded,
    saved_layout,
)
from xoron_dist.train.run_lock import RunDirectoryBusy, RunLock
from xoron_dist.train.samples import GenerationSamples
from xoron_dist.train.sources import build_source, to_device
from xoron_dist.train.stages import StagePlan, plan_stages, stage_at
from xoron_dist.train.step import StepRunner
from xoron_dist.train.tensorboard import TensorBoardWriter
from xoron_dist.train.watchdog import HangWatchdog

logger = logging.getLogger(__name__)

# Errors about the user's config, data or checkpoints (not bugs): the entry point prints their
# message, which names what is wrong and where, instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, LaunchError, CheckpointError, CorruptShardError, LoaderStateError, TokenizerMismatchError,
    PrepError, FileNotFoundError, RunDirectoryBusy,
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

    @property
    def watchdog(self) -> Path:
        return self.root / "watchdog"

    @property
    def profile(self) -> Path:
        return self.root / "profile"


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    run_dir: Path
    interrupted: bool = False


class StopRequest:
    """SIGTERM/SIGINT (SLURM preemption, Ctrl-C) ask the loop to checkpoint and stop at the next
    step boundary instead of dying mid-step. A repeated SIGTERM changes nothing (srun may deliver
    it twice); a SIGINT after the first request (a user's second Ctrl-C) stops at once."""

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
        if self.requested:
            # Saved and on the way out: a late repeat of the SIGTERM must not turn exit status 3 into 143.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            logger.warning("signal %d again: already stopping after this step", signum)
            return
        self.requested = True
        logger.warning("signal %d: will save a checkpoint and stop after this step", signum)


def train(cfg: XoronConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or continue) ``cfg``'s training on this rank; every rank calls this."""
    plans = plan_stages(cfg)  # config errors surface before any process group exists
    ctx = parallel_state.initialize(cfg)
    try:
        with StopRequest() as stop:
            return _train(cfg, ctx, plans, stop, resume=resume, overwrite=overwrite)
    finally:
        parallel_state.destroy()


def _lock_run_dir(paths: RunPaths, ctx) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank fails together when another run holds it."""
    lock, refused = (RunLock(paths.root), None) if ctx.is_main else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunDirectoryBusy as err:
            refused = str(err)
    refused = broadcast_from_rank0(refused)
    if refused:
        raise RunDirectoryBusy(refused if ctx.is_main else f"rank 0 could not lock the run directory: {refused}")
    return lock


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
        archive_config(paths.root, cfg)  # the layout of every earlier checkpoint stays readable (reshard)
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


@dataclass
class Run:
    """What every stage of one run shares."""

    cfg: XoronConfig
    ctx: object  # ParallelContext
    paths: RunPaths
    tokenizer: object
    stop: StopRequest
    guard: NumericsGuard
    watchdog: HangWatchdog
    plans: list[StagePlan]
    profiler: StepProfiler
    logs: RunLogs | None = None
    parallel: ParallelConfig | None = None  # the layout whose groups exist now (``_use_layout``)


@dataclass
class StartPoint:
    """Where a stage starts: ``state``, the checkpoint to load (None: none, or the newest at a stage
    boundary), whether its files were just verified, the steps of data to skip after it (rollback), and
    the layout it was saved with when that is not this run's (``--reshard``: ``train/reshard.py``)."""

    state: TrainerState
    tag: str | None = None
    verified: bool = False
    skip_steps: int = 0
    saved: SavedLayout | None = None


@dataclass
class StageOutcome:
    state: TrainerState
    loss: float | None
    interrupted: bool = False
    divergence: Divergence | None = None


def _train(cfg: XoronConfig, ctx, plans: list[StagePlan], stop: StopRequest, *, resume: bool,
           overwrite: bool) -> TrainResult:
    paths = RunPaths(Path(cfg.train.output_dir) / cfg.train.name)
    lock = _lock_run_dir(paths, ctx)
    watchdog = HangWatchdog(paths.watchdog, ctx.rank, ctx.world_size, cfg.train.watchdog_seconds)
    try:
        _prepare_run_dir(cfg, paths, ctx, resume, overwrite)
        tokenizer = _shared_tokenizer(cfg, paths, ctx)
        if cfg.data.source == "arrow":
            if ctx.is_main:
                ensure_prepared(cfg, paths.tokenizer)
            dist.barrier()
        watchdog.start()
        start = _start_point(cfg, plans, paths, resume, ctx.world_size)
        if stage_at(plans, start.state.step) is None:
            logger.info("run already complete at step %d (train.steps=%d); raise train.steps to continue",
                        start.state.step, cfg.train.steps)
            return TrainResult(start.state.step, None, paths.root)
        guard = NumericsGuard(cfg.train, fp16=ctx.device_info.dtype == torch.float16)
        profiler = StepProfiler(cfg.train.profile, paths.profile, ctx.rank, ctx.world_size, ctx.device.type)
        run = Run(cfg, ctx, paths, tokenizer, stop, guard, watchdog, plans, profiler,
                  parallel=stage_config(cfg, plans[0]).parallel)  # initialize built the first stage's layout
        return _train_stages(run, plans, start)
    finally:
        watchdog.stop()
        if lock is not None:
            lock.release()


def stage_config(cfg: XoronConfig, plan: StagePlan) -> XoronConfig:
    """The config stage ``plan`` builds and checkpoints with: ``cfg`` itself, or for a stage with its own
    ``parallel`` section ``layout.stage_layout_config`` (its layout; its config hash names it); with the
    stage's objectives' weights (``stages[i].objectives`` over ``train.objectives``)."""
    staged = stage_layout_config(cfg, plan.index) if cfg.stages and cfg.stages[plan.index].parallel else cfg
    if staged.train.objectives == plan.train.objectives:
        return staged
    return dataclasses.replace(staged, train=dataclasses.replace(staged.train, objectives=dict(plan.train.objectives)))


def _start_point(cfg: XoronConfig, plans: list[StagePlan], paths: RunPaths, resume: bool,
                 world_size: int) -> StartPoint:
    """Step 0, or with --resume the newest checkpoint whose files verify (``resume_tag``)."""
    state = TrainerState(step=0, config_hash=config_hash(cfg))
    tag = resume_tag(paths.checkpoints) if resume else None
    if tag is None:
        if resume:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", paths.checkpoints)
        return StartPoint(state)
    found = peek_state(paths.checkpoints, tag)
    return StartPoint(found, tag, verified=True, saved=_layout_to_reshard(cfg, plans, paths, tag, world_size))


def _layout_to_reshard(cfg: XoronConfig, plans: list[StagePlan], paths: RunPaths, tag: str,
                       world_size: int) -> SavedLayout | None:
    """The layout checkpoint ``tag`` was saved with when it is not that of the stage it goes into (None
    when it is). A layout other than that of the stage that saved it (another world size, an edited
    ``parallel``) is refused with the differences named unless ``--reshard`` is on; the change to the
    next stage's own layout at a stage boundary is the run's plan and needs no flag. A changed model is
    always refused."""
    ckpt = paths.checkpoints / tag
    saved = saved_layout(paths.root, ckpt, cfg)
    found = peek_state(paths.checkpoints, tag)
    entering = stage_at(plans, found.step)
    saver = plans[found.stage_index] if found.stage_index < len(plans) else entering
    if saver is None:
        return None  # the run is complete at this checkpoint: nothing is loaded
    check_layout(saved, stage_config(cfg, saver), world_size, ckpt)
    target = stage_config(cfg, entering or saver)
    return saved if layout_changes(saved, target, world_size) else None


def _train_stages(run: Run, plans: list[StagePlan], start: StartPoint) -> TrainResult:
    """Every stage from ``start`` on; after a divergence, the rollback the policy allows (or stop)."""
    outcome = StageOutcome(start.state, None)
    run.logs = RunLogs.open(run.cfg, run.paths, run.ctx, start.state.step)
    try:
        while (plan := stage_at(plans, start.state.step)) is not None:
            _use_layout(run, plan)
            following = stage_at(plans, plan.last_step)
            changes = following is not None and stage_config(run.cfg, following).parallel != run.parallel
            outcome = _run_stage(run, plan, start, release=changes)
            if outcome.interrupted:
                break
            if outcome.divergence is None:
                start = StartPoint(outcome.state)
                if changes:  # the next stage reslices this one's final checkpoint into its own layout
                    tag = latest_tag(run.paths.checkpoints)
                    start = StartPoint(outcome.state, tag, verified=True, saved=_layout_to_reshard(
                        run.cfg, plans, run.paths, tag, run.ctx.world_size))
                continue
            start = _roll_back(run, outcome)
            run.guard.reset()
            run.logs.close()
            run.logs = RunLogs.open(run.cfg, run.paths, run.ctx, start.state.step)
    except TrainingDiverged:
        dist.barrier()  # every rank stops here, together; rank 0 (the rendezvous store) does not leave first
        raise
    finally:
        run.logs.close()
    dist.barrier()  # rank 0 hosts the rendezvous store: nobody tears down while others still talk
    return TrainResult(outcome.state.step, outcome.loss, run.paths.root, outcome.interrupted)


def _roll_back(run: Run, outcome: StageOutcome) -> StartPoint:
    """The start point after ``outcome``'s divergence, or ``TrainingDiverged`` when the policy says stop."""
    tc, divergence, state = run.cfg.train, outcome.divergence, outcome.state
    last = latest_tag(run.paths.checkpoints)
    hint = f"the newest checkpoint is {last} (--resume continues from it)" if last else "no checkpoint was saved"
    if tc.nonfinite_policy != "rollback":
        raise TrainingDiverged(f"training diverged: {divergence.reason}; stopping (train.nonfinite_policy="
                               f"{tc.nonfinite_policy}); {hint}")
    if state.rollbacks >= tc.max_rollbacks:
        raise TrainingDiverged(f"training diverged again: {divergence.reason}; stopping after {state.rollbacks} "
                               f"rollback(s) (train.max_rollbacks={tc.max_rollbacks}); {hint}")
    tag = rollback_tag(run.paths.checkpoints, divergence)
    if tag is None:
        raise TrainingDiverged(f"training diverged: {divergence.reason}; no checkpoint from before step "
                               f"{divergence.first_bad_step} to roll back to; {hint}")
    target = peek_state(run.paths.checkpoints, tag)
    skip = divergence.step - target.step
    logger.warning("training diverged: %s; rolling back to %s (rollback %d of at most %d) and skipping the %d "
                   "step(s) of data after it", divergence.reason, tag, state.rollbacks + 1, tc.max_rollbacks, skip)
    target = dataclasses.replace(target, skipped_steps=state.skipped_steps, rollbacks=state.rollbacks + 1)
    return StartPoint(target, tag, verified=True, skip_steps=skip,
                      saved=_layout_to_reshard(run.cfg, run.plans, run.paths, tag, run.ctx.world_size))


def _use_layout(run: Run, plan: StagePlan) -> None:
    """Re-form the process groups when ``plan``'s layout is not the one that exists (the previous stage's
    engine is destroyed by then: ``_run_stage``'s ``release``)."""
    cfg = stage_config(run.cfg, plan)
    if cfg.parallel == run.parallel:
        return
    gc.collect()  # the old engine's modules and hooks hold tensors in reference cycles
    logger.info("stage %d '%s' has its own parallel layout", plan.index, plan.name)
    run.ctx = parallel_state.switch_layout(cfg)
    run.parallel = cfg.parallel


def _run_stage(run: Run, plan: StagePlan, start: StartPoint, release: bool = False) -> StageOutcome:
    """Train one curriculum stage from ``start`` to its last step (or a stop, or a divergence).
    ``release``: the next stage has another layout, so this stage's engine is destroyed on the way out."""
    cfg, ctx = stage_config(run.cfg, plan), run.ctx
    run.watchdog.beat(start.state.step, "stage build")
    built = build_stage(cfg, ctx, plan, run.paths.root)
    install_update_gate(built.engine)
    source = build_source(cfg, run.tokenizer, plan, ctx.dp_rank, ctx.dp_size, pin_memory=ctx.device.type == "cuda")
    try:
        state = _enter_stage(run, built, source, plan, start)
        logger.info("stage %d '%s': steps %d..%d, seq_len %d, lr %.2e%s; data: %s", plan.index, plan.name,
                    state.step + 1, plan.last_step, plan.seq_len, plan.train.lr,
                    f", {built.frozen:,} parameters frozen" if built.frozen else "", source.describe())
        return _train_steps(run, plan, built, source, state)
    finally:
        run.profiler.close()  # a window the stage cuts short: what it recorded is written
        close = getattr(source, "close", None)
        if close is not None:
            close()  # a rollback builds the stage again: the old loader workers go now
        if release:
            built.engine.destroy()  # hooks, optimizer state and buffers go before the groups change


def _train_steps(run: Run, plan: StagePlan, built: BuiltStage, source, state: TrainerState) -> StageOutcome:
    """The loop: a step, the guard's verdict, the updates that follow, logging, saving."""
    cfg, ctx, tc, logs = run.cfg, run.ctx, run.cfg.train, run.logs
    runner = StepRunner(stage_config(cfg, plan), ctx, built, TokenGroups(cfg, run.tokenizer.token_id))
    monitor = ExpertLoadMonitor(built.balancer.layer_ids(), cfg.llm.moe.num_experts,
                                cfg.llm.moe.starved_expert_warn_steps)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * ctx.dp_size * plan.seq_len
    samples = GenerationSamples(cfg, run.tokenizer)
    loss_value, save_due = None, False
    while state.step < plan.last_step:
        run.watchdog.beat(state.step + 1, "step")
        run.profiler.before_step(state.step + 1)
        wall_start = time.perf_counter()
        skipped_before = built.engine.skipped_steps
        sums = runner.run([to_device(source.next_batch(), ctx.device) for _ in range(tc.grad_accum_steps)])
        # the step's one host read; a skipped step changes no expert bias nor codebook, and reports no load
        step = read_step(sums, engine=built.engine, guard=run.guard, balancer=built.balancer,
                         codebooks=built.codebooks, ctx=ctx,
                         stop_requested=run.stop.requested,
                         engine_skipped=built.engine.skipped_steps > skipped_before, bias_update=plan.bias_update,
                         rates={"llm": plan.bias_update_rate}, num_experts=cfg.llm.moe.num_experts,
                         with_biases=_tensorboard_step(tc, plan, state.step + 1))
        result, stop_now, skipped = step.result, step.stop, step.skipped
        if not skipped:
            loss_value = result.losses["lm"]
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.skipped_steps += int(skipped)
        state.data_position = {"source": source.state_dict()}
        logs.timer.step(tokens_per_step)
        state.wall_time_s += time.perf_counter() - wall_start
        _log_step(cfg, ctx, plan, state, step, built, logs, monitor)
        run.profiler.after_step(state.step)
        if samples.due(state.step):
            run.watchdog.beat(state.step, "samples")
            with logs.timer.excluded():
                samples.write(state.step, built.model, logs.tb)
        divergence = run.guard.record(state.step, result.losses, skipped, step.spike)
        if divergence is not None:
            return StageOutcome(state, loss_value, divergence=divergence)
        # A periodic save waits for a step that was applied: the newest checkpoint then predates any trouble.
        save_due = save_due or state.step % tc.save_every == 0
        if (save_due and run.guard.healthy) or state.step == plan.last_step or stop_now:
            divergence = _save(run, built, state)
            if divergence is not None:
                return StageOutcome(state, loss_value, divergence=divergence)
            save_due = False
        if stop_now:
            logger.warning("stopped at step %d after a signal; continue with --resume", state.step)
            return StageOutcome(state, loss_value, interrupted=True)
    return StageOutcome(state, loss_value)


def _save(run: Run, built: BuiltStage, state: TrainerState) -> Divergence | None:
    """Save a checkpoint; a ``Divergence`` instead when the weights are not finite (nothing is written)."""
    run.watchdog.beat(state.step, "save")
    try:
        with run.logs.timer.excluded():
            save_checkpoint(built.engine, run.paths.checkpoints, state, keep=run.cfg.train.keep_checkpoints)
    except NonFiniteStateError as err:
        return Divergence(str(err), state.step, state.step)
    return None


def _enter_stage(run: Run, built: BuiltStage, source, plan: StagePlan, start: StartPoint) -> TrainerState:
    """The state to continue from: the checkpoint's inside this stage (engine, data position), the
    previous stage's weights and expert biases at a stage boundary, or ``start.state`` as it is; then,
    after a rollback, the batches of the steps that led to the divergence are skipped. A checkpoint of
    another layout (``start.saved``) is resliced into this one (``train/reshard.py``)."""
    state, paths, accum, cfg = start.state, run.paths, run.cfg.train.grad_accum_steps, stage_config(run.cfg, plan)
    load = start.tag is not None or plan.index > 0
    found = peek_state(paths.checkpoints, start.tag) if load else None
    if found is not None and found.stage_index == plan.index:  # resume inside this stage
        if start.saved is not None:
            state = load_resharded(built.engine, paths.checkpoints / start.tag, start.saved, cfg, run.ctx,
                                   module_only=False, moments=cfg.train.reshard_optimizer)
        else:
            state = load_checkpoint(built.engine, paths.checkpoints, start.tag, verify=not start.verified)
        if state.data_position:  # empty after a reshard that starts the stage's data afresh
            source.load_state_dict(state.data_position["source"])
    elif found is not None:  # a new stage starts from the previous stage's weights and expert biases
        if start.saved is not None or plan.carry_optimizer:
            tag = start.tag or resolve_tag(paths.checkpoints)  # the tag ``found`` was read from
            saved = start.saved or saved_layout(paths.root, paths.checkpoints / tag, run.cfg)
            carried = load_resharded(built.engine, paths.checkpoints / tag, saved, cfg, run.ctx, module_only=True,
                                     moments=plan.carry_optimizer)
        else:
            carried = load_checkpoint(built.engine, paths.checkpoints, start.tag, module_only=True,
                                      verify=not start.verified)
        state = dataclasses.replace(carried, step=plan.first_step, data_position={})
    state.stage_index, state.stage_name = plan.index, plan.name
    if not hash_matches(state.config_hash, cfg):  # a stage with its own layout: its checkpoints name that layout
        state.config_hash = config_hash(cfg)
    state.skipped_steps, state.rollbacks = start.state.skipped_steps, start.state.rollbacks
    for _ in range(start.skip_steps * accum):
        source.next_batch()
    if start.skip_steps:
        state.data_position = {"source": source.state_dict()}
    return state


def _tensorboard_step(tc, plan: StagePlan, step: int) -> bool:
    """Whether ``step`` writes TensorBoard scalars: every ``log_every`` steps and a stage's last."""
    return step % tc.log_every == 0 or step == plan.last_step


def _log_step(cfg: XoronConfig, ctx, plan: StagePlan, state: TrainerState, step: StepReadout, built: BuiltStage,
              logs: RunLogs, monitor: ExpertLoadMonitor) -> None:
    """metrics.jsonl every step; TensorBoard every ``log_every`` steps; the progress line."""
    tc = cfg.train
    result, grad_norm, skipped, load = step.result, step.grad_norm, step.skipped, step.load
    loss = result.losses["lm"]
    lr = built.scheduler.get_last_lr()[0]
    tensorboard_step = _tensorboard_step(tc, plan, state.step)
    if load is not None:  # on a TensorBoard step the step's read brought the biases too
        monitor.update(state.step, load, step.biases)
    record = {"step": state.step, "stage": plan.name, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "label_tokens": result.counts["lm"], "tokens_per_s": logs.timer.tokens_per_s,
              "tokens_seen": state.tokens_seen, "skipped": skipped}
    rates = step_flops_rates(cfg, ctx, plan.seq_len, logs.timer.tokens_per_s)  # TFLOP/s per device, MFU
    record.update({"tflops": None, **rates})
    others = {name: value for name, value in result.losses.items() if name != "lm" and result.counts[name]}
    record.update({f"loss_{name}": value for name, value in others.items()})  # objectives with items this step
    logs.metrics.write(record)
    if tensorboard_step:
        scalars = {"train/loss": loss, "train/lr": lr, "train/tokens_seen": state.tokens_seen,
                   "train/stage": plan.index, "train/skipped_steps": state.skipped_steps}
        scalars.update({f"train/loss_{name}": value for name, value in others.items()})
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if logs.timer.tokens_per_s is not None:
            scalars["perf/tokens_per_s"] = logs.timer.tokens_per_s
            scalars["perf/step_s"] = logs.timer.mean_step_s
        scalars.update({f"perf/{name}": value for name, value in rates.items()})
        if load is not None:
            scalars.update(monitor.scalars(ctx.pipeline_group))
        logs.tb.scalars(state.step, scalars)
    logs.progress.update(state.step, loss=loss, lr=lr, grad_norm=grad_norm,
                         tokens_per_s=logs.timer.tokens_per_s, eta_s=logs.timer.eta(tc.steps - state.step), **rates)


