"""``xoron setup``: flags and scripted answers drive the same questions; the files it writes load, validate and
carry the layout ``xoron plan`` picks; bad answers are re-asked (interactive) or fail naming the flag."""

import json
import re
import shlex
import subprocess

import pytest
import yaml
from deepspeed.launcher.runner import _parse_hostfile

from xoron_dist.cli import main
from xoron_dist.config import load_config
from xoron_dist.parallel.layout import validate_layout
from xoron_dist.setup.launch_files import SBATCH_TEMPLATE
from xoron_dist.setup.questions import BY_QUESTION, FULL_PIPELINE, QUESTIONS
from xoron_dist.setup.wizard import SetupError, collect_answers, run_setup, split_steps
from xoron_dist.train.stages import plan_stages

# The tiny model on this kind of machine, text only: a few hundred candidate layouts to plan.
TINY = ["--model", "tiny", "--understand", "text", "--generate", "none", "--stages", "none", "--seq-len", "128",
        "--steps", "20", "--global-batch", "8", "--name", "wiz", "--data", "synthetic"]


# A run YAML with its own two-stage curriculum (the shipped recipe's stages change as it grows).
RECIPE = """
preset: tiny
model:  # the tiny preset's projector and fusion layers are the full model's; these fit its 2 layers
  projector: {num_layers: 1, num_heads: 4, intermediate_size: 128}
  fusion: {layers: [0, 0, 1, 1], num_heads: 4, intermediate_size: 128}
train: {name: recipe, steps: 60, seq_len: 128}
data: {source: arrow, path: data/prepared}
stages:
  - {name: pretrain, steps: 50, mix: {text: 0.6, image_caption: 0.2, audio_transcript: 0.1, text_to_image: 0.05,
                                      text_to_speech: 0.05}}
  - {name: long_context, steps: 10, seq_len: 256, kinds: [text]}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def _setup(argv, capsys):
    code = main(["setup", "--no-input", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _plan_choice(path):
    data = yaml.safe_load(path.read_text())
    return data["parallel"], {k: data["train"][k] for k in ("micro_batch_size", "grad_accum_steps",
                                                            "activation_checkpointing", "ds_config")}


def test_flags_write_three_files_with_the_layout_xoron_plan_picks(tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = _setup(["--cluster", "cpu", "--nodes", "2", "--hosts", "node1,node2", *TINY,
                                 "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ds_config.json", "hostfile", "plan.yaml"]
    cfg = load_config(out / "plan.yaml")  # the project's loader and validation, as `xoron train --config` reads it
    layout = validate_layout(cfg, 4)
    assert (cfg.train.name, cfg.train.seq_len, cfg.train.steps, cfg.data.source) == ("wiz", 128, 20, "synthetic_text")
    assert layout.dp * cfg.train.micro_batch_size * cfg.train.grad_accum_steps == 8
    plan_stages(cfg)
    # DeepSpeed's own hostfile parser reads it: one line per node with its GPUs (2 per node on the cpu preset)
    assert _parse_hostfile((out / "hostfile").read_text().splitlines()) == {"node1": 2, "node2": 2}
    # `xoron plan` on the same cluster and global batch picks the same layout and writes the same DeepSpeed JSON
    assert main(["plan", "--config", str(out / "plan.yaml"), "--cluster", "cpu", "--nodes", "2", "--global-batch",
                 "8", "--out", str(tmp_path / "plan")]) == 0
    capsys.readouterr()
    assert _plan_choice(out / "plan.yaml") == _plan_choice(tmp_path / "plan" / "plan.yaml")
    assert json.loads((out / "ds_config.json").read_text()) == json.loads(
        (tmp_path / "plan" / "ds_config.json").read_text())
    command = printed.strip().splitlines()[-1].strip()
    assert re.fullmatch(rf"cd \S+ && HOSTFILE={out}/hostfile launch_scripts/multi_node_hostfile.sh {out}/plan.yaml",
                        command), command
    # the YAML's second line repeats every answer as a flag: run again, only the existing folder is refused
    rerun = shlex.split((out / "plan.yaml").read_text().splitlines()[1].removeprefix("#   "))
    assert rerun[:3] == ["xoron", "setup", "--no-input"]
    code, _, err = _setup(rerun[3:], capsys)
    assert code == 2 and f"--out '{out}'" in err and "already exists" in err


def test_scripted_answers_bad_ones_reasked_with_the_reason(tmp_path, recipe):
    """The interactive path: every question asked through the input callable; invalid answers (not a number,
    too many hosts, unknown model and stage, lengths that do not match the stages, too few steps for two
    stages: a check on the whole config) are asked again after their reason is printed."""
    out = tmp_path / "run"
    script = {"--cluster": ["cpu"], "--nodes": ["one", "1"], "--hosts": ["a,b", "localhost"],
              "--model": ["huge", str(recipe)], "--understand": ["text,smell", ""], "--generate": ["audio", "none"],
              "--stages": ["warmup", "all"], "--seq-len": ["128,256,512", "128,256"], "--steps": ["1", "30"],
              "--global-batch": ["4"], "--name": ["a/b", "wiz"], "--data": ["synthetic"], "--out": [str(out)]}
    asked, said = [], []

    def ask(prompt):
        flag = re.search(r"\((--[a-z-]+)\): $", prompt).group(1)
        asked.append(flag)
        return script[flag].pop(0) if script.get(flag) else ""

    result = run_setup({}, ask=ask, say=said.append)
    assert not any(script.values()), script  # every scripted answer was used
    # a preset's figures are not asked; the questions come in the order of the table
    assert list(dict.fromkeys(asked)) == [q.flag for q in QUESTIONS if q.name not in
                                          ("gpus_per_node", "gpu_memory_gib", "intra_node_gbps", "inter_node_gbps",
                                           "peak_tflops")]
    for reason in ("'one' is not a whole number", "2 host(s) given for 1 node(s)", "'huge' is neither full, a preset",
                   "unknown medium 'smell'", "speech generation decodes the audio codec", "no stage 'warmup'",
                   "3 sequence lengths given: give one for the whole run, or one per stage (pretrain, long_context)",
                   "1 steps cannot give each of the 2 stages one", "'a/b' is not a run name"):
        assert any(reason in line for line in said), reason
    assert asked.count("--nodes") == asked.count("--steps") == 2 and asked.count("--cluster") == 1
    cfg = load_config(out / "plan.yaml")
    assert [(s.name, s.seq_len, s.steps) for s in cfg.stages] == [("pretrain", 128, 25), ("long_context", 256, 5)]
    assert cfg.train.steps == 30 and not any(s.mix or s.kinds for s in cfg.stages)  # synthetic text: no Arrow kinds
    assert _parse_hostfile((out / "hostfile").read_text().splitlines()) == {"localhost": 2}
    assert result.command.endswith(f"HOSTFILE={out}/hostfile launch_scripts/multi_node_hostfile.sh {out}/plan.yaml")


def test_slurm_writes_the_template_with_the_planned_nodes_and_gpus(tmp_path, capsys):
    out = tmp_path / "slurm"
    code, printed, err = _setup(["--cluster", "custom", "--nodes", "2", "--gpus-per-node", "2", "--gpu-memory-gib",
                                 "16", "--hosts", "slurm", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ds_config.json", "plan.yaml", "train.sbatch"]
    script = (out / "train.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --job-name=wiz"):
        assert line in script.splitlines(), line
    # everything but the resource lines and the note is the shipped template's, unchanged
    changed = re.compile(r"^#SBATCH --(nodes|ntasks-per-node|gpus-per-node|job-name)=|^# Written by `xoron setup`")
    assert [x for x in script.splitlines() if not changed.match(x)] == \
        [x for x in SBATCH_TEMPLATE.read_text().splitlines() if not changed.match(x)]
    assert subprocess.run(["bash", "-n", str(out / "train.sbatch")]).returncode == 0
    assert printed.strip().splitlines()[-1].strip().endswith(f"sbatch {out}/train.sbatch {out}/plan.yaml")
    validate_layout(load_config(out / "plan.yaml"), 4)


def test_bad_flags_and_an_existing_folder_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--cluster", "cpu", "--nodes", "1", "--hosts", "localhost", *TINY]
    for bad, message in ((["--nodes", "0"], "error: --nodes '0': 0 is below 1"),
                         (["--data", __file__], "error: --data '"),
                         (["--understand", "text,image"], "error: --data 'synthetic': the built-in synthetic text "
                                                          "has no image"),
                         (["--seq-len", "0"], "error: --seq-len '0': 0 is below 1")):
        code, _, err = _setup([*base, *bad, "--out", str(out)], capsys)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
        assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _setup([*base, "--out", str(out)], capsys)
    assert code == 2 and "already exists; choose another folder, or pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = _setup([*base, "--out", str(out), "--overwrite"], capsys)  # our files written, others kept
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ds_config.json", "hostfile", "notes.txt", "plan.yaml"]


def test_goal_answers_become_config_sections_and_stage_steps(recipe):
    """Media switch the modality table's sections; stage mixes keep the kinds those media train; a preset
    is offered the shipped recipe's stages, a run YAML with stages its own."""
    answers, _, cfg = collect_answers({"cluster": "cpu", "model": str(recipe), "understand": "image,audio",
                                       "generate": "audio", "stages": "pretrain", "seq_len": "128",
                                       "steps": "10", "data": "data/prepared", "out": "unused"}, say=print)
    model = cfg.model
    assert (model.vision.enabled, model.video.enabled, model.audio.enabled) == (True, False, True)
    assert (model.speech.enabled, model.image_gen.enabled, model.video_gen.enabled) == (True, False, False)
    assert (cfg.data.source, cfg.data.path, cfg.train.steps) == ("arrow", "data/prepared", 10)
    assert cfg.stages[0].mix == {"text": 0.6, "image_caption": 0.2, "audio_transcript": 0.1, "text_to_speech": 0.05}
    # a config error is traced to the question that set the field, and the flag is named
    with pytest.raises(SetupError, match=r"^--understand 'image': config field 'model\.fusion\.layers\[1\]'"):
        collect_answers({"cluster": "cpu", "model": "tiny", "understand": "image", "data": "data/prepared"})
    tiny = BY_QUESTION["model"].parse("tiny", {})
    shipped = [s["name"] for s in yaml.safe_load(FULL_PIPELINE.read_text())["stages"]]
    assert BY_QUESTION["stages"].choices({"model": tiny}) == ("none", "all", *shipped)
    assert BY_QUESTION["stages"].default({"model": tiny}) == "none"
    assert BY_QUESTION["stages"].default({"model": answers["model"]}) == "all"
    assert split_steps(60, [50000, 10000]) == [50, 10] and sum(split_steps(7, [3, 3, 1])) == 7
    assert split_steps(3, [100, 1, 1]) == [1, 1, 1]
    with pytest.raises(ValueError, match="2 steps cannot give each of the 3 stages one"):
        split_steps(2, [1, 1, 1])
