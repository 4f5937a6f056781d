"""Does a parallel layout fit the world size and the model? Checked before any process group exists.

world = dp * tp * pp * sp; experts spread over ``ep`` ranks carved out of dp * sp. One table
(``SUPPORTED`` for the dimensions, ``RULES`` for the arithmetic) drives both the checks and the
compatibility table the README embeds (``compatibility_markdown``), so the docs cannot drift
from what the code accepts.

    layout = validate_layout(cfg, world_size=8)    # LayoutError says what is wrong and what to change
    layouts = validate_layouts(cfg, world_size=8)  # one per curriculum stage (``stages[i].parallel``)

A curriculum stage may carry its own ``parallel`` fields over the run's; the same RULES check its
merged layout, on the same world size (fixed for a run), and name ``stages[i].parallel.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.model.modalities import generated, understood


class LayoutError(ConfigError):
    """The parallel sizes do not fit the world size or the model. The message lists each problem."""


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension for one run; ``dp`` is what the world size leaves."""

    world: int
    dp: int
    tp: int
    pp: int
    sp: int
    ep: int
    zero_stage: int

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights (Megatron-core: world / (tp * ep * pp))."""
        return self.world // (self.tp * self.ep * self.pp)

    def describe(self) -> str:
        return (f"world {self.world} = dp {self.dp} x tp {self.tp} x pp {self.pp} x sp {self.sp}; "
                f"ep {self.ep}; ZeRO-{self.zero_stage}")


@dataclass(frozen=True)
class Dimension:
    """One parallel dimension and what implements it."""

    key: str
    title: str
    engine: str


class _Sizes(NamedTuple):
    world: int
    tp: int
    pp: int
    sp: int
    ep: int
    zero_stage: int
    dp: int | None  # None when the world size does not divide


@dataclass(frozen=True)
class Rule:
    """An arithmetic requirement. ``check`` returns None when it holds, else the problem and its fix."""

    dimension: str
    requirement: str  # markdown, as the compatibility table shows it
    check: Callable[[XoronConfig, _Sizes], str | None]


SUPPORTED: tuple[Dimension, ...] = (
    Dimension("dp", "Data parallel + ZeRO", "DeepSpeed ZeRO 0/1/2/3 (`parallel.zero_stage`)"),
    Dimension("tp", "Tensor parallel", "Megatron-core `tensor_parallel` primitives (column/row-parallel "
              "linears, vocab-parallel embedding and cross-entropy)"),
    Dimension("sp", "Sequence parallel (ring attention)", "ring attention over Megatron's context-parallel group "
              "(zig-zag rows; MLA latent + rope key on the ring with `parallel.ring_latent`)"),
    Dimension("ep", "Expert parallel", "Megatron-core expert groups handed to DeepSpeed; our all-to-all dispatch "
              "(dropless, or `parallel.expert_capacity_factor`); ZeRO 0-2 via DeepSpeed's MoE path, ZeRO-3 via its "
              "expert partition groups"),
    Dimension("pp", "Pipeline parallel", "our 1F1B schedule over Megatron-core's pipeline group, one DeepSpeed "
              "engine per stage; layers balanced by parameter count (`xoron_dist.parallel.pipeline`)"),
)
DIMENSIONS = {d.key: d for d in SUPPORTED}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _world_divides(cfg: XoronConfig, s: _Sizes) -> str | None:
    model = s.tp * s.pp * s.sp
    if s.dp is not None:
        return None
    return (f"world size {s.world} is not divisible by tp*pp*sp = {model} (tp={s.tp}, pp={s.pp}, sp={s.sp}); "
            f"launch a multiple of {model} ranks, or pick tp, pp, sp whose product divides {s.world} "
            f"(divisors: {_divisors(s.world)})")


def _heads_divide(cfg: XoronConfig, s: _Sizes) -> str | None:
    heads = cfg.llm.num_heads
    if heads % s.tp == 0:
        return None
    return (f"model.llm.num_heads = {heads} is not divisible by parallel.tp = {s.tp}: each TP rank holds "
            f"num_heads/tp attention heads; pick tp from {_divisors(heads)}")


def _seq_len_chunks(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.sp == 1:
        return None
    chunks = 2 * s.sp
    lengths = [("train.seq_len", cfg.train.seq_len)]
    # stages with their own parallel section are checked with their own sp (``validate_layouts``)
    lengths += [(f"stages[{i}].seq_len ({st.name})", st.seq_len) for i, st in enumerate(cfg.stages)
                if st.seq_len and not st.parallel]
    bad = [(field, n) for field, n in lengths if n % chunks]
    if not bad:
        return None
    field, n = bad[0]
    below, above = n // chunks * chunks, (n // chunks + 1) * chunks
    near = f"{below} or {above}" if below else f"{above}"
    others = f" (also {', '.join(f for f, _ in bad[1:])})" if len(bad) > 1 else ""
    return (f"{field} = {n} is not divisible by 2*sp = {chunks}{others}: ring attention cuts every sequence "
            f"into 2*sp chunks (zig-zag causal load balancing); use a multiple of {chunks}, e.g. {near}")


def _ffn_dims_divide(cfg: XoronConfig, s: _Sizes) -> str | None:
    llm = cfg.llm
    dims = [("model.llm.moe.expert_intermediate_size * num_shared_experts",
             llm.moe.expert_intermediate_size * llm.moe.num_shared_experts)]
    if cfg.parallel.tp_experts:
        dims.append(("model.llm.moe.expert_intermediate_size", llm.moe.expert_intermediate_size))
    if len(llm.moe_layers) < llm.num_layers:  # some layers have the dense FFN
        dims.append(("model.llm.dense_intermediate_size", llm.dense_intermediate_size))
    bad = [(name, n) for name, n in dims if n and n % s.tp]
    if not bad:
        return None
    name, n = bad[0]
    return (f"{name} = {n} is not divisible by parallel.tp = {s.tp}: TP splits the FFN's intermediate dim; "
            f"pick tp from {_divisors(n)}" + (" (or parallel.tp_experts=false keeps routed experts whole)"
                                               if "num_shared" not in name and "dense" not in name else ""))


def _ring_without_dropout(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.sp == 1 or cfg.llm.attention_dropout == 0:
        return None
    return (f"model.llm.attention_dropout = {cfg.llm.attention_dropout} with parallel.sp = {s.sp}: ring attention "
            "has no attention dropout; set model.llm.attention_dropout=0")


def _megatron_sequence_parallel(cfg: XoronConfig, s: _Sizes) -> str | None:
    if not cfg.parallel.sequence_parallel:
        return None
    return ("parallel.sequence_parallel = true (Megatron's split of the norm/residual regions over the TP group) "
            "is not built yet; set it to false (long sequences: use parallel.sp, ring attention)")


def _layers_fill_stages(cfg: XoronConfig, s: _Sizes) -> str | None:
    layers = cfg.llm.num_layers
    if layers >= s.pp:
        return None
    return (f"model.llm.num_layers = {layers} is fewer than parallel.pp = {s.pp}: every pipeline stage holds at "
            f"least one layer (uneven splits are balanced by parameter count); pick pp from 1 to {layers}")


def _pipeline_zero0(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.pp == 1 or s.zero_stage != 0:
        return None
    return (f"parallel.zero_stage = 0 with parallel.pp = {s.pp}: DeepSpeed's non-ZeRO gradient clipping counts "
            f"replicated parameters on model-parallel rank 0 only, i.e. on the first pipeline stage only; use "
            f"parallel.zero_stage=1 (same memory when dp = 1)")


def _pipeline_tied_bf16(cfg: XoronConfig, s: _Sizes) -> str | None:
    tc = cfg.train
    fp32_accum = tc.grad_accum_dtype == "fp32" or (tc.grad_accum_dtype == "auto" and tc.grad_accum_steps > 1)
    if s.pp == 1 or not cfg.llm.tie_word_embeddings or tc.precision != "bf16" or not fp32_accum:
        return None
    return (f"model.llm.tie_word_embeddings = true with parallel.pp = {s.pp} and bf16 weights accumulating "
            f"gradients in fp32 (train.grad_accum_dtype = {tc.grad_accum_dtype}): DeepSpeed's BF16_Optimizer "
            f"reduces each gradient as it lands, before the first and last stages' copies of the tied embedding "
            f"can be summed; set train.grad_accum_dtype=bf16, or model.llm.tie_word_embeddings=false")


def _encoder_heads_divide(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.tp == 1 or cfg.data.source != "arrow":
        return None
    model = cfg.model
    heads = [(f"model.{row.section}.{row.heads}", row.encoder_heads(cfg)) for row in understood(cfg)]
    heads += [found for row in generated(cfg) for found in row.generator_head_counts(cfg)]
    if heads:
        heads += [("model.projector.num_heads", model.projector.num_heads)]
        heads += [("model.fusion.num_heads", model.fusion.num_heads)] if model.fusion.layers else []
    bad = [(name, n) for name, n in heads if n % s.tp]
    if not bad:
        return None
    name, n = bad[0]
    return (f"{name} = {n} is not divisible by parallel.tp = {s.tp}: tensor parallelism splits every attention "
            f"by heads; pick tp from {_divisors(n)}")


def _multimodal_layout(cfg: XoronConfig, s: _Sizes) -> str | None:
    encoders = list(dict.fromkeys([row.section for row in understood(cfg)]
                                  + [row.generator_section for row in generated(cfg)]))
    if not encoders or cfg.data.source != "arrow":  # synthetic text trains the LLM alone
        return None
    generators = [row.generator_section for row in generated(cfg)]
    if s.pp > 1 and "speech" in generators:
        return (f"model.speech enabled with parallel.pp={s.pp}: the speech head (on the last pipeline stage) also "
                "trains through the audio encoder, which sits on stage 0; set parallel.pp=1, or "
                "model.speech.enabled=false for this stage")
    if s.pp > 1 and generators and cfg.train.sample_every:
        return (f"train.sample_every = {cfg.train.sample_every} with model.{generators[0]} and parallel.pp={s.pp}: "
                "generating samples through the pipeline stages is not built (the LLM is split over the stages, "
                "the generator sits on the last); set train.sample_every=0 for this stage, or parallel.pp=1")
    if s.sp > 1 and generators:
        return (f"model.{generators[0]} enabled with parallel.sp={s.sp}: a generator reads the LLM's states of "
                f"whole requests, which the ring cuts over the sequence-parallel ranks; set parallel.sp=1, or "
                f"model.{generators[0]}.enabled=false for this stage")
    return None


# Media whose every module runs the same calls on every rank for any micro-batch (``XoronMultimodalModel``),
# tested under ZeRO-3 on 2 ranks (dp) and 4 (dp x tp, ep) against one (tests/parallel/test_multimodal_zero3.py;
# audio with the speech head: tests/model/test_speech_head.py); and generators whose calls the ranks agree on
# (``parallel.calls``), tested on 2 ranks with local and with spread experts (tests/model/test_gen_heads.py).
_ZERO3_MEDIA = ("vision", "video", "audio")
_ZERO3_GENERATORS = ("image_gen", "video_gen", "speech")


def _multimodal_zero3(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.zero_stage != 3 or cfg.data.source != "arrow" or not (understood(cfg) or generated(cfg)):
        return None
    generators = [row.generator_section for row in generated(cfg)]
    untested = [g for g in generators if g not in _ZERO3_GENERATORS]
    untested += [row.section for row in understood(cfg) if row.section not in _ZERO3_MEDIA]
    if untested:
        return (f"model.{untested[0]}.enabled with parallel.zero_stage=3: only the {', '.join(_ZERO3_MEDIA)} "
                f"encoders and the {', '.join(_ZERO3_GENERATORS)} generators are built and tested under ZeRO-3; "
                f"use parallel.zero_stage<=2, or set model.{untested[0]}.enabled=false")
    return None


def _zero3_split_experts(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.zero_stage != 3 or s.ep == 1 or s.tp == 1 or not cfg.parallel.tp_experts:
        return None
    return (f"parallel.tp_experts = true with parallel.ep={s.ep}, parallel.tp={s.tp} and parallel.zero_stage=3: "
            "DeepSpeed's ZeRO-3 adds up the expert gradients' norm over the expert groups but not over the "
            "tensor-parallel ranks, so with experts split on their FFN dim the gradient norm (clipping, logging) "
            "would miss the other TP ranks' slices; set parallel.tp_experts=false (whole experts on every TP "
            "rank), or parallel.zero_stage<=2")


def _pipeline_zero(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.pp == 1 or s.zero_stage <= 1:
        return None
    return (f"parallel.zero_stage = {s.zero_stage} with parallel.pp = {s.pp}: DeepSpeed's pipeline engine refuses "
            f"it (\"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism\"); use parallel.zero_stage=1")


def _experts_divide(cfg: XoronConfig, s: _Sizes) -> str | None:
    counts = [("model.llm.moe.num_experts", cfg.llm.moe.num_experts)]
    counts += [(f"model.{name}.dit.moe.num_experts", getattr(cfg.model, name).dit.moe.num_experts)
               for name in ("image_gen", "video_gen") if getattr(cfg.model, name).enabled]
    bad = [(field, n) for field, n in counts if n % s.ep]
    if not bad:
        return None
    field, experts = bad[0]
    usable = _divisors(math.gcd(*(n for _, n in counts)))
    return (f"{field} = {experts} is not divisible by parallel.ep = {s.ep}: each EP rank holds num_experts/ep "
            f"experts of every MoE (the LLM's and the generators'); pick ep from {usable}")


def _experts_carved_from_dp(cfg: XoronConfig, s: _Sizes) -> str | None:
    if s.dp is None:
        return None  # the world-size rule already reports this layout
    room = s.dp * s.sp
    if room % s.ep == 0:
        return None
    fits = _divisors(math.gcd(room, cfg.llm.moe.num_experts))
    return (f"parallel.ep = {s.ep} does not divide dp*sp = {room} (dp={s.dp}, sp={s.sp}): expert-parallel groups "
            f"are carved out of the data/sequence-parallel ranks (Megatron-core needs world % (tp*ep*pp) == 0, "
            f"here {s.world} % {s.tp * s.ep * s.pp}); use ep from {fits}, or launch more ranks")


RULES: tuple[Rule, ...] = (
    Rule("dp", "world size divisible by tp·pp·sp; dp = world / (tp·pp·sp)", _world_divides),
    Rule("tp", "`model.llm.num_heads` divisible by tp", _heads_divide),
    Rule("tp", "FFN intermediate sizes (shared expert, dense layers, routed experts unless "
               "`parallel.tp_experts=false`) divisible by tp; the vocabulary is padded to a multiple of tp",
         _ffn_dims_divide),
    Rule("tp", "with encoders: the heads of every enabled encoder and generator (`model.vision.num_heads`, "
               "`model.video.num_heads`, `model.speech.decoder.num_heads`, ...), `model.projector.num_heads`, "
               "`model.fusion.num_heads` divisible by tp",
         _encoder_heads_divide),
    Rule("tp", "`parallel.sequence_parallel` (Megatron's norm-region split) not built yet: false",
         _megatron_sequence_parallel),
    Rule("sp", "`train.seq_len` (and every stage's `seq_len`) divisible by 2·sp (zig-zag chunks)", _seq_len_chunks),
    Rule("sp", "`model.llm.attention_dropout` = 0 (the ring has no attention dropout)", _ring_without_dropout),
    Rule("ep", "`model.llm.moe.num_experts` (and each enabled generator's `dit.moe.num_experts`) divisible by ep",
         _experts_divide),
    Rule("ep", "ep divides dp·sp (expert groups are carved out of the data/sequence-parallel ranks)",
         _experts_carved_from_dp),
    Rule("ep", "ZeRO-3 with ep > 1 and tp > 1: `parallel.tp_experts=false` (ZeRO-3's gradient norm of TP-split "
               "experts misses the other TP ranks' slices)",
         _zero3_split_experts),
    Rule("pp", "`model.llm.num_layers` ≥ pp (every stage at least one layer; uneven splits balanced)",
         _layers_fill_stages),
    Rule("pp", "`parallel.zero_stage` ≤ 1 when pp > 1 (DeepSpeed's pipeline engine refuses ZeRO-2/3)",
         _pipeline_zero),
    Rule("pp", "`parallel.zero_stage` ≠ 0 when pp > 1 (non-ZeRO clipping would miss later stages): ZeRO-1",
         _pipeline_zero0),
    Rule("pp", "`model.llm.tie_word_embeddings` with pp > 1: the first and last stages' copies sum their "
               "gradients each step; not with bf16 fp32 gradient accumulation (`train.grad_accum_dtype=bf16`)",
         _pipeline_tied_bf16),
    Rule("dp", "with an encoder or generator enabled (`model.vision`, `model.video`, ...; Arrow data): pp > 1 "
               "(encoders and projectors on stage 0, each fusion layer on its decoder layer's stage, the media "
               "tokens sent beside the hidden states, image/video generators on the last stage; with any of "
               "tp, sp, ep) only without `model.speech` (its head on the last stage trains the audio encoder on "
               "stage 0) and without generation samples (`train.sample_every` = 0); sp > 1 (each medium "
               "encoded once per replica, its tokens exchanged over the SP ranks of each TP rank, rows cut after "
               "the spans are filled; with any of tp, pp, ep) only without generators (they read whole requests)",
         _multimodal_layout),
    Rule("dp", "multimodal with `parallel.zero_stage` = 3: every encoder (with projectors and fusion) with any "
               "of dp, tp, sp, ep; the generators (`model.image_gen`, `model.video_gen`, `model.speech`: their "
               "calls agreed over the ranks, a DiT's experts gathered per call) with any of dp, tp, ep",
         _multimodal_zero3),
)


def _problems(cfg: XoronConfig, world_size: int) -> tuple[list[str], Layout | None]:
    """What every rule says about ``cfg.parallel`` on ``world_size`` ranks, and the layout when nothing."""
    if world_size < 1:
        raise LayoutError(f"world size {world_size}: a run needs at least one rank")
    p = cfg.parallel
    model = p.tp * p.pp * p.sp
    dp = world_size // model if world_size % model == 0 else None
    sizes = _Sizes(world_size, p.tp, p.pp, p.sp, p.ep, p.zero_stage, dp)
    problems = [msg for rule in RULES if (msg := rule.check(cfg, sizes)) is not None]
    if problems or dp is None:
        return problems, None
    return [], Layout(world_size, dp, p.tp, p.pp, p.sp, p.ep, p.zero_stage)


def _head(p, world_size: int, where: str = "parallel") -> str:
    return (f"{where} layout (tp={p.tp}, pp={p.pp}, sp={p.sp}, ep={p.ep}, zero_stage={p.zero_stage}) "
            f"does not fit a world of {world_size} rank(s):")


def validate_layout(cfg: XoronConfig, world_size: int) -> Layout:
    """Check ``cfg.parallel`` against ``world_size`` and the model; return the ``Layout`` or raise ``LayoutError``.

    Every problem is reported at once.
    """
    problems, layout = _problems(cfg, world_size)
    if problems:
        raise LayoutError("\n  - ".join([_head(cfg.parallel, world_size), *problems]))
    assert layout is not None  # the world-size rule passed
    return layout


def stage_layout_config(cfg: XoronConfig, index: int) -> XoronConfig:
    """The config curriculum stage ``index`` (with its own ``parallel`` section) is checked and built with:
    the run's, with the stage's parallel fields over the run's ``parallel``, the stage's ``seq_len`` as
    ``train.seq_len``, and no stages. ``ConfigError`` naming ``stages[index].parallel.<field>`` when the
    merged section is invalid on its own (e.g. sequence_parallel without tp)."""
    stage = cfg.stages[index]
    merged = stage.parallel_over(cfg.parallel)
    merged.validate(f"stages[{index}].parallel")
    train = dataclasses.replace(cfg.train, seq_len=stage.seq_len or cfg.train.seq_len)
    return dataclasses.replace(cfg, parallel=merged, train=train, stages=[])


def _in_stage(message: str, index: int, stage) -> str:
    """A rule's message about ``stage_layout_config``'s config, naming the stage's own fields."""
    message = re.sub(r"(?<![\w.\]])parallel\.(?=\w)", f"stages[{index}].parallel.", message)
    if stage.seq_len:
        message = message.replace("train.seq_len", f"stages[{index}].seq_len")
    return message


