"""Enumerate the layouts of a world size, keep those the validator accepts, estimate, rank.

Every combination of tp, pp, sp (divisors of the world size), ep (divisors of the expert count),
ZeRO stage 0-3, micro-batch size (powers of two dividing the per-replica batch) and activation
checkpointing on/off is built into a config and put to ``validate_layout``, the same check a run
makes before it creates any process group, so a planned layout is one the trainer accepts (and
layouts of a dimension still being built appear once the validator accepts them). Refused ones
keep the validator's reason for the verbose listing. A layout is also refused when tensor
parallelism cannot split a multimodal part (an FFN width of an encoder or generator, which the
validator does not check: ``xoron_dist.plan.parts.split_problem``), as the trainer would stop there.

The global batch (sequences per optimizer step) stays fixed across candidates, so the step time
ranks them as tokens/s does; a data-parallel size that does not divide it is skipped. Among the
candidates that fit in memory the fastest comes first, then the smaller memory footprint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.parallel.layout import Layout, LayoutError, validate_layout
from xoron_dist.plan.cluster import ClusterSpec
from xoron_dist.plan.cost import StepCost, estimate_step
from xoron_dist.plan.memory import MemoryEstimate, TrainingShape, estimate_memory
from xoron_dist.plan.parts import split_problem


@dataclass(frozen=True)
class Candidate:
    """One layout with its batch split; ``memory``/``cost`` are None when the layout was refused."""

    tp: int
    pp: int
    sp: int
    ep: int
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool
    layout: Layout | None = None
    refusal: str | None = None
    memory: MemoryEstimate | None = None
    cost: StepCost | None = None
    fits: bool = False

    def describe(self) -> str:
        dp = f"dp{self.layout.dp} " if self.layout else ""
        return (f"{dp}tp{self.tp} pp{self.pp} sp{self.sp} ep{self.ep} z{self.zero_stage} "
                f"mb{self.micro_batch_size}x{self.grad_accum_steps}{' ac' if self.activation_checkpointing else ''}")

    def apply(self, cfg: XoronConfig, *, validate: bool = True) -> XoronConfig:
        """``cfg`` with this candidate's parallel sizes and batch split. ``validate=False`` skips
        re-checking the whole config tree (the search changes only positive sizes and leaves the
        layout rules to ``validate_layout``: thousands of candidates)."""
        parallel = dataclasses.replace(cfg.parallel, tp=self.tp, pp=self.pp, sp=self.sp, ep=self.ep,
                                       zero_stage=self.zero_stage)
        train = dataclasses.replace(cfg.train, micro_batch_size=self.micro_batch_size,
                                    grad_accum_steps=self.grad_accum_steps,
                                    activation_checkpointing=self.activation_checkpointing)
        if validate:
            return dataclasses.replace(cfg, parallel=parallel, train=train)
        run = copy.copy(cfg)
        run.parallel, run.train = parallel, train
        return run


@dataclass(frozen=True)
class PlanResult:
    cluster: ClusterSpec
    global_batch: int  # sequences per optimizer step
    seq_len: int
    ranked: list[Candidate]  # accepted, fitting first, fastest first
    refused: list[Candidate]

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked and self.ranked[0].fits else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(cfg: XoronConfig, cluster: ClusterSpec, *, global_batch: int | None = None,
         ds_config_for=None) -> PlanResult:
    """Every candidate layout for ``cluster.world_size`` ranks, ranked (see the module docstring).

    ``global_batch``: sequences per optimizer step; default: the config's micro_batch_size *
    grad_accum_steps on every rank as pure data parallelism would run it.
    ``ds_config_for(cfg) -> dict``: the DeepSpeed JSON of a candidate (default: ``build_ds_config``).
    """
    world = cluster.world_size
    mixed = cluster.device == "cuda"
    if global_batch is None:
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    if global_batch < 1:
        raise ConfigError(f"global batch {global_batch}: a step needs at least one sequence")
    ds_for = ds_config_for or _default_ds_config(cluster)
    seq_len = longest_seq_len(cfg)
    checked: dict[tuple, tuple[Layout | None, str | None]] = {}
    ranked, refused = [], []
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            for sp in _divisors(world // (tp * pp)):
                dp = world // (tp * pp * sp)
                if global_batch % dp:
                    continue  # the global batch does not split over this many replicas
                per_replica = global_batch // dp
                for ep in _divisors(cfg.llm.moe.num_experts):
                    for zero in (0, 1, 2, 3):
                        for mb in (m for m in _divisors(per_replica) if m & (m - 1) == 0):
                            for ac in (False, True):
                                cand = Candidate(tp, pp, sp, ep, zero, mb, per_replica // mb, ac)
                                judged = _judge(cfg, cand, cluster, mixed, ds_for, seq_len, checked)
                                (ranked if judged.layout is not None and judged.refusal is None
                                 else refused).append(judged)
    ranked.sort(key=lambda c: (not c.fits, round(c.cost.step_time, 9), c.memory.total, c.zero_stage))
    return PlanResult(cluster, global_batch, seq_len, ranked, refused)


def longest_seq_len(cfg: XoronConfig) -> int:
    """The longest rows any curriculum stage trains on: the plan must fit every stage."""
    return max([cfg.train.seq_len] + [st.seq_len for st in cfg.stages if st.seq_len])


def _judge(cfg: XoronConfig, cand: Candidate, cluster: ClusterSpec, mixed: bool, ds_for, seq_len: int,
           checked: dict) -> Candidate:
    # The validator reads the batch split only through the pipeline's micro-batch count.
    key = (cand.tp, cand.pp, cand.sp, cand.ep, cand.zero_stage, cand.grad_accum_steps if cand.pp > 1 else None)
    if key not in checked:
        checked[key] = _validate(cfg, cand, cluster)
    layout, reason = checked[key]
    if layout is None or reason is not None:
        return dataclasses.replace(cand, layout=layout, refusal=reason)
    run = cand.apply(cfg, validate=False)
    shape = TrainingShape(cand.micro_batch_size, seq_len, cand.grad_accum_steps, cand.activation_checkpointing,
                          cfg.train.loss_chunk_for(cluster.device))
    memory = estimate_memory(run, layout, shape, ds_for(run), mixed,
                             cpu_optimizer_temporaries=cluster.device == "cpu")
    cost = estimate_step(run, layout, shape, cluster, mixed)
    return dataclasses.replace(cand, layout=layout, memory=memory, cost=cost,
                               fits=memory.total <= cluster.usable_bytes)


def _validate(cfg: XoronConfig, cand: Candidate, cluster: ClusterSpec) -> tuple[Layout | None, str | None]:
    """(layout, None) when accepted; (layout or None, the reason) when refused."""
    try:
        layout = validate_layout(cand.apply(cfg, validate=False), cluster.world_size)
    except LayoutError as err:  # one line: the problems the validator listed, joined
        return None, str(err).split("\n  - ", 1)[-1].replace("\n  - ", "; ")
    except ConfigError as err:
        return None, str(err)
    return layout, split_problem(cfg, layout.tp)


def _default_ds_config(cluster: ClusterSpec):
    """``build_ds_config`` of each candidate, built once per (JSON, ZeRO stage): the planner only
    reads its bucket sizes, which do not depend on the batch split."""
    import torch

    from xoron_dist.train.ds_config import build_ds_config, ds_config_path_for

    dtype = torch.bfloat16 if cluster.device == "cuda" else torch.float32
    cache: dict[tuple[str, int], dict] = {}

    def ds_for(run: XoronConfig) -> dict:
        path = ds_config_path_for(run)
        key = (path, run.parallel.zero_stage)
        if key not in cache:
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, ds_config=path))
            cache[key] = build_ds_config(run, 1, dtype, cluster.device)
        return cache[key]

    return ds_for


__all__ = ["Candidate", "PlanResult", "longest_seq_len", "plan"]
