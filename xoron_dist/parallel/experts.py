"""Expert parallelism: routed experts spread over the expert-parallel (EP) group, tokens moved by all-to-all.

Each EP rank holds ``num_experts / ep`` whole experts (expert ``e`` lives on EP rank ``e // local``) and
routes its *own* tokens (EP ranks are data/sequence-parallel peers: they hold different tokens). One
MoE step on every rank:

1. the router (ours: sigmoid scores + expert bias, top-k) picks experts for the local tokens;
2. the (token, choice) pairs are sorted by expert, so the rows bound for each EP rank are contiguous;
3. the per-expert counts are exchanged (one small all-to-all), then the rows themselves (an all-to-all
   with uneven splits: *dropless*, no token is dropped and nothing is padded);
4. the received rows are regrouped by local expert (they arrive grouped by source rank), each local
   expert runs one matmul over its rows, and the results travel back by the inverse all-to-all;
5. the combine weights apply and the rows are summed into their tokens (``index_add_``).

The counts come from a ``searchsorted`` over the sorted expert ids (not ``bincount``) and are read on the
host once per layer, together with the exchanged ones: one device-to-host sync per dropless MoE layer forward.
Under activation checkpointing the recompute does not read (nor exchange the counts) again: it takes the
forward's values from the block's tape (``parallel.checkpointing.host_read``), checked on the device.

Overlap (``train.ep_overlap_chunks`` = N > 1, dropless only): the tokens are cut into N chunks and the
pairs sorted by (chunk, expert), so steps 3-4 run as a pipeline. Every chunk's dispatch starts at once
(``all_to_all_single(async_op=True)``); while the experts run on chunk c, the later chunks' rows are still
travelling and chunk c-1's results are on their way back. Each exchange is a pair of autograd functions,
``_StartAllToAll`` and ``_WaitAllToAll`` (``PendingAllToAll``): in backward the wait's node starts the
inverse exchange and the start's node waits for it, so autograd computes one chunk's expert gradients
while another chunk's gradients travel. Every token's rows meet the same expert weights with the same ops,
so the result equals the unchunked one up to fp32 rounding (the BLAS picks its kernel by row count, and an
expert's weight gradient is summed over chunks). N=1 is the plain sequential dispatch. On gloo (CPU) the
exchange is a copy done by the same cores that compute, so there is little to win (bench/ep_overlap.py:
the default stays 1); on NCCL the exchange runs on the interconnect beside the GEMMs.

Autograd runs the same all-to-alls backwards (the inverse exchange), so an expert's gradient holds the
contributions of every EP rank's tokens; the data-parallel reduction then sums it over the expert's
replicas (the expert-data-parallel group, ``world / (tp·ep·pp)`` ranks) and divides by the *dense*
data-parallel size, exactly as for dense weights, so the result does not depend on ``ep``.

``capacity_factor`` (optional) gives fixed shapes instead: every expert takes at most
``ceil(capacity_factor · tokens · k / num_experts)`` rows from each rank (the earliest tokens win, as in
GShard); the rest of a token's choices are dropped (its other choice and the shared expert still
apply), and each expert's block is padded to that capacity, so the all-to-all splits are equal.

With tensor parallelism the experts may also be split on their FFN dim (``parallel.tp_experts``): each
TP rank exchanges the same rows inside its own EP group (TP peers hold the same tokens) and the
partial outputs are summed over TP after the return trip. The container is built from the model's
stacked ``RoutedExperts`` (``apply_expert_parallel``, after tensor parallelism has cut their FFN dim,
if it does) and takes over their ``entry``/``exit`` seams, so the TP exchanges are the ones tensor
parallelism put there. Only the MoE feed-forwards (``MoEFeedForward``: the LLM's) are spread; the
video encoder's temporal experts stay whole on every rank.

LoRA on the routed experts (``model.lora.targets`` has ``routed_experts``): the stacked container is a
``LoRARoutedExperts`` whose ``StackedLoRA`` adapters hold A (experts, rank, in) and B (experts, out, rank).
Each local expert takes its experts' slice of them exactly as it takes ``gate_up[e]``/``down[e]``
(``StackedLoRA.expert(e)``), under the same child names, and computes with ``W_e + scale · B_e @ A_e``;
so adapter parameters are expert parameters like the weights beside them (the marks below), are named
``...deepspeed_experts.<i>.{gate_up,down}_lora.{A,B}`` and are stacked back by expert id on export.

DeepSpeed integration (``deepspeed.utils.groups`` and parameter attributes):

* ``register_expert_groups`` hands DeepSpeed Megatron-core's expert-parallel and expert-data-parallel
  groups under DeepSpeed's name ``ep_size_<ep>`` (DeepSpeed never builds a second set);
* expert parameters carry ``allreduce=False`` and ``group_name`` (DeepSpeed's marks of an expert
  parameter: reduced over the expert-data-parallel group, optimizer state per EP rank);
* ZeRO 0-2: the container is a ``deepspeed.moe.layer.MoE`` (the engine's switch for expert-aware
  gradient reduction, optimizer groups and per-expert checkpoint files), with DeepSpeed's parameter
  names ``deepspeed_moe.experts.deepspeed_experts.<i>``;
* ZeRO-3: DeepSpeed refuses its native MoE class there, so the container is a plain module whose
  parameters carry DeepSpeed's stage-3 placement marks (``ds_zero_placement_family="autoep_expert"``,
  the expert-data-parallel group as their partition group): ZeRO-3 partitions expert weights over
  their replicas only and averages their gradients by the dense data-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xoron_dist.model.common.moe import MoEFeedForward, RoutedExperts
from xoron_dist.model.lora import StackedLoRA
from xoron_dist.parallel.checkpointing import host_read
from xoron_dist.parallel.tensor import mark_tp_split, replace_submodule
from xoron_dist.utils.host_syncs import where_true


class _InFlight:
    """One all-to-all started and not yet waited for, in forward and (inverse) in backward: the work
    handles and the buffers they write, shared by the ``_StartAllToAll`` / ``_WaitAllToAll`` pair."""

    __slots__ = ("work", "grad_work", "grad_in", "grad_out")

    def __init__(self) -> None:
        self.work = self.grad_work = self.grad_in = self.grad_out = None


class _StartAllToAll(torch.autograd.Function):
    """Starts the exchange (``async_op``) and returns its output buffer, written while other work runs;
    ``_WaitAllToAll`` waits for it. Backward: waits for the inverse exchange ``_WaitAllToAll.backward``
    started, so the gradient travels while autograd computes other nodes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group, flight: _InFlight) -> torch.Tensor:
        ctx.flight = flight
        out = x.new_empty(sum(recv), *x.shape[1:])
        flight.work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                                             group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        flight = ctx.flight
        flight.grad_work.wait()
        grad = flight.grad_out
        flight.grad_work = flight.grad_in = flight.grad_out = None
        return grad, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Waits for the exchange its ``_StartAllToAll`` started; backward starts the inverse exchange."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, send: list[int], recv: list[int], group, flight: _InFlight) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.flight = send, recv, group, flight
        flight.work.wait()
        flight.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flight = ctx.flight
        flight.grad_in = grad.contiguous()  # held until the exchange is done: the collective reads it
        flight.grad_out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        flight.grad_work = dist.all_to_all_single(flight.grad_out, flight.grad_in, output_split_sizes=ctx.send,
                                                  input_split_sizes=ctx.recv, group=ctx.group, async_op=True)
        return grad, None, None, None, None  # a placeholder: _StartAllToAll.backward returns the exchanged one


