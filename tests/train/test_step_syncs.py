"""What the multimodal model asks the host for during a training step, counted over the real trainer.

The model keeps the host copies of what the host decided (spans, document ids, clip lengths, padding masks,
the CFG drop) through every component, so between a micro-batch's forward and its backward it reads only
what the device alone knows: the speech alignment's check that the log-likelihood is finite, and the audio
codebooks' dead codes at the step's end (bench/host_syncs.py counts the same; DESIGN.md says why a read
matters on a GPU). A component that loses a host copy shows up here as a new site.
"""

from __future__ import annotations

import re

import pytest

# the model's syncs per optimizer step of the smoke run, by file and call: the most allowed
ALLOWED = {"xoron_dist/model/speech/alignment.py __bool__": 1, "xoron_dist/model/common/quantize.py nonzero": 2}


@pytest.mark.multirank
def test_the_multimodal_smoke_step_reads_only_what_the_device_alone_knows():
    from bench.host_syncs import MULTIMODAL, trainer_case

    case = trainer_case(1, MULTIMODAL, recipe=False)
    model = {}
    for site, per_step in case["by_site"].items():
        if site.startswith("xoron_dist/") and not site.startswith(("xoron_dist/train/", "xoron_dist/data/")):
            key = re.sub(r":\d+ ", " ", site)  # without the line number
            model[key] = model.get(key, 0) + per_step
    assert model and all(per_step <= ALLOWED.get(key, 0) for key, per_step in model.items()), model
