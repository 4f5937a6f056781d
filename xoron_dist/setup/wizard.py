"""``xoron setup``: ask for the cluster and the goal, plan the layout, write the run files, print the launch command.

    result = run_setup({"cluster": "h100x8", "nodes": "4", "hosts": "slurm"}, ask=None)   # flags only
    result = run_setup({}, ask=input)                                                      # every question asked

The walk over ``QUESTIONS`` (``xoron_dist.setup.questions``) is the whole wizard: an answer given as
a flag is parsed and never asked (a bad one fails at once, naming the flag); otherwise ``ask`` is
called with the prompt and a bad answer is asked again after its reason is shown; with ``ask=None``
every unasked question takes its default. Then the goal becomes a run config through the project's
loader (``load_config``: the base run plus ``a.b=c`` overrides) and the trainer's stage checks
(``plan_stages``); a config error is traced to the question that set the field and that question
alone is asked again (or, non-interactive, fails naming its flag). The planner (``xoron plan``'s
``plan``) ranks the layouts of the cluster and its writer (``write_plan``) writes ``plan.yaml`` and
``ds_config.json``; beside them go a DeepSpeed hostfile or an sbatch script
(``xoron_dist.setup.launch_files``). Nothing is written before every answer, the config and the
chosen layout have passed their checks; an existing output folder is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xoron_dist.config import ConfigError, XoronConfig, load_config
from xoron_dist.model.modalities import MODALITIES
from xoron_dist.plan.cluster import GIB, ClusterSpec
from xoron_dist.plan.search import Candidate, PlanResult, plan
from xoron_dist.setup.launch_files import hostfile_text, launch_command, sbatch_text
from xoron_dist.setup.questions import (
    QUESTIONS,
    AnswerError,
    Answers,
    Question,
    cluster_of,
    kind_trained,
    question_for_field,
)

Ask = Callable[[str], str]
Say = Callable[[str], None]
WRITTEN = ("plan.yaml", "ds_config.json", "hostfile", "train.sbatch")  # what --overwrite replaces
_FIELD = "config field '"


class SetupError(ConfigError):
    """A bad flag or an unanswerable question: one line that names the flag and the fix."""


@dataclass(frozen=True)
class SetupResult:
    answers: Answers
    config: XoronConfig  # the goal before planning
    plan: PlanResult
    chosen: Candidate
    files: tuple[Path, ...]  # plan.yaml, ds_config.json, hostfile or train.sbatch
    command: str  # the launch command


# ----------------------------------------------------------------------------- answers


def _ask_until_valid(q: Question, answers: Answers, ask: Ask, say: Say) -> tuple[Any, str]:
    default = q.default(answers)
    choices = f" {{{'|'.join(q.choices(answers))}}}" if q.choices else ""
    prompt = f"{q.prompt}{choices} [{default}] ({q.flag}): "
    while True:
        try:
            text = ask(prompt).strip() or (default or "")
        except EOFError:
            raise SetupError(f"{q.flag}: no answer (the input ended); give it as {q.flag} VALUE, or --no-input "
                             "to take the defaults") from None
        try:
            return q.parse(text, answers), text
        except AnswerError as err:
            say(f"  {err}; try again")


def _answer(q: Question, given: dict[str, str | None], answers: Answers, texts: dict[str, str], ask: Ask | None,
            say: Say) -> None:
    text = given.get(q.name)
    if text is not None:
        try:
            answers[q.name] = q.parse(text.strip(), answers)
        except AnswerError as err:
            raise SetupError(f"{q.flag} {text!r}: {err}") from None
    elif ask is None or not q.asked(answers):
        text = q.default(answers)
        try:
            answers[q.name] = q.parse(text, answers)
        except AnswerError as err:
            raise SetupError(f"{q.flag} (default {text!r}): {err}; give {q.flag}") from None
    else:
        answers[q.name], text = _ask_until_valid(q, answers, ask, say)
    texts[q.name] = text


def _redo(q: Question, reason: str, given: dict[str, str | None], answers: Answers, texts: dict[str, str],
          ask: Ask | None, say: Say) -> None:
    """A later check refused what ``q`` set: ask it again, or fail naming its flag."""
    if ask is None or given.get(q.name) is not None:
        raise SetupError(f"{q.flag} {texts[q.name]!r}: {reason}")
    say(f"  {reason}")
    answers[q.name], texts[q.name] = _ask_until_valid(q, answers, ask, say)
    for later in QUESTIONS[QUESTIONS.index(q) + 1:]:  # answers that read this one are parsed again
        try:
            answers[later.name] = later.parse(texts[later.name], answers)
        except AnswerError as err:
            _redo(later, str(err), given, answers, texts, ask, say)
            return


# ----------------------------------------------------------------------------- the goal as a run config


def split_steps(total: int, recipe: list[int]) -> list[int]:
    """``total`` steps over the stages in the recipe's proportions (largest remainder, so they add up
    exactly), each stage at least one."""
    if total < len(recipe):
        raise AnswerError(f"{total} steps cannot give each of the {len(recipe)} stages one")
    ideal = [total * w / sum(recipe) for w in recipe]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < total:  # the largest shortfall first
        counts[max(range(len(counts)), key=lambda i: ideal[i] - counts[i])] += 1
    while sum(counts) > total:  # only when a tiny stage was raised to one: take it from the largest
        counts[max(range(len(counts)), key=lambda i: counts[i])] -= 1
    return counts


def _stage(raw: dict, answers: Answers) -> dict:
    """A recipe stage for the chosen media: kinds and mix of media left out dropped (all of them with
    the synthetic text source), and freezes of parts that are not built."""
    stage = dict(raw)
    if answers["data"] == "synthetic":
        stage.pop("mix", None)
        stage.pop("kinds", None)
    else:
        if stage.get("mix"):
            stage["mix"] = {k: w for k, w in stage["mix"].items() if kind_trained(k, answers)}
        if stage.get("kinds"):
            stage["kinds"] = [k for k in stage["kinds"] if kind_trained(k, answers)]
    absent = {"fusion"} if not answers["understand"] else set()
    for m in MODALITIES:
        if m.name not in answers["understand"]:
            absent |= {m.encoder, m.projector}
        if m.name not in answers["generate"]:
            absent.add(m.generator)
    if stage.get("freeze"):
        stage["freeze"] = [p for p in stage["freeze"] if p.split(".")[0] not in absent]
    return stage


def goal_overrides(answers: Answers) -> list[str]:
    """The base run's overrides plus the answers' (``a.b=c``, values as YAML)."""
    overrides = list(answers["model"].overrides)
    for m in MODALITIES:
        overrides.append(f"model.{m.section}.enabled={json.dumps(m.name in answers['understand'])}")
        if m.generator_section:
            overrides.append(f"model.{m.generator_section}.enabled={json.dumps(m.name in answers['generate'])}")
    stages = [_stage(s, answers) for s in answers["stages"]]
    seq, steps = answers["seq_len"], answers["steps"]
    if stages:
        seq = seq * len(stages) if len(seq) == 1 else seq
        if len(steps) == 1:
            steps = split_steps(steps[0], [s.get("steps", 100) for s in stages])
        for stage, length, count in zip(stages, seq, steps, strict=True):
            stage["seq_len"], stage["steps"] = length, count
    overrides += [f"train.seq_len={seq[0]}", f"train.steps={sum(steps)}", f"stages={json.dumps(stages)}",
                  f"train.name={json.dumps(answers['name'])}"]
    if answers["data"] == "synthetic":
        overrides += ["data.source=synthetic_text", "data.path=null"]
    else:
        overrides += ["data.source=arrow", f"data.path={json.dumps(answers['data'])}"]
    return overrides


def goal_config(answers: Answers) -> XoronConfig:
    """The run config of the answers, checked as ``xoron train`` checks it (config tree + stages)."""
    from xoron_dist.train.stages import plan_stages

    cfg = load_config(answers["model"].path, goal_overrides(answers))
    plan_stages(cfg)
    return cfg


def _config_with_retries(given, answers, texts, ask, say) -> XoronConfig:
    while True:
        try:
            return goal_config(answers)
        except AnswerError as err:  # split_steps: too few steps for the stages
            _redo(question_for_field("train.steps"), str(err), given, answers, texts, ask, say)
        except ConfigError as err:
            text = str(err)
            dotted = text.split(_FIELD, 1)[1].split("'", 1)[0] if _FIELD in text else ""
            _redo(question_for_field(dotted), text, given, answers, texts, ask, say)


# ----------------------------------------------------------------------------- plan and write


def choose_layout(cfg: XoronConfig, cluster: ClusterSpec, global_batch: int) -> PlanResult:
    """``xoron plan``'s ranking; an error that says what to change when nothing fits."""
    result = plan(cfg, cluster, global_batch=global_batch)
    if result.best is not None:
        return result
    if result.ranked:
        least = min(c.memory.total for c in result.ranked)
        raise SetupError(f"no layout of {cluster.world_size} GPUs fits: the smallest needs {least / GIB:.1f} GiB per "
                         f"GPU, {cluster.usable_bytes / GIB:.1f} GiB usable; add nodes (--nodes), take bigger GPUs, "
                         "or lower --seq-len or --global-batch")
    if result.refused:
        raise SetupError(f"every layout of {cluster.world_size} GPUs was refused, e.g. "
                         f"{result.refused[0].describe()}: {result.refused[0].refusal}")
    raise SetupError(f"--global-batch {global_batch}: no data-parallel size of {cluster.world_size} GPUs divides it; "
                     "give a multiple of the GPU count")