class PendingAllToAll:
    """An all-to-all in flight: constructing it starts the exchange of ``x`` (``send[r]`` rows for rank r, in
    rank order; ``recv[r]`` come from rank r), other work runs, then ``wait()`` returns the received rows.
    Autograd-aware both ways: the backward of ``wait`` starts the inverse exchange, the backward of the
    start waits for it. Every rank of the group must start its exchanges in the same order."""

    def __init__(self, x: torch.Tensor, send: list[int], recv: list[int], group) -> None:
        self._args = (send, recv, group, _InFlight())
        self._buffer = _StartAllToAll.apply(x, *self._args)

    def wait(self) -> torch.Tensor:
        return _WaitAllToAll.apply(self._buffer, *self._args)


def group_name(ep: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``ep``."""
    return f"ep_size_{ep}"


def register_expert_groups(ep: int) -> str:
    """Give DeepSpeed Megatron-core's expert groups (call after ``parallel_state.initialize_model_parallel``)."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    name = group_name(ep)
    ep_group = parallel_state.get_expert_model_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)
    return name


@dataclass(frozen=True)
class ExpertSplit:
    """This rank's place in the expert-parallel group: it holds experts ``rank * (num_experts / size)``
    onwards, and tokens travel to them by all-to-all over ``group``."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    group_name: str  # DeepSpeed's name for the EP group (``ep_size_<size>``)
    data_group: object  # the expert-data-parallel group: the ranks holding replicas of the same experts
    capacity_factor: float | None = None  # None: dropless
    zero3: bool = False  # the run uses ZeRO-3 (expert parameters marked for stage-3 placement)
    overlap_chunks: int = 1  # dropless: the dispatched rows travel and compute in this many pipelined chunks


def expert_split(cfg) -> ExpertSplit | None:
    """The ``ExpertSplit`` for a run (``cfg``: XoronConfig) once the groups exist; None when ep == 1."""
    from megatron.core import parallel_state

    p = cfg.parallel
    if p.ep == 1:
        return None
    return ExpertSplit(parallel_state.get_expert_model_parallel_group(),
                       parallel_state.get_expert_model_parallel_rank(), p.ep, group_name(p.ep),
                       parallel_state.get_expert_data_parallel_group(), capacity_factor=p.expert_capacity_factor,
                       zero3=p.zero_stage == 3, overlap_chunks=cfg.train.ep_overlap_chunks)


class LocalExpert(nn.Module):
    """One routed SwiGLU expert: ``gate_up`` (2·intermediate, hidden; gate rows first) and ``down``
    (hidden, intermediate), copied from one expert of the stacked weights; with LoRA, also that expert's
    adapters under the stacked container's names (``gate_up_lora``, ``down_lora``: ``StackedLoRA.expert``),
    and it computes with ``W + scale · B @ A`` as ``LoRARoutedExperts`` does for all experts at once."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, adapters: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(gate_up.detach().clone(), requires_grad=gate_up.requires_grad)
        self.down = nn.Parameter(down.detach().clone(), requires_grad=down.requires_grad)
        self.adapter_of = {}  # weight name -> child name of its adapter
        for name, adapter in (adapters or {}).items():
            self.add_module(name, adapter)
            self.adapter_of[adapter.adapts] = name

    def weight(self, name: str) -> torch.Tensor:
        """The weight ``name`` (``gate_up`` or ``down``), its adapter folded in when it has one."""
        adapter = self.adapter_of.get(name)
        return getattr(self, name) if adapter is None else getattr(self, adapter)(getattr(self, name))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, self.weight("gate_up")).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.weight("down"))


