"""The expert-load monitor: it takes each step's load as the trainer read it (with the step's other values,
``train/readout.py``), warns once per starvation spell and gives the TensorBoard scalars from that read."""

from __future__ import annotations

import logging

import pytest
import torch

from xoron_dist.train.moe_monitor import ExpertLoadMonitor
from xoron_dist.utils.host_syncs import HostSyncCounter, read_together


def test_starved_experts_warned_once_and_scalars_from_the_read(caplog):
    monitor = ExpertLoadMonitor([1, 3], num_experts=3, warn_after=2)
    load = [[5.0, 0.0, 7.0], [4.0, 4.0, 4.0]]
    biases = [[0.1, -0.2, 0.0], [0.0, 0.0, 0.5]]
    with HostSyncCounter() as syncs:
        assert monitor.update(1, load, biases) == []
        scalars = monitor.scalars()
    assert syncs.total == 0, syncs.calls
    assert scalars["moe/layer1/expert1/tokens"] == 0.0 and scalars["moe/layer3/expert2/tokens"] == 4.0
    assert scalars["moe/layer1/max_over_mean"] == pytest.approx(7.0 / 4.0)
    assert any(value == pytest.approx(-0.2) for name, value in scalars.items() if name.startswith("moe/layer1/"))
    with caplog.at_level(logging.WARNING):
        assert monitor.update(2, load) == [(1, 1)]  # a second step without tokens
        assert monitor.update(3, load) == []  # warned once per spell
        monitor.update(4, [[1.0] * 3] * 2)  # fed again
        monitor.update(5, load)
        assert monitor.update(6, load) == [(1, 1)]  # a new spell
    assert sum("layer 1 expert 1 has received no tokens" in r.message for r in caplog.records) == 2
    with pytest.raises(RuntimeError, match="not given the router biases"):
        monitor.scalars()


def test_token_counts_above_float32_precision_are_read_exactly():
    monitor = ExpertLoadMonitor([0], num_experts=2, warn_after=5)
    big = 2**24 + 1  # float32 would round it to 2**24
    with HostSyncCounter() as syncs:
        read = read_together({"load": torch.tensor([[big, 3]], dtype=torch.long), "biases": torch.zeros(1, 2),
                              "norm": None, "lr": 0.5})
    assert syncs.calls == {"tolist": 1}, syncs.calls  # one read for all of them
    assert read == {"load": [[float(big), 3.0]], "biases": [[0.0, 0.0]], "norm": None, "lr": 0.5}
    monitor.update(1, read["load"], read["biases"])
    assert monitor.scalars()["moe/layer0/expert0/tokens"] == float(big)


def test_a_stage_without_moe_layers():
    monitor = ExpertLoadMonitor([], num_experts=4, warn_after=2)
    assert monitor.update(1, read_together({"load": torch.zeros(0, 4)})["load"], []) == []
    assert monitor.scalars() == {}
