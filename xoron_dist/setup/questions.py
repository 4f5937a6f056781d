"""The questions of ``xoron setup``, as data: one ``Question`` per answer drives both the prompt and the flag.

Each record names its answer (``nodes``; the flag is ``--nodes``), the prompt, a ``parse(text,
answers) -> value`` that raises ``AnswerError(reason)`` for a bad answer, the default (a function of
the answers before it: the GPUs per node of the chosen preset, the sequence lengths of the chosen
stages), the choices shown, whether an interactive session asks it at all (``asked``: the custom
cluster's figures only for ``--cluster custom``), and the config fields it sets (``fields``, dotted
prefixes; ``stages[2].seq_len`` is matched as ``stages.seq_len``), through which a config
validation error is traced back to the question that caused it. ``xoron_dist.setup.wizard`` walks
the list in order; ``xoron_dist.setup.cli`` turns it into argparse flags.

Nothing here estimates anything: the cluster is a ``ClusterSpec`` of the planner
(``xoron_dist.plan.cluster``), the media are the rows of the modality table
(``xoron_dist.model.modalities``), the sample kinds the data contract's (``xoron_dist.data.schema``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xoron_dist.config import ConfigError, XoronConfig, load_config
from xoron_dist.config.loading import available_presets, read_yaml_mapping
from xoron_dist.model.modalities import BY_NAME, MODALITIES
from xoron_dist.plan.cluster import PRESETS, ClusterSpec, load_cluster

Answers = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[2]  # pipelines/ and launch_scripts/ live here
FULL_PIPELINE = REPO_ROOT / "pipelines" / "xoron_full.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AnswerError(ValueError):
    """A bad answer; the message is the reason, shown before the question is asked again."""


@dataclass(frozen=True)
class Question:
    name: str  # key in the answers; the flag is --name-with-dashes
    prompt: str
    parse: Callable[[str, Answers], Any]
    default: Callable[[Answers], str | None]
    choices: Callable[[Answers], tuple[str, ...]] | None = None
    asked: Callable[[Answers], bool] = lambda answers: True
    fields: tuple[str, ...] = ()
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class BaseRun:
    """The run the goal starts from: the shipped full recipe, a preset, or the user's run YAML."""

    label: str  # "full", a preset name, or the YAML path as given
    path: Path | None
    overrides: tuple[str, ...]
    cfg: XoronConfig
    stages: tuple[dict, ...] = field(default=())  # curriculum stages on offer (raw YAML mappings)
    stage_source: Path = FULL_PIPELINE


# ----------------------------------------------------------------------------- small parsers


def _const(text: str | None) -> Callable[[Answers], str | None]:
    return lambda answers: text


