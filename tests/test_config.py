"""The config tree: full-size defaults, presets, YAML + overrides, and errors that name the field."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xoron_dist.config import ConfigError, XoronConfig, available_presets, load_config


def test_default_is_the_full_size_model_of_the_seed():
    llm = XoronConfig().model.llm
    assert (llm.num_layers, llm.hidden_size, llm.num_heads) == (12, 1024, 16)
    assert (llm.moe.num_experts, llm.moe.num_shared_experts, llm.moe.top_k) == (8, 1, 2)
    assert llm.max_position_embeddings == 131_072 and llm.vocab_size == 151_643
    assert llm.rope.type == "yarn" and llm.rope.original_max_positions * llm.rope.factor == 131_072
    assert llm.padded_vocab_size == 151_936  # Qwen2.5's embedding rows
    assert XoronConfig().model.vision.image_size == 384


def test_default_llm_follows_the_seeds_llm_page():
    """docs/models/llm.md: MoE on every second layer (1, 3, ..., 11), FFN width 2048, kv_lora_rank 512,
    no q low-rank, tied LM head, RoPE base 500,000 with YaRN from 8,192 to 131,072 positions."""
    llm = XoronConfig().model.llm
    assert llm.moe_layers == [1, 3, 5, 7, 9, 11] and llm.moe_layer_freq == 2 and llm.dense_layers == 0
    assert llm.moe.expert_intermediate_size == llm.dense_intermediate_size == 2048
    assert llm.kv_lora_rank == 512 and llm.q_lora_rank is None and llm.tie_word_embeddings
    assert llm.rope.theta == 500_000 and llm.rope.original_max_positions == 8192 and llm.rope.factor == 16
    assert llm.moe.router_score == "sigmoid" and not llm.moe.router_norm  # DeepSeek-V3's rule stays the default


def test_moe_layer_freq_composes_with_dense_layers():
    llm = load_config(None, ["model.llm.dense_layers=3", "model.llm.moe_layer_freq=2"]).llm
    assert llm.moe_layers == [3, 5, 7, 9, 11]
    assert load_config(None, ["model.llm.moe_layer_freq=1", "model.llm.dense_layers=2"]).llm.moe_layers == list(
        range(2, 12))


def test_tiny_preset_and_yaml_round_trip(tmp_path):
    assert "tiny" in available_presets()
    tiny = XoronConfig.preset("tiny")
    assert tiny.llm.hidden_size < 256 and tiny.llm.moe.num_experts == 8
    path = tmp_path / "run.yaml"
    path.write_text(tiny.to_yaml())
    assert load_config(path) == tiny


def test_overrides_beat_file_and_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  lr: 0.01\n  steps: 7\n")
    cfg = load_config(path, ["train.lr=2e-4", "model.llm.rope.type=default", "stages=[{name: a, steps: 3}]"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 7
    assert cfg.llm.rope.type == "default" and cfg.llm.hidden_size == XoronConfig.preset("tiny").llm.hidden_size
    assert cfg.stages[0].name == "a" and cfg.stages[0].steps == 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.llm.hiden_size=8", "unknown config key 'model.llm.hiden_size'; did you mean 'hidden_size'?"),
        ("train.lr=fast", "'train.lr' = 'fast' is invalid: expected a number"),
        ("train.steps=1.5", "'train.steps' = 1.5 is invalid: expected an integer"),
        ("train.tensorboard=3", "'train.tensorboard' = 3 is invalid: expected true or false"),
        ("train.precision=fp8", "allowed values are 'auto', 'fp32', 'bf16', 'fp16'"),
        ("parallel.zero_stage=4", "'parallel.zero_stage' = 4 is invalid: allowed values are 0, 1, 2, 3"),
        ("model.llm.num_heads=0", "'model.llm.num_heads' = 0 is invalid: must be > 0"),
        ("model.llm.moe.top_k=9", "'model.llm.moe.top_k' = 9 is invalid: must be <= num_experts (8)"),
        ("model.llm.qk_rope_head_dim=7", "must be even"),
        ("model.llm.rope.type=longrope", "needs both long_factor and short_factor"),
        ("model.llm.rope.long_factor=[1.0]", "'model.llm.rope.long_factor' = '<1 values>' is invalid"),
        ("parallel.sequence_parallel=true", "needs tp > 1"),
        ("stages=[{name: a, mix: {text: -1}}]", "'stages[0].mix.text' = -1.0 is invalid"),
        ("train.lr", "must look like key.sub=value"),
        ("train..lr=1", "empty key part"),
        ("preset=huge", "unknown preset 'huge'"),
        ("train.steps.x=1", "'steps' is a value, not a section"),
        ("model.speech.vocoder.f0_max=50", "'model.speech.vocoder.f0_max' = 50.0 is invalid: a pitch range above "
                                           "f0_min=60.0 Hz"),
        ("model.speech.vocoder.source_harmonics=-1", "'model.speech.vocoder.source_harmonics' = -1 is invalid"),
        ("model.speech.vocoder.envelope_harmonics=-1", "'model.speech.vocoder.envelope_harmonics' = -1 is invalid"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["preset=tiny", override])
    assert message in str(err.value)


def test_harmonic_branch_without_the_pitch_source_names_the_fix():
    with pytest.raises(ConfigError, match="envelope_harmonics' = 8 is invalid: 0, or the pitch source on"):
        load_config(None, ["preset=tiny", "model.speech.vocoder.source_harmonics=0",
                           "model.speech.vocoder.envelope_harmonics=8"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_direct_construction_is_validated():
    from xoron_dist.config import LLMConfig, ModelConfig

    with pytest.raises(ConfigError, match="'model.llm.dense_layers' = 20"):
        XoronConfig(model=ModelConfig(llm=LLMConfig(dense_layers=20)))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    cfg = load_config(path)
    assert cfg.train.name
    if cfg.stages:
        assert sum(stage.steps for stage in cfg.stages) == cfg.train.steps


BAD_FILES = [
    ("latin1.yaml", "preset: tiny\ntrain:\n  name: caf\xe9\n".encode("latin-1"),
     "config file '{path}' is not UTF-8 text (byte 0xe9 on line 3); re-save it as UTF-8 (an editor's encoding "
     "setting, or: iconv -f latin1 -t utf-8)"),
    ("utf16.yaml", "preset: tiny\n".encode("utf-16"),
     "config file '{path}' is not UTF-8 text (byte 0xff on line 1); re-save it as UTF-8 (an editor's encoding "
     "setting, or: iconv -f latin1 -t utf-8)"),
    ("empty.yaml", b"", "config file '{path}' is empty (no settings in it); write the run's settings, "
                        "e.g. 'preset: tiny'"),
    ("comments.yaml", b"# nothing here yet\n", "config file '{path}' is empty (no settings in it); write the run's "
                                               "settings, e.g. 'preset: tiny'"),
    ("nul.yaml", b"preset: tiny\x00\n", "config file '{path}' is not valid YAML: unacceptable character #x0000: "
                                        "special characters are not allowed at position 12; fix it there"),
    ("flow.yaml", b"train: [1, 2\n", "config file '{path}' is not valid YAML: line 2, column 1: while parsing a "
                                     "flow sequence: expected ',' or ']', but got '<stream end>'; fix it there"),
    ("list.yaml", b"- 1\n- 2\n", "config file '{path}': the top level must be a mapping (train: ..., model: ...), "
                                 "got list"),
]


@pytest.mark.parametrize(("name", "data", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_config_files_are_one_line_errors_naming_the_file_and_the_fix(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == message.format(path=path)


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("preset: tiny\ntrain:\n  name: café\n".encode("utf-8-sig"))
    assert load_config(path).train.name == "café"


def test_a_folder_or_an_unreadable_file_where_a_config_file_belongs(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("preset: tiny\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"config file '{tmp_path}' is a folder; give the YAML file itself (it holds run.yaml)"

    def denied(self):  # what reading a mode-000 file does (chmod cannot stop root, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.yaml")
    assert str(err.value) == (f"config file '{tmp_path / 'run.yaml'}' cannot be read (Permission denied); "
                              "check its permissions")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_xoron_train_with_a_latin1_config_prints_one_line(tmp_path, nproc):
    (tmp_path / "latin1.yaml").write_bytes("preset: tiny\ntrain:\n  name: caf\xe9\n".encode("latin-1"))
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "deepspeed").write_text("#!/bin/sh\ntouch launched\n")  # must not be reached
    (tmp_path / "deepspeed").chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "xoron_dist.cli", "train", "--config", "latin1.yaml",
                             "--nproc", nproc], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("config file 'latin1.yaml' is not UTF-8 text (byte 0xe9 on line 3); re-save it as "
                             "UTF-8 (an editor's encoding setting, or: iconv -f latin1 -t utf-8)")
    assert not (tmp_path / "launched").exists()


@pytest.mark.parametrize(("field", "shown"), [("max_image_pixels", "0"), ("max_video_seconds", "0.0")])
def test_prep_budgets_are_validated(field, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["preset=tiny", f"data.prep.{field}=0"])
    assert str(err.value) == f"config field 'data.prep.{field}' = {shown} is invalid: must be > 0"


def test_loss_chunk_tokens_by_device_unless_set(tmp_path):
    """train.loss_chunk_tokens unset: 256 on CPU, 2048 on a GPU (TrainConfig.loss_chunk_for says why); a set
    value, 0 (one piece) included, wins everywhere and survives the YAML round trip; negative is refused."""
    train = load_config(None, []).train
    assert train.loss_chunk_tokens is None
    assert (train.loss_chunk_for("cpu"), train.loss_chunk_for("cuda")) == (256, 2048)
    for value in (0, 100):
        cfg = load_config(None, [f"train.loss_chunk_tokens={value}"])
        assert cfg.train.loss_chunk_for("cpu") == cfg.train.loss_chunk_for("cuda") == value
        path = tmp_path / f"{value}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(path, []).train.loss_chunk_tokens == value
    path = tmp_path / "unset.yaml"
    path.write_text(load_config(None, []).to_yaml())
    assert load_config(path, []).train.loss_chunk_tokens is None
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        load_config(None, ["train.loss_chunk_tokens=-1"])
