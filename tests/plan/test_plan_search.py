"""Ranking, refusals, cluster specs, the written plan, and the ``xoron plan`` verb."""

import json

import pytest
import torch
import yaml

from xoron_dist.cli import main
from xoron_dist.config import ConfigError, load_config
from xoron_dist.parallel.layout import validate_layout
from xoron_dist.plan.cluster import PRESETS, load_cluster
from xoron_dist.plan.search import plan
from xoron_dist.plan.writer import write_plan
from xoron_dist.train.ds_config import build_ds_config

TINY = ["preset=tiny", "train.seq_len=128"]


def test_cluster_presets_files_and_errors(tmp_path):
    h100 = load_cluster("h100x8", nodes=4)
    assert h100.world_size == 32 and h100.gpu_memory_gib == PRESETS["h100x8"].gpu_memory_gib
    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump({"preset": "a100-40gx8", "nodes": 2, "mfu": 0.3}))
    mine = load_cluster(spec)
    assert (mine.world_size, mine.gpu_memory_gib, mine.mfu) == (16, 40, 0.3)
    with pytest.raises(ConfigError, match="cluster.mfu"):
        load_cluster("h100x8", mfu=1.5)
    spec.write_text(yaml.safe_dump({"nodes": 2, "gpus": 8}))
    with pytest.raises(ConfigError, match="unknown field.*gpus"):
        load_cluster(spec)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_cluster("no-such-cluster")
    # a cluster file is read like a run config: every bad file is one line naming it and the fix
    spec.write_bytes("preset: h100x8\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cluster file '.*mine.yaml' is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_cluster(spec)
    spec.write_text("# to do\n")
    with pytest.raises(ConfigError, match="is empty .* e.g. 'preset: h100x8' and 'nodes: 4'"):
        load_cluster(spec)
    with pytest.raises(ConfigError, match="cluster file '.*' is a folder"):
        load_cluster(tmp_path)
    with pytest.raises(ConfigError, match="cluster file 'missing.yaml' does not exist"):
        load_cluster("missing.yaml")
    # Bandwidth: a group inside one node runs on NVLink, one spanning nodes on the network.
    assert h100.bandwidth(8, 1) == h100.intra_node_gbps * 1e9
    assert h100.bandwidth(4, 8) == h100.inter_node_gbps * 1e9


def test_only_validated_layouts_are_proposed_and_refusals_say_why():
    cfg = load_config(None, TINY)
    result = plan(cfg, load_cluster("h100x8"), global_batch=64)
    assert result.ranked and result.refused
    for cand in result.ranked:
        assert validate_layout(cand.apply(cfg), 8) == cand.layout
        assert cand.micro_batch_size * cand.grad_accum_steps * cand.layout.dp == 64
    reasons = {c.tp: c.refusal for c in result.refused if c.tp == 8}
    assert "num_heads = 4 is not divisible by parallel.tp = 8" in reasons[8]
    assert all(c.refusal for c in result.refused)


def test_more_data_parallelism_wins_when_memory_allows():
    cfg = load_config(None, TINY)
    result = plan(cfg, load_cluster("h100x8"), global_batch=256)
    best = result.best
    assert best.fits and best.layout.dp == 8 and best.tp == best.pp == 1
    tp2 = min((c for c in result.ranked if c.tp == 2), key=lambda c: c.cost.step_time)
    assert tp2.cost.tp > 0 and tp2.cost.step_time > best.cost.step_time


def test_layouts_that_do_not_fit_are_refused_and_another_is_chosen():
    cfg = load_config(None, TINY)
    roomy = plan(cfg, load_cluster("h100x8"), global_batch=8)
    pure_dp = min(c.memory.total for c in roomy.ranked if c.layout.dp == 8)
    # GPUs just too small for any pure data-parallel layout (reserve nothing, size in GiB).
    tight = load_cluster("h100x8", gpu_memory_gib=(pure_dp - 1) / 2**30, reserved_gib=0)
    result = plan(cfg, tight, global_batch=8)
    assert result.best is not None and result.best.layout.dp < 8
    assert all(c.memory.total <= tight.usable_bytes for c in result.ranked if c.fits)
    assert all(not c.fits for c in result.ranked if c.memory.total > tight.usable_bytes)
    first_misfit = next(i for i, c in enumerate(result.ranked) if not c.fits)
    assert all(not c.fits for c in result.ranked[first_misfit:])  # fitting layouts rank first


def test_written_plan_loads_validates_and_its_ds_json_is_build_ds_config(tmp_path):
    cfg = load_config(None, TINY + ["parallel.zero_stage=1"])
    cluster = load_cluster("cpu", gpus_per_node=4)
    result = plan(cfg, cluster, global_batch=16)
    best = result.best
    yaml_path, ds_path = write_plan(cfg, best, cluster, tmp_path)
    written = load_config(yaml_path)
    layout = validate_layout(written, cluster.world_size)
    assert layout == best.layout
    assert (written.train.micro_batch_size, written.train.grad_accum_steps,
            written.train.activation_checkpointing) == (best.micro_batch_size, best.grad_accum_steps,
                                                        best.activation_checkpointing)
    assert written.model == cfg.model and written.data == cfg.data  # the rest of the run is the input's
    expected = build_ds_config(written, layout.dp, torch.float32, "cpu")
    assert json.loads(ds_path.read_text()) == expected
    assert expected["zero_optimization"]["stage"] == best.zero_stage


def test_plan_verb_prints_the_table_and_writes_the_files(tmp_path, capsys):
    code = main(["plan", "--cluster", "h100x8", "--nodes", "2", "--global-batch", "32", "--out", str(tmp_path),
                 "--top", "3", "--verbose", *TINY])
    out = capsys.readouterr().out
    assert code == 0
    assert "total GiB" in out and "tokens/s" in out and "refused layouts" in out
    assert (tmp_path / "plan.yaml").is_file() and (tmp_path / "ds_config.json").is_file()
    assert validate_layout(load_config(tmp_path / "plan.yaml"), 16).world == 16


def test_plan_verb_fails_clearly_when_nothing_fits(tmp_path, capsys):
    code = main(["plan", "--cluster", "h100x8", "--gpu-memory-gib", "4.001", "--out", str(tmp_path),
                 "train.seq_len=4096"])
    assert code == 1
    assert "no accepted layout fits" in capsys.readouterr().err
