"""A pipeline stage is the single-rank LLM with the other stages' modules removed.

``split_for_pipeline(model, stage, num_stages, costs)`` partitions the decoder layers
(``partition.py``: contiguous runs, balanced by parameter count or measured cost) and prunes
``model`` in place to stage ``stage``'s part: its layers (still keyed by their global index, so
parameter names and checkpoints are the whole model's), the embedding on the first stage, the
final norm and LM head on the last. ``XoronLLM.forward`` runs whatever is present.

The multimodal model (``XoronMultimodalModel``) is split the same way around its LLM: the encoders and
projectors stay on the first stage (their parameters count towards ``StageCosts.first``), each fusion
layer on the stage that holds the decoder layer it runs before (its parameters count with that layer),
the generators on the last stage, beside the LM head that their requests' states come from (the
speech head, which also trains through the audio encoder of stage 0, is refused with pp > 1 by the
layout rules). The fusion layers' media tokens travel from stage to stage beside the hidden states
(``schedule.py``).

Tied word embeddings: the whole model holds one parameter under both ``embed_tokens.weight`` and
``lm_head.weight``; pruning keeps it under the embedding on the first stage and under the head on
the last, so the two stages' copies start from the same values (every rank builds the model from the
same seed). ``tied.py`` keeps them equal while training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from xoron_dist.model.common.moe import ExpertBiasRouter
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel.pipeline.partition import PipelinePartition, StageCosts, partition_layers


@dataclass(frozen=True)
class StageInfo:
    """Where this rank's stage sits in the pipeline, and the width of what crosses its boundaries."""

    stage: int
    num_stages: int
    partition: PipelinePartition
    hidden_size: int

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def _llm_of(model: nn.Module) -> XoronLLM:
    """The LLM that ``model`` (the text LLM, or the multimodal model around one) splits into stages."""
    from xoron_dist.model.xoron import XoronMultimodalModel

    if isinstance(model, XoronMultimodalModel):
        return model.llm
    if isinstance(model, XoronLLM):
        return model
    raise TypeError(f"pipeline parallelism splits XoronLLM or XoronMultimodalModel; got {type(model).__name__}")


def _count(module: nn.Module | None) -> float:
    return 0.0 if module is None else float(sum(p.numel() for p in module.parameters()))


def parameter_costs(model: nn.Module) -> StageCosts:
    """Parameter counts: what balances memory (weights, gradients, optimizer states) per stage. For the
    multimodal model, the encoders and projectors count on the first stage, the generators on the last,
    each fusion layer with the decoder layer it runs before."""
    llm = _llm_of(model)
    layers = [_count(layer) for layer in llm.layers.values()]
    first, last = _count(llm.embed_tokens), _count(llm.norm) + _count(llm.lm_head)
    if llm is not model:
        stage0 = [getattr(model, name) for row in model.media for name in (row.encoder, row.projector)]
        shared = {id(p): p.numel() for module in stage0 if module is not None for p in module.parameters()}
        first += float(sum(shared.values()))  # each weight once (video frames may share the vision tower)
        last += sum(_count(getattr(model, row.generator)) for row in model.generators)
        if model.fusion is not None:
            for position, layer in zip(model.fusion.positions, model.fusion.layers, strict=True):
                if position is not None:  # None: pruned to another stage
                    layers[position] += _count(layer)
    return StageCosts(tuple(layers), first, last)


def measured_costs(model: XoronLLM, micro_batch_size: int, seq_len: int, repeats: int = 3) -> StageCosts:
    """Forward + backward seconds of each layer (and of the LM head with its loss) on random data,
    the median of ``repeats`` runs after a warm-up: what balances step time when layers differ
    (dense vs. MoE layers, the vocabulary-sized head). Runs on the model's device; call it on the
    whole single-rank model, before ``split_for_pipeline`` prunes it. The text LLM only: the multimodal
    model's stages are balanced by ``parameter_costs``."""
    if not isinstance(model, XoronLLM):
        raise TypeError(f"measured_costs times the text LLM's layers; got {type(model).__name__}: balance the "
                        "multimodal model's pipeline stages by parameter_costs")
    device = model.embed_tokens.weight.device
    hidden = torch.randn(micro_batch_size, seq_len, model.cfg.hidden_size, device=device)
    positions = torch.arange(seq_len, device=device).expand(micro_batch_size, -1)
    cos, sin = model.rope(positions)
    rope = (cos.to(hidden.dtype), sin.to(hidden.dtype))
    labels = torch.randint(0, model.cfg.usable_vocab_size, (micro_batch_size, seq_len), device=device)

    def timed(run) -> float:
        samples = []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt:  # the first run pays for allocation and kernel selection
                samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    def layer_run(layer):
        return lambda: layer(hidden.detach().requires_grad_(), rope, positions).sum().backward()

    def head_run():
        x = hidden.detach().requires_grad_()
        head = model.lm_head
        head.token_losses(head(model.norm(x)), labels).sum().backward()

    was_training = model.training
    model.train()
    layer_costs = tuple(timed(layer_run(layer)) for layer in model.layers.values())
    head = timed(head_run)
    model.zero_grad(set_to_none=True)
    for router in model.modules():
        if isinstance(router, ExpertBiasRouter):
            router.load.zero_()  # the routers counted the random tokens
    model.train(was_training)
    return StageCosts(layer_costs, 0.0, head)


def prune_to_stage(model: nn.Module, partition: PipelinePartition, stage: int) -> None:
    """Remove from ``model`` (the LLM or the multimodal model) every module stage ``stage`` of
    ``partition`` does not hold."""
    keep = set(partition.layers_of(stage))
    llm = _llm_of(model)
    if llm is not model:
        if stage != 0:
            for row in model.media:
                setattr(model, row.encoder, None)
                setattr(model, row.projector, None)
        if stage != partition.stages - 1:
            for row in model.generators:
                setattr(model, row.generator, None)
        if model.fusion is not None:
            model.fusion.keep_only(keep)
        model = llm
    for key in [k for k in model.layers if int(k) not in keep]:
        del model.layers[key]
    if stage != 0:
        model.embed_tokens = None
    if stage != partition.stages - 1:
        model.norm = None
        model.lm_head = None


def split_for_pipeline(model: nn.Module, stage: int, num_stages: int, costs: StageCosts) -> StageInfo:
    """Partition ``model``'s layers over ``num_stages`` by ``costs`` and prune it to ``stage``'s part."""
    partition = partition_layers(costs, num_stages)
    prune_to_stage(model, partition, stage)
    return StageInfo(stage, num_stages, partition, _llm_of(model).cfg.hidden_size)


__all__ = ["StageInfo", "measured_costs", "parameter_costs", "prune_to_stage", "split_for_pipeline"]