def _expert_adapters(experts: RoutedExperts, e: int, tp_split: bool) -> dict[str, nn.Module]:
    """Expert ``e``'s LoRA adapters (none without LoRA): each ``StackedLoRA`` of ``experts`` indexed on its
    expert dim, as the base weights are; a tensor-parallel split factor is marked by the adapter's rule."""
    out = {}
    for name, child in experts.named_children():
        if isinstance(child, StackedLoRA):
            out[name] = adapter = child.expert(e)
            if tp_split:
                factor, dim, stride, _ = adapter.TP_RULES["experts"]
                mark_tp_split(getattr(adapter, factor), dim, stride)
    return out


class _Holder(nn.Module):
    """A plain attribute holder, so parameter names follow DeepSpeed's MoE layout."""


class ExpertParallelExperts(nn.Module):
    """This EP rank's ``num_experts / ep`` experts and the all-to-all dispatch (see the module docstring).

    Same call as ``RoutedExperts``: ``forward(x (tokens, hidden), chosen (tokens, k), weights (tokens, k))``.
    Parameters: ``deepspeed_moe.experts.deepspeed_experts.<local id>.{gate_up, down}``.
    """

    def __init__(self, experts: RoutedExperts, split: ExpertSplit) -> None:
        nn.Module.__init__(self)  # not super(): the DeepSpeed subclass must not run MoE.__init__
        num_experts = experts.num_experts
        if num_experts % split.size:
            raise ValueError(f"num_experts {num_experts} is not divisible by the expert-parallel size {split.size}")
        self.split = split
        self.num_experts, self.ep_size = num_experts, split.size
        self.num_local_experts = num_experts // split.size
        self.first_expert = split.rank * self.num_local_experts
        self.expert_group_name = split.group_name
        tp_split = getattr(experts.gate_up, "tensor_model_parallel", False)
        self.deepspeed_moe = _Holder()
        self.deepspeed_moe.experts = _Holder()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(
            LocalExpert(experts.gate_up[e], experts.down[e], _expert_adapters(experts, e, tp_split))
            for e in range(self.first_expert, self.first_expert + self.num_local_experts))
        self.entry, self.exit = experts.entry, experts.exit  # identities, or the TP exchanges
        for expert in self.local_experts:
            for param in expert.parameters():
                param.allreduce = False  # DeepSpeed: an expert parameter, reduced over its replicas only
                param.group_name = split.group_name
                if split.zero3:  # partitioned over the expert's replicas; gradients averaged by dense dp size
                    param.ds_zero_placement_family = "autoep_expert"
                    param.ds_zero_partition_group_name = split.group_name
                    param.ds_zero_partition_process_group = split.data_group
            if tp_split:
                mark_tp_split(expert.gate_up, dim=0, stride=2)
                mark_tp_split(expert.down, dim=1)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's engine calls this to create expert groups; ours exist already (``register_expert_groups``)."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"expert group {self.expert_group_name} is not registered with DeepSpeed; "
                               "xoron_dist.parallel.state.initialize registers it when parallel.ep > 1")

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.split.capacity_factor is not None:
            return self._capacity_forward(x, chosen, weights)
        tokens, k = chosen.shape
        chunks, experts = self.split.overlap_chunks, self.num_experts
        flat = chosen.flatten()
        # (token, choice) pairs sorted by (chunk, expert), tokens in order: each chunk's rows are contiguous
        # and grouped by expert. The chunk count is the same on every rank (each chunk is one collective),
        # so a chunk may be empty when a rank has fewer tokens than chunks.
        chunk_of_token = torch.arange(tokens, device=flat.device) * chunks // max(tokens, 1)
        key = chunk_of_token.repeat_interleave(k) * experts + flat
        order = key.argsort(stable=True)
        ends = torch.searchsorted(key[order], torch.arange(1, chunks * experts + 1, device=flat.device))
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).view(chunks, experts)  # no bincount: no sync
        token_of = order // k
        out = self._exchange_and_compute(self.entry(x)[token_of], self._exchanged_counts(counts), chunks)
        combined = self.exit(out) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, combined)

    def _capacity_forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Fixed shapes (``capacity_factor``): one exchange of ``capacity`` rows per expert, no chunks.

        Each expert keeps its earliest ``capacity`` pairs. The rows kept per expert are read on the host with
        the exchanged counts (ranks with other token counts send other capacities): one read per layer."""
        tokens, k = chosen.shape
        experts = self.num_experts
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        sorted_experts = flat[order]
        ends = torch.searchsorted(sorted_experts, torch.arange(1, experts + 1, device=flat.device))
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # no bincount: no sync
        cap = self.capacity(tokens * k)
        host = self._exchanged_counts(torch.full((1, experts), cap, device=flat.device), counts.clamp(max=cap))
        kept = host[-experts:]
        rank_in_expert = torch.arange(order.numel(), device=x.device) - (ends - counts)[sorted_experts]
        survivors = where_true(rank_in_expert < cap, sum(kept))  # the pairs kept, in expert order
        slot = sorted_experts[survivors] * cap + rank_in_expert[survivors]  # its row in the padded block
        token_of = order[survivors] // k
        rows = x.new_zeros(experts * cap, x.shape[-1]).index_copy(0, slot, self.entry(x)[token_of])
        out = self._exchange_and_compute(rows, host[:-experts], chunks=1)[slot]  # the padding dropped
        combined = self.exit(out) * weights.flatten()[order[survivors], None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, combined)

    def capacity(self, pairs: int) -> int:
        """Rows each expert takes from one rank under ``capacity_factor``."""
        return max(1, math.ceil(self.split.capacity_factor * pairs / self.num_experts))

    def _exchanged_counts(self, counts: torch.Tensor, kept: torch.Tensor | None = None) -> list[int]:
        """``counts`` (chunks, experts: the rows this rank sends) and the rows it receives for its experts
        (source rank, chunk, local expert), flattened, then ``kept`` if given, as host ints: one all-to-all
        and the layer's one host sync (a checkpoint's recompute reuses the forward's)."""
        ep, local = self.ep_size, self.num_local_experts

        def exchange() -> list[int]:
            sent = counts.view(-1, ep, local).transpose(0, 1).contiguous()  # (dest rank, chunk, its expert)
            received = torch.empty_like(sent)  # received[src, c, i]: rows from src for my expert i in chunk c
            dist.all_to_all_single(received, sent, group=self.split.group)
            return torch.cat([counts.flatten(), received.flatten(), *([] if kept is None else [kept])]).tolist()

        return host_read(exchange, witness=counts if kept is None else kept)

    def _exchange_and_compute(self, rows: torch.Tensor, host: list[int], chunks: int) -> torch.Tensor:
        """Send ``rows`` (grouped by chunk, then by global expert) to their experts' ranks, run them, bring
        the results back in the same order. ``host``: the rows sent and received, as ``_exchanged_counts``
        gives them.

        The chunks form a pipeline: every chunk's exchange starts at once, and while the experts run on
        chunk c the later chunks' rows are still travelling and chunk c-1's results are on their way
        back (the same in backward, where the inverse exchanges start and are waited for in the mirror
        order). One chunk is the unpipelined dispatch."""
        ep, local, group = self.ep_size, self.num_local_experts, self.split.group
        split_at = chunks * ep * local
        mine, theirs = host[:split_at], host[split_at:]
        outgoing = [[sum(mine[(c * ep + r) * local:(c * ep + r + 1) * local]) for r in range(ep)]
                    for c in range(chunks)]
        incoming = [[theirs[(src * chunks + c) * local:(src * chunks + c + 1) * local] for src in range(ep)]
                    for c in range(chunks)]  # incoming[c][src][i]
        inbound = [PendingAllToAll(part, outgoing[c], [sum(n) for n in incoming[c]], group)
                   for c, part in enumerate(rows.split([sum(send) for send in outgoing]))]
        returning = []
        for c, pending in enumerate(inbound):
            computed = self._run_local_experts(pending.wait(), incoming[c])
            returning.append(PendingAllToAll(computed, [sum(n) for n in incoming[c]], outgoing[c], group))
        return torch.cat([pending.wait() for pending in returning])

    def _run_local_experts(self, inbound: torch.Tensor, incoming: list[list[int]]) -> torch.Tensor:
        """inbound (rows, hidden) grouped by (source rank, local expert), ``incoming[src][i]`` rows each ->
        the experts' outputs in the same order."""
        ep, local = self.ep_size, self.num_local_experts
        pieces = inbound.split([n for per_src in incoming for n in per_src])
        outputs = [None] * (ep * local)
        # Each local expert runs through its own module call, on every rank even with no rows: under ZeRO-3
        # the parity test drifted (~1e-6 at step 2, 1e-4 by step 4) when the local weights were used outside
        # their module's forward (a grouped kernel over all of them), and is exact this way.
        for i, expert in enumerate(self.local_experts):
            rows = torch.cat([pieces[src * local + i] for src in range(ep)])  # expert i's rows, by source rank
            for src, out in enumerate(expert(rows).split([incoming[src][i] for src in range(ep)])):
                outputs[src * local + i] = out
        return torch.cat(outputs)  # back to (source rank, expert) order