def _int(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise AnswerError(f"'{text}' is not a whole number") from None
    if value < least:
        raise AnswerError(f"{value} is below {least}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnswerError(f"'{text}' is not a number") from None
    if not value > 0:
        raise AnswerError(f"{text} must be > 0")
    return value


def _items(text: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", text.strip()) if part]


def _int_list(text: str, answers: Answers, what: str) -> list[int]:
    """One number for every stage, or one per chosen stage."""
    values = [_int(part) for part in _items(text)]
    stages = [s["name"] for s in answers["stages"]]
    if not values:
        raise AnswerError(f"give the {what}")
    if len(values) != 1 and len(values) != len(stages):
        wanted = f"one per stage ({', '.join(stages)})" if stages else "one number (no curriculum stages chosen)"
        raise AnswerError(f"{len(values)} {what} given: give one for the whole run, or {wanted}")
    return values


# ----------------------------------------------------------------------------- the cluster


def _parse_cluster(text: str, answers: Answers) -> ClusterSpec:
    if text == "custom":
        return ClusterSpec()
    try:
        return load_cluster(text)
    except ConfigError as err:
        raise AnswerError(f"{err} (or 'custom' to give the figures)") from None


def _cluster_number(name: str, parse: Callable[[str], Any]) -> Callable[[str, Answers], Any]:
    def parse_field(text: str, answers: Answers) -> Any:
        value = parse(text)
        try:  # the ClusterSpec's own checks (e.g. memory above the reserved GiB)
            dataclasses.replace(answers["cluster"], **{name: value})
        except ConfigError as err:
            raise AnswerError(str(err)) from None
        return value

    return parse_field


def _cluster_default(name: str) -> Callable[[Answers], str]:
    return lambda answers: f"{getattr(answers['cluster'], name):g}"


def _is_custom(answers: Answers) -> bool:
    return answers["cluster"].name == "custom"


def cluster_of(answers: Answers) -> ClusterSpec:
    """The cluster the answers describe (the chosen one with nodes, GPUs, memory, links replaced)."""
    names = ("nodes", "gpus_per_node", "gpu_memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_tflops")
    return dataclasses.replace(answers["cluster"], **{n: answers[n] for n in names if n in answers})


def _parse_hosts(text: str, answers: Answers) -> str | list[str]:
    if text == "slurm":
        return "slurm"
    hosts = _items(text)
    nodes = answers["nodes"]
    bad = [h for h in hosts if not _NAME.match(h)]
    if bad:
        raise AnswerError(f"'{bad[0]}' is not a host name (letters, digits, '.', '_', '-')")
    if len(set(hosts)) != len(hosts):
        raise AnswerError("a host is listed twice")
    if len(hosts) != nodes:
        raise AnswerError(f"{len(hosts)} host(s) given for {nodes} node(s): list one host per node, or 'slurm'")
    return hosts


# ----------------------------------------------------------------------------- the goal


def _raw_stages(path: Path | None) -> tuple[dict, ...]:
    if path is None:
        return ()
    stages = read_yaml_mapping(path).get("stages") or []
    return tuple(dict(s) for s in stages if isinstance(s, dict))


def _parse_model(text: str, answers: Answers) -> BaseRun:
    if text == "full":
        path, overrides = FULL_PIPELINE, ()
    elif text in available_presets():
        path, overrides = None, (f"preset={text}",)
    elif Path(text).is_file():
        path, overrides = Path(text), ()
    else:
        raise AnswerError(f"'{text}' is neither full, a preset ({', '.join(available_presets())}) nor a run YAML file")
    try:
        cfg = load_config(path, list(overrides))
    except ConfigError as err:
        raise AnswerError(str(err)) from None
    own = _raw_stages(path)
    source = path if own else FULL_PIPELINE
    return BaseRun(text, path, overrides, cfg, own or _raw_stages(FULL_PIPELINE), source)


def _parse_understand(text: str, answers: Answers) -> tuple[str, ...]:
    chosen = set(_items(text)) | {"text"}
    unknown = sorted(chosen - {"text", *BY_NAME})
    if unknown:
        raise AnswerError(f"unknown medium '{unknown[0]}'; choose from text, {', '.join(BY_NAME)}")
    return tuple(m.name for m in MODALITIES if m.name in chosen)


def _default_understand(answers: Answers) -> str:
    return ",".join(["text"] + [m.name for m in MODALITIES if m.understood(answers["model"].cfg)])


def _generators() -> tuple[str, ...]:
    return tuple(m.name for m in MODALITIES if m.generator_section)


def _parse_generate(text: str, answers: Answers) -> tuple[str, ...]:
    chosen = set(_items(text)) - {"none"}
    unknown = sorted(chosen - set(_generators()))
    if unknown:
        raise AnswerError(f"no generator for '{unknown[0]}'; choose none or from {', '.join(_generators())}")
    if "audio" in chosen and "audio" not in answers["understand"]:
        raise AnswerError("speech generation decodes the audio codec's latents: add audio to --understand, "
                          "or leave audio out here")
    return tuple(m for m in _generators() if m in chosen)


def _default_generate(answers: Answers) -> str:
    return ",".join(m.name for m in MODALITIES if m.generated(answers["model"].cfg)) or "none"


def kind_trained(kind: str, answers: Answers) -> bool:
    """Whether the chosen media train ``kind`` (text and chat kinds always; a media kind when its
    encoder, or for a generation kind its generator, is on)."""
    from xoron_dist.data.schema import GENERATION_KINDS, KINDS  # pyarrow: only when a stage is read

    medium = KINDS.get(kind)
    if medium is None:
        return True
    return medium in (answers["generate"] if kind in GENERATION_KINDS else answers["understand"])


def _parse_stages(text: str, answers: Answers) -> tuple[dict, ...]:
    offered = answers["model"].stages
    names = [s["name"] for s in offered]
    if text == "none":
        return ()
    chosen = names if text == "all" else _items(text)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise AnswerError(f"no stage '{unknown[0]}' in {answers['model'].stage_source.name}; "
                          f"choose none, all, or from {', '.join(names)}")
    stages = tuple(s for s in offered if s["name"] in chosen)  # the recipe's order
    for stage in stages:
        kinds = list(stage.get("mix") or {}) + list(stage.get("kinds") or [])
        if kinds and not any(kind_trained(k, answers) for k in kinds):
            raise AnswerError(f"stage '{stage['name']}' trains only {', '.join(kinds)}, which the chosen media "
                              "(--understand, --generate) leave out")
    return stages


def _default_stages(answers: Answers) -> str:
    base = answers["model"]
    return "all" if base.stages and base.stage_source == base.path else "none"


def _default_per_stage(key: str, train_value: Callable[[XoronConfig], int]) -> Callable[[Answers], str]:
    def default(answers: Answers) -> str:
        cfg = answers["model"].cfg
        stages = answers["stages"]
        if not stages:
            return str(train_value(cfg))
        return ",".join(str(s.get(key) or train_value(cfg)) for s in stages)

    return default


def _default_global_batch(answers: Answers) -> str:
    train = answers["model"].cfg.train
    return str(train.micro_batch_size * train.grad_accum_steps * cluster_of(answers).world_size)


def _parse_name(text: str, answers: Answers) -> str:
    if not _NAME.match(text):
        raise AnswerError(f"'{text}' is not a run name (letters, digits, '.', '_', '-'; no '/')")
    return text


def _parse_data(text: str, answers: Answers) -> str:
    if text == "synthetic":
        extra = [m for m in answers["understand"] if m != "text"] + list(answers["generate"])
        if extra:
            raise AnswerError(f"the built-in synthetic text has no {', '.join(extra)}: give the folder of "
                              "Arrow shards `xoron prep` wrote")
        return text
    if Path(text).is_file():
        raise AnswerError(f"'{text}' is a file: give the folder of Arrow shards `xoron prep` wrote (or will write)")
    return text


def _default_data(answers: Answers) -> str:
    data = answers["model"].cfg.data
    return data.path if data.source == "arrow" and data.path else "data/prepared"


def _parse_out(text: str, answers: Answers) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise AnswerError(f"'{text}' is a file; give a folder for the run files")
    if out.exists() and not answers["overwrite"]:
        raise AnswerError(f"'{text}' already exists; choose another folder, or pass --overwrite to replace its files")
    return out


def _custom(name: str, prompt: str, parse: Callable[[str], Any]) -> Question:
    return Question(name, prompt, _cluster_number(name, parse), _cluster_default(name), asked=_is_custom,
                    fields=(f"cluster.{name}",), help=f"{prompt} (default: the cluster preset's)")


QUESTIONS: tuple[Question, ...] = (
    Question("cluster", "Cluster: a preset, 'custom', or a cluster YAML file", _parse_cluster, _const("h100x8"),
             choices=lambda a: (*PRESETS, "custom"), help="a preset of `xoron plan`, custom, or a cluster YAML"),
    Question("nodes", "Nodes", lambda t, a: _int(t), _cluster_default("nodes"), fields=("cluster.nodes",),
             help="number of nodes"),
    _custom("gpus_per_node", "GPUs per node", _int),
    _custom("gpu_memory_gib", "GPU memory (GiB)", _positive),
    _custom("intra_node_gbps", "In-node bandwidth per GPU (GB/s, NVLink)", _positive),
    _custom("inter_node_gbps", "Between-node bandwidth per GPU (GB/s, network)", _positive),
    _custom("peak_tflops", "Peak dense bf16 TFLOPs per GPU", _positive),
    Question("hosts", "Host names, one per node (comma-separated), or 'slurm' for an sbatch script", _parse_hosts,
             lambda a: "localhost" if a["nodes"] == 1 else "slurm",
             help="comma-separated host names for a DeepSpeed hostfile, or slurm"),
    Question("model", "Model: full (pipelines/xoron_full.yaml), a preset, or a run YAML file", _parse_model,
             _const("full"), choices=lambda a: ("full", *available_presets()), fields=("model.llm",),
             help="full, a preset of xoron_dist/presets, or a run YAML to start from"),
    Question("understand", "Media to understand (comma-separated)", _parse_understand, _default_understand,
             choices=lambda a: ("text", *BY_NAME),
             fields=("model.vision", "model.video", "model.audio", "model.projector", "model.fusion"),
             help="comma-separated: text, image, video, audio"),
    Question("generate", "Media to generate (comma-separated, or none)", _parse_generate, _default_generate,
             choices=lambda a: ("none", *_generators()), fields=("model.speech", "model.image_gen", "model.video_gen"),
             help="none, or comma-separated: image, video, audio (speech)"),
    Question("stages", "Curriculum stages: none, all, or stage names (comma-separated)", _parse_stages,
             _default_stages, choices=lambda a: ("none", "all", *(s["name"] for s in a["model"].stages)),
             fields=("stages",), help="none, all, or names of stages of pipelines/xoron_full.yaml"),
    Question("seq_len", "Sequence length: one, or one per stage (comma-separated)",
             lambda t, a: _int_list(t, a, "sequence lengths"), _default_per_stage("seq_len", lambda c: c.train.seq_len),
             fields=("train.seq_len", "stages.seq_len"), help="tokens per row: one, or one per stage"),
    Question("steps", "Optimizer steps: a total (split over the stages as the recipe does), or one per stage",
             lambda t, a: _int_list(t, a, "step counts"), _default_per_stage("steps", lambda c: c.train.steps),
             fields=("train.steps", "stages.steps"), help="total steps, or one per stage"),
    Question("global_batch", "Global batch (sequences per optimizer step)", lambda t, a: _int(t),
             _default_global_batch, fields=("train.micro_batch_size", "train.grad_accum_steps"),
             help="sequences per optimizer step (default: the config's micro-batch x accumulation on every GPU)"),
    Question("name", "Run name", _parse_name, lambda a: a["model"].cfg.train.name, fields=("train.name",),
             help="the run's name (runs/<name>)"),
    Question("data", "Data: the folder of Arrow shards (xoron prep), or 'synthetic' (text only)", _parse_data,
             _default_data, fields=("data",), help="prepared Arrow shards folder, or synthetic"),
    Question("out", "Output folder for the run files", _parse_out, lambda a: f"plans/{a['name']}",
             help="where plan.yaml, ds_config.json and the hostfile or sbatch script go"),
)

BY_QUESTION = {q.name: q for q in QUESTIONS}


def question_for_field(dotted: str) -> Question:
    """The question whose config fields cover ``dotted`` (longest prefix; indices ignored); the model
    question when none does (the base run's own settings)."""
    plain = re.sub(r"\[\d+\]", "", dotted)
    best, length = BY_QUESTION["model"], 0
    for q in QUESTIONS:
        for prefix in q.fields:
            if (plain == prefix or plain.startswith(prefix + ".")) and len(prefix) > length:
                best, length = q, len(prefix)
    return best


__all__ = ["QUESTIONS", "AnswerError", "Answers", "BaseRun", "Question", "cluster_of", "kind_trained",
           "question_for_field"]
