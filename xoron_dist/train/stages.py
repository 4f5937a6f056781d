"""Curriculum stages: the ordered plan a run follows, resolved from ``stages:`` or from ``train``.

Each stage has its own step count, sequence length, learning-rate schedule (warmup + cosine
over the stage), data mix and kinds, frozen parameters, objectives' weights (a codec stage:
``{lm: 0, codec: 1}``) and expert-bias switch; everything a
stage leaves unset comes from ``train``/``data``. Steps are numbered globally: stage k starts
where stage k-1 ended, and a checkpoint names its stage, so a resumed run re-enters the right
one. A run without ``stages:`` is one stage named ``main``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xoron_dist.config import ConfigError, TrainConfig, XoronConfig
from xoron_dist.train.lora import freeze_for_stage
from xoron_dist.train.objectives import active_objectives
from xoron_dist.utils.typed_config import field_error


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    first_step: int  # global step this stage starts after (0 for the first stage)
    steps: int
    seq_len: int
    train: TrainConfig  # the run's train section with this stage's steps, lr and objectives' weights
    mix: dict[str, float]
    kinds: tuple[str, ...]
    freeze: tuple[str, ...]
    bias_update: bool
    bias_update_rate: float
    trains: str = "all"  # all | base | adapters (``train/lora.py``)
    carry_optimizer: bool = False  # Adam's moments from the previous stage (``train/reshard.py``)

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps


def plan_stages(cfg: XoronConfig) -> list[StagePlan]:
    tc = cfg.train
    default_trains = "adapters" if cfg.model.lora.enabled else "all"
    if not cfg.stages:
        return [StagePlan(0, "main", 0, tc.steps, tc.seq_len, tc, dict(cfg.data.mix), (), (),
                          cfg.llm.moe.bias_update, cfg.llm.moe.bias_update_rate, default_trains)]
    total = sum(stage.steps for stage in cfg.stages)
    if total != tc.steps:
        raise field_error("train.steps", tc.steps,
                          f"with curriculum stages it must equal the sum of stages[*].steps ({total})")
    names = [stage.name for stage in cfg.stages]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"curriculum stage name '{duplicate}' is used twice in stages; names must be unique")
    plans, first = [], 0
    for i, stage in enumerate(cfg.stages):
        if cfg.data.source == "synthetic_text" and (stage.mix or stage.kinds):
            raise field_error(f"stages[{i}].mix", stage.mix or stage.kinds,
                              "mix/kinds choose Arrow datasets; data.source=synthetic_text has none")
        seq_len = stage.seq_len or tc.seq_len
        stage_train = dataclasses.replace(tc, steps=stage.steps, lr=stage.lr or tc.lr, seq_len=seq_len,
                                          warmup_steps=min(tc.warmup_steps, stage.steps),
                                          objectives={**tc.objectives, **stage.objectives})
        if stage.objectives:  # names checked now, not when the stages before it have run
            active_objectives(dataclasses.replace(cfg, train=stage_train), f"stages[{i}].objectives")
        bias = cfg.llm.moe.bias_update if stage.expert_bias_update is None else stage.expert_bias_update
        rate = cfg.llm.moe.bias_update_rate if stage.expert_bias_update_rate is None else stage.expert_bias_update_rate
        if stage.carry_optimizer and i == 0:
            raise field_error("stages[0].carry_optimizer", True, "the first stage has no previous stage to carry "
                              "Adam's moments from; set it on a later stage")
        if stage.trains not in (None, "all") and not cfg.model.lora.enabled:
            raise field_error(f"stages[{i}].trains", stage.trains, "needs adapters: set model.lora.enabled: true")
        plans.append(StagePlan(i, stage.name, first, stage.steps, seq_len, stage_train,
                               dict(stage.mix or cfg.data.mix), tuple(stage.kinds), tuple(stage.freeze), bias, rate,
                               stage.trains or default_trains, stage.carry_optimizer))
        first += stage.steps
    return plans


def stage_at(plans: list[StagePlan], step: int) -> StagePlan | None:
    """The stage that runs the step after ``step`` updates, or None when the run is complete."""
    return next((plan for plan in plans if step < plan.last_step), None)


def freeze_parameters(model, plan: StagePlan) -> int:
    """Set ``requires_grad=False`` on parameters whose names start with a ``freeze`` prefix; returns how many.

    In a ``XoronMultimodalModel`` the text model's names carry an ``llm.`` prefix; the LLM's own
    names ('layers.0.attn') match them too, and 'vision', 'video', 'audio', '<medium>_projector',
    'fusion', the generators 'speech', 'image_gen', 'video_gen' (or 'llm') name the other parts.
    Then the stage's ``trains`` freezes the base model or the LoRA adapters (``train/lora.py``).
    """
    frozen = 0
    for prefix in plan.freeze:
        hits = [p for name, p in model.named_parameters()
                if name.startswith(prefix) or name.removeprefix("llm.").startswith(prefix)]
        if not hits:
            raise field_error(f"stages[{plan.index}].freeze", prefix,
                              "matches no parameter name (e.g. 'embed_tokens', 'layers.0.attn', 'lm_head'; "
                              "multimodal: 'llm', 'vision', 'video', 'audio', 'image_projector', 'video_projector', "
                              "'audio_projector', 'fusion', 'speech', 'image_gen', 'video_gen')")
        for param in hits:
            frozen += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return frozen + freeze_for_stage(model, plan.trains)
