"""The training loop. Everything else a run needs lives beside it:

    parallel/state.py   ranks, device, layout, process groups     ds_config.py   DeepSpeed JSON
    schedule.py         warmup + cosine LR                        checkpoint.py  save / resume
    tensorboard.py      events (rank 0)                           metrics.py     throughput, progress line
    moe_monitor.py      expert load scalars, starved experts

One step = ``grad_accum_steps`` micro-batches through the DeepSpeed engine, one optimizer
update, then the expert-bias update from the load of all ranks (so every replica keeps
identical biases), then logging and, every ``save_every`` steps, a checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.data.synthetic_text import SyntheticTextDataset
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel import state as parallel_state
from xoron_dist.tokenizer import build_tokenizer
from xoron_dist.train.checkpoint import (
    TrainerState,
    config_hash,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
)
from xoron_dist.train.ds_config import build_ds_config, write_ds_config
from xoron_dist.train.metrics import ProgressLog, StepTimer
from xoron_dist.train.moe_monitor import ExpertLoadMonitor
from xoron_dist.train.schedule import WarmupCosineSchedule
from xoron_dist.train.tensorboard import TensorBoardWriter

logger = logging.getLogger(__name__)


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and stacked experts); not norms, biases or router vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: XoronConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or continue) ``cfg``'s training on this rank; every rank calls this."""
    if cfg.stages:
        raise ConfigError(
            f"config has {len(cfg.stages)} curriculum stage(s), but staged runs (per-stage data mix, sequence "
            "length and freezing) arrive with the Arrow data loader (issue #3); remove 'stages' and set train.* "
            "for a single-stage run"
        )
    ctx = parallel_state.initialize(cfg)
    try:
        return _train(cfg, ctx, resume=resume, overwrite=overwrite)
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
            import shutil

            shutil.rmtree(paths.checkpoints, ignore_errors=True)
            shutil.rmtree(paths.tensorboard, ignore_errors=True)
            paths.metrics.unlink(missing_ok=True)
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "config.yaml").write_text(cfg.to_yaml())
    dist.barrier()


def _train(cfg: XoronConfig, ctx, *, resume: bool, overwrite: bool) -> TrainResult:
    tc = cfg.train
    paths = RunPaths(Path(tc.output_dir) / tc.name)
    _prepare_run_dir(cfg, paths, ctx, resume, overwrite)

    # Rank 0 trains/saves the tokenizer; the others then load the saved one.
    tokenizer = build_tokenizer(cfg, paths.tokenizer) if ctx.is_main else None
    dist.barrier()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, paths.tokenizer)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = XoronLLM(cfg.llm).to(ctx.device)
    model.activation_checkpointing = tc.activation_checkpointing
    ds_config = build_ds_config(cfg, ctx.dp_size, ctx.device_info.dtype, ctx.device_info.kind)
    if ctx.is_main:
        write_ds_config(paths.root / "ds_config.json", ds_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, tc.weight_decay),
        config=ds_config,
        lr_scheduler=WarmupCosineSchedule.factory(tc),
        mpu=parallel_state.mpu(),
    )
    model.keep_router_state_fp32()

    state = TrainerState(step=0, config_hash=config_hash(cfg))
    if resume:
        loaded = load_checkpoint(engine, paths.checkpoints)
        if loaded is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", paths.checkpoints)
        else:
            state = loaded
            if state.config_hash != config_hash(cfg):
                raise ConfigError(
                    f"checkpoint {paths.checkpoints} was written by a run with a different model/parallel config "
                    f"(hash {state.config_hash}, now {config_hash(cfg)}); resume with the run's own "
                    f"{paths.root / 'config.yaml'} or start a new train.name"
                )
            logger.info("resumed from step %d (%d tokens seen)", state.step, state.tokens_seen)
    if state.step >= tc.steps:
        logger.info("run already complete at step %d (train.steps=%d); raise train.steps to continue",
                    state.step, tc.steps)
        return TrainResult(state.step, None, paths.root)

    dataset = SyntheticTextDataset(tokenizer, cfg.data.num_documents, cfg.data.seed, tc.seq_len)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * ctx.dp_size * tc.seq_len
    tb = TensorBoardWriter(paths.tensorboard, tc.tensorboard and ctx.is_main, purge_step=state.step + 1)
    if state.step == 0:
        tb.text("config", f"```\n{cfg.to_yaml()}\n```")
    metrics_log = MetricsLog(paths.metrics, ctx.is_main, keep_up_to=state.step)
    monitor = ExpertLoadMonitor(model.moe_layer_ids, cfg.llm.moe.num_experts, cfg.llm.moe.starved_expert_warn_steps)
    progress = ProgressLog(tc.steps, log_every=tc.log_every, start_step=state.step, rank=ctx.rank)
    timer = StepTimer()
    loss_value = None
    interrupted = False
    logger.info("training %s: steps %d..%d, %d tokens/step over %d data-parallel ranks, device %s (%s)", tc.name,
                state.step + 1, tc.steps, tokens_per_step, ctx.dp_size, ctx.device_info.kind, ctx.device_info.dtype)

    with StopRequest() as stop:
        while state.step < tc.steps:
            wall_start = time.perf_counter()
            step_loss = torch.zeros((), device=ctx.device)
            for micro in range(tc.grad_accum_steps):
                batch = dataset.batch(state.step, micro, ctx.dp_rank, ctx.dp_size, tc.micro_batch_size,
                                      grad_accum_steps=tc.grad_accum_steps).to(ctx.device)
                out = engine(batch[:, :-1], labels=batch[:, 1:])
                engine.backward(out.loss)
                engine.step()
                step_loss += out.loss.detach().float() / tc.grad_accum_steps
            load = model.update_expert_biases(ctx.dp_group)
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.data_position = {"step": state.step}

            # One collective per step: the mean loss over data-parallel ranks and whether any rank was signalled.
            reduced = torch.stack([step_loss, torch.tensor(float(stop.requested), device=step_loss.device)])
            dist.all_reduce(reduced)
            loss_value = reduced[0].item() / ctx.world_size
            stop_now = reduced[1].item() > 0

            timer.step(tokens_per_step)
            state.wall_time_s += time.perf_counter() - wall_start
            lr = scheduler.get_last_lr()[0]
            grad_norm = _grad_norm(engine)
            monitor.update(state.step, load)
            record = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": timer.tokens_per_s, "tokens_seen": state.tokens_seen}
            metrics_log.write(record)
            if state.step % tc.log_every == 0 or state.step == tc.steps:
                scalars = {"train/loss": loss_value, "train/lr": lr, "train/tokens_seen": state.tokens_seen}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = grad_norm
                if timer.tokens_per_s is not None:
                    scalars["perf/tokens_per_s"] = timer.tokens_per_s
                    scalars["perf/step_s"] = timer.mean_step_s
                scalars.update(monitor.scalars(load, [r.expert_bias for r in model.routers()]))
                tb.scalars(state.step, scalars)
            progress.update(state.step, loss=loss_value, lr=lr, grad_norm=grad_norm,
                            tokens_per_s=timer.tokens_per_s, eta_s=timer.eta(tc.steps - state.step))
            if state.step % tc.save_every == 0 or state.step == tc.steps or stop_now:
                save_checkpoint(engine, paths.checkpoints, state, keep=tc.keep_checkpoints)
            if stop_now:
                interrupted = True
                logger.warning("stopped at step %d after a signal; continue with --resume", state.step)
                break
    progress.close()
    tb.close()
    dist.barrier()  # rank 0 hosts the rendezvous store: nobody tears down while others still talk
    return TrainResult(state.step, loss_value, paths.root, interrupted)


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
