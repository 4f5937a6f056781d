"""``train.compile``: ``torch.compile`` each decoder block of the model the engine trains.

Per block, not the whole model (torchtitan's choice, and what survives DeepSpeed): the engine keeps
calling its plain module, parameter names and checkpoints do not change (``nn.Module.compile``
compiles a module in place), and one block's graph is compiled once and reused by every layer of the
same shape. DeepSpeed 0.19's ``engine.compile()`` compiles the whole module instead (or, with
``compile.autoep_non_moe``, its own AutoEP layers only), which would trace the embedding, the loss
and every routing decision as one graph.

What stays eager inside a compiled block (``torch.compiler.disable`` on the instance's ``forward``,
the way activation checkpointing wraps it): the expert-parallel experts (they exchange counts over an
all-to-all and size their buffers on the host) and the ring attention core (point-to-point traffic and
a per-layer plan read on the host). The rest of the block compiles: norms, MLA's projections, RoPE and
attention, the router, the shared expert and the local routed experts, whose grouped GEMM is traced as
``xoron::grouped_mm`` (``model.common.grouped_mm``: torch's own fake kernel refuses fp32) and whose
sorted dispatch has static shapes; only their per-expert loop, taken where the grouped GEMM's layout
rules fail, reads sizes on the host and breaks the graph there.

A block under activation checkpointing compiles inside its checkpoint (its wrapped forward is compiled;
the checkpoint stays eager around it): compiled from outside, the checkpoint is one higher-order op that
dynamo must trace whole, and a single graph break in the block (packed documents' attention planning,
the EP experts) left the whole block eager. Inside, a break only splits the block's graph, and the
recompute in backward calls the same compiled code (and replays its host reads: ``host_read``).

Fallbacks are not fatal: a graph break leaves the code after it to the next graph (or eager), and
a frame that fails to compile runs eager (``torch._dynamo.config.suppress_errors``). Both are logged:
the first forward logs the graph breaks by reason, once. On CPU, inductor needs a C++ compiler; without
one the blocks stay eager with a warning.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

from xoron_dist.parallel.checkpointing import is_checkpointed

log = logging.getLogger(__name__)

# torch.compile's backend. The CI test swaps in "aot_eager" (the same dynamo capture and AOT autograd
# graphs, run by eager kernels): inductor's cold C++ builds take longer than its time budget.
BACKEND = "inductor"


class _EagerForward:
    """A module's ``forward`` that compiled callers run eagerly (a graph break around it)."""

    def __init__(self, module: nn.Module) -> None:
        self.inner: Callable = module.forward

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _eager_types() -> tuple[type, ...]:
    from xoron_dist.parallel.experts import ExpertParallelExperts
    from xoron_dist.parallel.sequence import RingAttentionCore

    return (ExpertParallelExperts, RingAttentionCore)


def _block_types() -> tuple[type, ...]:
    from xoron_dist.model.llm import DecoderLayer

    return (DecoderLayer,)


def inductor_compiler(device: torch.device) -> str | None:
    """The C++ compiler inductor would use on CPU (None when there is none); CUDA needs none of ours."""
    if device.type != "cpu":
        return "triton"
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    return next((found for name in names if name and (found := shutil.which(name))), None)


def compile_blocks(model: nn.Module, device: torch.device) -> int:
    """Compile every decoder block of ``model`` in place; returns how many (0: none, or no compiler)."""
    if BACKEND == "inductor" and inductor_compiler(device) is None:
        log.warning("train.compile: inductor finds no C++ compiler (torch._inductor.config.cpp.cxx) for CPU "
                    "code; the model runs eager. Install g++ or clang++ (or set CXX) to compile the step.")
        return 0
    blocks = [m for m in model.modules() if isinstance(m, _block_types())]
    if not blocks:
        return 0
    for module in model.modules():
        if isinstance(module, _eager_types()) and not isinstance(module.__dict__.get("forward"), _EagerForward):
            module.forward = _EagerForward(module)
    torch._dynamo.config.suppress_errors = True  # a frame that fails to compile runs eager (logged by dynamo)
    # Blocks share one code object, and each specialises on its layer index (and once more when the
    # sequence length changes): the default limit of 8 graphs per code object would leave layers eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        if is_checkpointed(block):  # compile inside the checkpoint (see the module docstring)
            block.forward.inner = torch.compile(block.forward.inner, backend=BACKEND)
        else:
            block.compile(backend=BACKEND)
    _log_graph_breaks_once(model)
    return len(blocks)


def _log_graph_breaks_once(model: nn.Module) -> None:
    """After the first forward: one log line with the graph breaks dynamo met, by reason."""

    def report(module: nn.Module, args, output) -> None:
        handle.remove()
        from torch._dynamo.utils import counters

        breaks = counters["graph_break"]
        if breaks:
            shown = "; ".join(f"{reason.splitlines()[0][:160]} (x{n})" for reason, n in breaks.most_common(5))
            log.info("train.compile: %d graph break(s) in the compiled blocks (they run as separate graphs): %s",
                     sum(breaks.values()), shown)
        else:
            log.info("train.compile: the compiled blocks traced without graph breaks")

    handle = model.register_forward_hook(report)


__all__ = ["compile_blocks", "inductor_compiler"]
