"""Objectives and token-group loss weights, as data (``xoron_dist.train.objectives``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.train.objectives import TokenGroups, active_objectives

VOCAB = {"<|think|>": 10, "<|/think|>": 11, "<|tool|>": 12, "<|/tool|>": 13}


def _groups(*groups):
    cfg = load_config(None, ["preset=tiny", f"train.token_groups={list(groups)}"])
    return TokenGroups(cfg, VOCAB.get)


def test_a_block_weighs_from_its_open_to_its_close_token():
    groups = _groups({"name": "reasoning", "open": ["<|think|>"], "close": ["<|/think|>"], "weight": 1.5})
    labels = torch.tensor([[5, 10, 6, 7, 11, 8, -100, 10, 9]])
    assert groups.weights(labels).tolist() == [[1, 1.5, 1.5, 1.5, 1.5, 1, 1, 1.5, 1.5]]


def test_nested_groups_take_the_largest_weight_and_documents_close_blocks():
    groups = _groups({"name": "reasoning", "open": ["<|think|>"], "close": ["<|/think|>"], "weight": 1.3},
                     {"name": "tool", "open": ["<|tool|>"], "close": ["<|/tool|>"], "weight": 1.5})
    labels = torch.tensor([[10, 5, 12, 6, 13, 7, 11, 10, 5, 5]])
    documents = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1]])  # the second <|think|> is left open in doc 0
    expected = torch.tensor([[1.3, 1.3, 1.5, 1.5, 1.5, 1.3, 1.3, 1.3, 1, 1]])
    torch.testing.assert_close(groups.weights(labels, documents), expected)
    assert _groups().weights(labels) is None  # no groups: the plain mean


def test_weighted_lm_loss_is_the_weighted_sum_over_the_labelled_count():
    cfg = load_config(None, ["preset=tiny"]).llm
    torch.manual_seed(0)
    model = XoronLLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = ids.roll(-1, 1)
    labels[0, :3] = -100
    weights = torch.rand(2, 12) + 0.5
    out = model(ids, labels=labels, loss_weights=weights)
    ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    expected = (ce * weights.flatten()).sum() / (labels != -100).sum()
    torch.testing.assert_close(out.loss, expected)
    model.lm_head.chunk_tokens = 5  # the chunked head weighs the same
    torch.testing.assert_close(model(ids, labels=labels, loss_weights=weights).loss, expected)


def test_objective_weights_are_checked_against_the_run():
    cfg = load_config(None, ["preset=tiny", "train.objectives={lm: 0.5}"])
    [(lm, weight)] = active_objectives(cfg)
    assert lm.name == "lm" and weight == 0.5
    with pytest.raises(ConfigError, match="image_gen.*its objectives are: lm"):
        active_objectives(load_config(None, ["preset=tiny", "train.objectives={image_gen: 0.1}"]))
    vision = ["data.source=arrow", "model.vision.enabled=true", "model.vision.compressor_tokens=4"]
    assert [o.name for o, _ in active_objectives(load_config("pipelines/smoke.yaml", vision))][0] == "lm"
    rebuilt = load_config("pipelines/smoke.yaml", [*vision, "model.vision.reconstruction_weight=0.5"])
    assert [(o.name, w) for o, w in active_objectives(rebuilt)][-1] == ("reconstruction", 0.5)


def test_a_group_token_the_tokenizer_lacks_is_named():
    with pytest.raises(ConfigError, match=r"token_groups\[0\]\.open: '<\|plan\|>' is not one token"):
        _groups({"name": "planning", "open": ["<|plan|>"], "close": ["<|/think|>"]})
    with pytest.raises(ConfigError, match="needs open and close tokens"):
        _groups({"name": "empty", "open": [], "close": ["<|/think|>"]})


def test_a_stage_weighs_its_objectives_over_the_runs():
    """``stages[i].objectives`` (curriculum_smoke's codec stage: lm 0, codec 1) reaches the stage's step
    (``stage_config``, what ``StepRunner`` reads); other stages keep the run's weights; a name the run does not
    optimise is refused when the stages are planned, naming the stage, and a negative weight at load."""
    import dataclasses

    from xoron_dist.train.stages import plan_stages
    from xoron_dist.train.trainer import stage_config

    cfg = load_config("pipelines/curriculum_smoke.yaml", ["train.objectives={tts: 0.3}"])
    codec, align = plan_stages(cfg)[:2]
    weights = dict((o.name, w) for o, w in active_objectives(stage_config(cfg, codec)))
    assert (weights["lm"], weights["codec"], weights["tts"], weights["image_vae"]) == (0.0, 1.0, 0.3, 0.1)
    weights = dict((o.name, w) for o, w in active_objectives(stage_config(cfg, align)))
    assert (weights["lm"], weights["codec"], weights["tts"]) == (1.0, 0.002, 0.3)
    stages = [dataclasses.replace(cfg.stages[0], objectives={"reconstruction": 1.0}), *cfg.stages[1:]]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.objectives names reconstruction, which this run does not"):
        plan_stages(dataclasses.replace(cfg, stages=stages))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.objectives\.codec.*must be >= 0"):
        load_config("pipelines/curriculum_smoke.yaml", ["stages=[{name: codec, steps: 48, objectives: {codec: -1}}]"])


@pytest.mark.parametrize("chunk_tokens", [0, 5])
def test_the_loss_and_the_objective_counts_read_nothing_on_the_host(chunk_tokens):
    """Between a micro-batch's forward and its backward nothing waits for the device: the labelled count
    stays a tensor (the step reads its sums and counts once, at its end: bench/host_syncs.py)."""
    from xoron_dist.utils.host_syncs import HostSyncCounter

    cfg = load_config(None, ["preset=tiny"])
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    model.lm_head.chunk_tokens = chunk_tokens
    ids = torch.randint(0, cfg.llm.vocab_size, (2, 12))
    labels = ids.roll(-1, 1)
    labels[0, :3] = -100
    (lm, _), = active_objectives(cfg)
    with HostSyncCounter() as syncs:
        out = model(ids, labels=labels)
        lm.loss_sum(out).backward()
        count = lm.count({"labels": labels})
    assert syncs.total == 0, syncs.calls
    assert int(out.num_tokens) == int(count) == 21