def _reproduce(texts: dict[str, str]) -> str:
    words = ["xoron", "setup", "--no-input"]
    for q in QUESTIONS:
        words += [q.flag, texts[q.name]]
    return shlex.join(words)


def write_run_files(answers: Answers, texts: dict[str, str], cfg: XoronConfig, result: PlanResult,
                    cluster: ClusterSpec) -> tuple[tuple[Path, ...], str]:
    """Check the planned config loads back as the trainer reads it, then write the files; returns
    them and the launch command."""
    from xoron_dist.parallel.layout import validate_layout
    from xoron_dist.plan.writer import planned_config, write_plan
    from xoron_dist.train.stages import plan_stages

    best = result.best
    run = planned_config(cfg, best)
    reread = XoronConfig.from_dict(yaml.safe_load(yaml.safe_dump(run.to_dict(), sort_keys=False)))
    validate_layout(reread, cluster.world_size)
    plan_stages(reread)
    slurm = answers["hosts"] == "slurm"
    launcher_text = (sbatch_text(cluster, answers["name"]) if slurm else hostfile_text(answers["hosts"], cluster))
    out: Path = answers["out"]
    if out.exists():  # --overwrite: replace our files, leave anything else there alone
        for name in WRITTEN:
            (out / name).unlink(missing_ok=True)
    yaml_path, ds_path = write_plan(cfg, best, cluster, out)
    yaml_path.write_text(f"# Written by `xoron setup`; to regenerate (add --overwrite):\n#   {_reproduce(texts)}\n"
                         + yaml_path.read_text())
    launcher = out / ("train.sbatch" if slurm else "hostfile")
    launcher.write_text(launcher_text)
    if slurm:
        launcher.chmod(0o755)
    return (yaml_path, ds_path, launcher), launch_command(out, yaml_path, launcher)