def _deepspeed_moe_class() -> type:
    from deepspeed.moe.layer import MoE

    class DeepSpeedExpertParallelExperts(ExpertParallelExperts, MoE):
        """``ExpertParallelExperts`` that DeepSpeed's engine recognises as an MoE layer (ZeRO 0-2):
        expert-aware gradient reduction, MoE optimizer groups, per-expert checkpoint files."""

    return DeepSpeedExpertParallelExperts


def build_expert_parallel_experts(experts: RoutedExperts, split: ExpertSplit) -> ExpertParallelExperts:
    """The EP container DeepSpeed needs for the run's ZeRO stage (see the module docstring), holding this
    rank's experts of ``experts``."""
    cls = ExpertParallelExperts if split.zero3 else _deepspeed_moe_class()
    return cls(experts, split)


def apply_expert_parallel(model: nn.Module, split: ExpertSplit) -> int:
    """Swap the routed experts of every ``MoEFeedForward`` of ``model`` for this rank's EP container;
    returns how many. (Modules that call their MoE layers a data-dependent number of times agree on the
    count: ``xoron_dist.parallel.calls``.)"""
    names = [name for name, module in model.named_modules() if isinstance(module, MoEFeedForward)]
    for name in names:
        moe = model.get_submodule(name)
        replace_submodule(model, f"{name}.experts", build_expert_parallel_experts(moe.experts, split))
    return len(names)


__all__ = ["ExpertParallelExperts", "ExpertSplit", "LocalExpert", "PendingAllToAll",
           "apply_expert_parallel", "build_expert_parallel_experts", "expert_split", "group_name",
           "register_expert_groups"]
