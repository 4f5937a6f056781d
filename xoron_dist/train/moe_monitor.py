"""Watches the expert load of every MoE layer: TensorBoard scalars and starved-expert warnings."""

from __future__ import annotations

import logging

import torch

from xoron_dist.train.tensorboard import moe_scalars
from xoron_dist.utils.host_syncs import host_values

logger = logging.getLogger(__name__)


class ExpertLoadMonitor:
    """Fed the (layers, experts) token counts of each optimizer step (summed over all ranks).

    An expert that receives no token for ``warn_after`` consecutive steps is *starved*: the
    bias balancing should pull tokens to it within a few hundred steps at the usual rate;
    if it does not, the router has collapsed or the rate is too small. Warned once per
    starvation spell, so a long run's log is not flooded.
    """

    def __init__(self, layer_ids: list[int], num_experts: int, warn_after: int) -> None:
        self.layer_ids = layer_ids  # model layer index of each MoE layer (dense layers have no router)
        self.warn_after = warn_after
        self.idle_steps = torch.zeros(len(layer_ids), num_experts, dtype=torch.long)
        self.warned = torch.zeros(len(layer_ids), num_experts, dtype=torch.bool)
        self._read: tuple[list[list[float]], list[list[float]] | None] = ([], None)  # last load, biases

    def update(self, step: int, load: list[list[float]], biases: list[list[float]] | None = None
               ) -> list[tuple[int, int]]:
        """Record one step's load, (layers, experts) token counts as read on the host (with the step's other
        values: ``train/readout.py``), and on a TensorBoard step the routers' ``biases`` (for ``scalars``);
        return the (layer, expert) pairs that just became starved."""
        self._read = (load, biases)
        with host_values():  # the bookkeeping lives on the host
            idle = torch.tensor(load, dtype=torch.float64).view(self.idle_steps.shape) == 0
            self.idle_steps = torch.where(idle, self.idle_steps + 1, torch.zeros_like(self.idle_steps))
            self.warned &= idle  # a fed expert may be warned about again later
            newly = (self.idle_steps >= self.warn_after) & ~self.warned
            self.warned |= newly
            starved = [(self.layer_ids[row], expert) for row, expert in newly.nonzero().tolist()]
        for layer, expert in starved:
            logger.warning(
                "step %d: MoE layer %d expert %d has received no tokens for %d steps; check "
                "moe/layer%d/* in TensorBoard, and raise model.llm.moe.bias_update_rate if the bias "
                "is not pulling tokens back", step, layer, expert, self.warn_after, layer,
            )
        return starved

    def scalars(self, pipeline_group=None) -> dict[str, float]:
        """TensorBoard scalars of this rank's MoE layers, from the load and biases the last ``update`` took
        (it must have been given the biases); with a ``pipeline_group`` of more than one stage (every stage
        must call) those of every stage's layers, so rank 0 (stage 0) writes the whole model's."""
        load_rows, bias_rows = self._read
        if bias_rows is None:
            raise RuntimeError("ExpertLoadMonitor.scalars: the last update was not given the router biases")
        layers = [(layer, tokens, bias)
                  for layer, tokens, bias in zip(self.layer_ids, load_rows, bias_rows, strict=True)]
        if pipeline_group is not None and torch.distributed.get_world_size(pipeline_group) > 1:
            gathered: list[list] = [None] * torch.distributed.get_world_size(pipeline_group)
            torch.distributed.all_gather_object(gathered, layers, group=pipeline_group)
            layers = sorted(entry for stage in gathered for entry in stage)
        out: dict[str, float] = {}
        for layer, tokens, bias in layers:
            out.update(moe_scalars(layer, tokens, bias))
        return out