def validate_layouts(cfg: XoronConfig, world_size: int) -> list[Layout]:
    """Every curriculum stage's layout on ``world_size`` ranks (the world size is fixed for a run), one per
    stage (one for a run without stages): a stage with a ``parallel`` section is checked by the same RULES
    with its merged layout (errors name ``stages[i].parallel.<field>``), the others with the run's
    ``parallel``. ``LayoutError`` lists every problem of every stage at once."""
    inheriting = [i for i, stage in enumerate(cfg.stages) if not stage.parallel]
    problems, base = _problems(cfg, world_size) if inheriting or not cfg.stages else ([], None)
    messages = [_head(cfg.parallel, world_size), *problems] if problems else []
    layouts: list[Layout | None] = [base] * max(1, len(cfg.stages))
    for i, stage in enumerate(cfg.stages):
        if not stage.parallel:
            continue
        own = stage_layout_config(cfg, i)
        found, layouts[i] = _problems(own, world_size)
        if found:
            messages += [_head(own.parallel, world_size, f"stages[{i}] ('{stage.name}') parallel"),
                         *(_in_stage(msg, i, stage) for msg in found)]
    if messages:
        raise LayoutError("\n  - ".join(messages))
    assert all(layout is not None for layout in layouts)
    return layouts


def compatibility_markdown() -> str:
    """The compatibility table the README embeds: one row per dimension, its status and its rules."""
    lines = [
        "| Dimension | Setting | Engine | Requirements |",
        "| --- | --- | --- | --- |",
    ]
    for dim in SUPPORTED:
        setting = "world / (tp·pp·sp)" if dim.key == "dp" else f"`parallel.{dim.key}`"
        rules = "<br>".join(rule.requirement for rule in RULES if rule.dimension == dim.key)
        lines.append(f"| {dim.title} | {setting} | {dim.engine} | {rules} |")
    return "\n".join(lines) + "\n"


__all__ = ["DIMENSIONS", "RULES", "SUPPORTED", "Dimension", "Layout", "LayoutError", "Rule",
           "compatibility_markdown", "stage_layout_config", "validate_layout", "validate_layouts"]
