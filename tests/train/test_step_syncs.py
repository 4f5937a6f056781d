"""What the multimodal model asks the host for during a training step, counted over the real trainer.

The model keeps the host copies of what the host decided (spans, document ids, clip lengths, padding masks,
the CFG drop) through every component, so between a micro-batch's forward and its backward it reads
nothing (the speech alignment skips its finite check: the numerics guard catches what it would). The trainer
reads the step's values once, at its end (``train/readout.py``), the codebooks' dead codes with them
(bench/host_syncs.py counts the same; DESIGN.md says why a read matters on a GPU). A component that loses a
host copy, or a new read in the trainer, shows up here.
"""

from __future__ import annotations

import re

import pytest


@pytest.mark.multirank
def test_the_multimodal_smoke_step_reads_only_what_the_device_alone_knows():
    from bench.host_syncs import MULTIMODAL, trainer_case

    case = trainer_case(1, MULTIMODAL, recipe=False)
    model = {}
    for site, per_step in case["by_site"].items():
        if site.startswith("xoron_dist/") and not site.startswith(("xoron_dist/train/", "xoron_dist/data/")):
            key = re.sub(r":\d+ ", " ", site)  # without the line number
            model[key] = model.get(key, 0) + per_step
    assert not model, model  # per optimizer step, by file and call
    assert case["by_owner"]["trainer"] == 1, case["by_site"]  # the step's one read, the dead codes in it


@pytest.mark.multirank
def test_the_trainer_reads_the_host_once_per_step():
    """The step's loss sums and counts, the grad norm, the ranks' stop and guard flags and the MoE load it
    logs (with the biases: a log line every step) come in one read (``train/readout.py``); the LLM model
    itself reads nothing (its local MoE layers are dropless and sync-free)."""
    from bench.host_syncs import trainer_case

    overrides = ["data.source=synthetic_text", "train.grad_accum_steps=2", "train.log_every=1",
                 "train.tensorboard=false"]
    case = trainer_case(1, overrides, recipe=False)
    assert case["by_owner"].get("trainer") == 1 and "model" not in case["by_owner"], case["by_site"]