def collect_answers(given: dict[str, str | None], *, overwrite: bool = False, ask: Ask | None = None,
                    say: Say = print) -> tuple[Answers, dict[str, str], XoronConfig]:
    """Every answer (parsed), the text each came from, and the goal's run config (before planning)."""
    unknown = sorted(set(given) - {q.name for q in QUESTIONS})
    if unknown:
        raise SetupError(f"unknown setup answer(s) {', '.join(unknown)}")
    answers: Answers = {"overwrite": overwrite}
    texts: dict[str, str] = {}
    for q in QUESTIONS:
        _answer(q, given, answers, texts, ask, say)
    return answers, texts, _config_with_retries(given, answers, texts, ask, say)


def run_setup(given: dict[str, str | None], *, overwrite: bool = False, ask: Ask | None = None,
              say: Say = print) -> SetupResult:
    """The wizard: ``given`` maps question names to flag values (None: not given); ``ask(prompt) ->
    str`` asks the rest (None: take their defaults). Prints through ``say``."""
    from xoron_dist.plan.cli import format_table

    answers, texts, cfg = collect_answers(given, overwrite=overwrite, ask=ask, say=say)
    cluster = cluster_of(answers)
    result = choose_layout(cfg, cluster, answers["global_batch"])
    files, command = write_run_files(answers, texts, cfg, result, cluster)
    best = result.best
    say(cluster.describe())
    say(f"global batch {result.global_batch} sequences of {result.seq_len} tokens (the longest stage); "
        f"{len(result.ranked)} layouts accepted, {sum(c.fits for c in result.ranked)} fit")
    say(format_table(result, 5))
    say(f"\nchosen: {best.describe()}: {best.memory.total / GIB:.2f} GiB per GPU, "
        f"{best.cost.step_time:.3g} s per step (estimated)")
    say("wrote " + ", ".join(str(p) for p in files))
    say(f"\nlaunch:\n  {command}")
    return SetupResult(answers, cfg, result, best, files, command)


__all__ = ["SetupError", "SetupResult", "choose_layout", "collect_answers", "goal_config", "goal_overrides",
           "run_setup", "split_steps", "write_run_files"]
