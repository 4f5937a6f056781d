"""Ring attention over the sequence-parallel group, with zig-zag causal balancing and an MLA latent option.

Each of the ``sp`` ranks holds ``seq_local`` rows of the sequence. Key/value blocks travel around
the ring (rank r sends to r+1, receives from r-1) while every rank attends its queries to the
block it holds, so after ``sp`` steps each query has seen every key (Liu et al. 2023, "Ring
Attention with Blockwise Transformers", arXiv:2310.01889). Block results are merged with an
online softmax: per query row a running log-sum-exp, the output rescaled by exp(lse_old - lse_new)
(Milakov & Gimelshein 2018; FlashAttention-2, Dao 2023, arXiv:2307.08691 §3.1). The accumulators
are fp32 whatever the input dtype, so a bf16 run rounds each block result once, not every merge.

Backward (FlashAttention-2 §3.2, recomputation): the forward saves only the merged output and its
log-sum-exp; the blocks travel the ring again, each rank recomputes its scores against the block it
holds, adds its dQ locally and its share of the block's dK/dV to a buffer that travels with the
block and finally reaches the block's owner (one extra hop). Sends are posted before the compute
of a step and waited for after it, so communication overlaps the block attention.

Causal balance (zig-zag, ``xoron_dist.parallel.sequence``): the sequence is cut into 2·sp chunks and
rank r holds chunks r and 2·sp-1-r, so every rank has the same number of unmasked (query, key) pairs
(the layout of Llama 3's context parallelism, arXiv:2407.21783 §3.3.2). Masking itself does not
assume that layout: each (query half, key half) tile is classified (``ring_tiles``) as skipped
(entirely masked: no compute, the ring still moves), full, causal-diagonal (the kernel's own mask),
or masked with an explicit mask built from the rows' global positions and optional document ids;
query rows that see no key of a tile contribute nothing (their tile log-sum-exp is -inf).

Host reads: the plan of every tile of every ring step is made once per layer call, before the ring
turns, and the backward reuses it. Zig-zag rows without documents are planned from the layout alone
(whether the positions are that layout rides on the input check's all-gather, its one read); any
other rows gather every rank's positions/document ids once and classify all tiles on the device,
read back in one ``tolist()``. So a layer call reads the host once (zig-zag) or twice (packed), and
its backward never, whatever the number of tiles (tests/parallel/test_ring_host_syncs.py); under
activation checkpointing the recompute reuses the forward's reads (``parallel.checkpointing.host_read``).

MLA latent option (``ring_attention_latent``): MLA's keys and values are an up-projection of a
normed latent (kv_lora_rank) plus one rope key shared by all heads (DeepSeek-V2 §2.1,
arXiv:2405.04434). The ring then carries (latent, rope key) — for the full model 288 numbers per
token instead of 16·(96+64) = 2560 — and every rank expands the block it holds; backward carries
their gradients, and each rank accumulates its share of the up-projection's weight gradient.

The block kernel is the device-generic adapter ``xoron_dist.model.common.attention_kernels``: ATen's
fused CPU flash attention on CPU, the CUDA flash kernel (half precision, unmasked tiles) or the
memory-efficient kernel (masked tiles, fp32) on GPUs; each returns the log-sum-exp the merge needs
and has a backward that takes the merged out/LSE. The ring zero-pads the narrower of (q/k, v) to
one width W, which every kernel accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from xoron_dist.model.common.attention_kernels import (
    AttentionKernelError,
    attention_backward,
    attention_forward,
    device_kind,
    select_kernel,
)
from xoron_dist.parallel.checkpointing import host_read
from xoron_dist.parallel.ring_tiles import Plan, _plan, _plans, _zigzag_plans  # noqa: F401 (_plan: for tests)
from xoron_dist.utils.host_syncs import upload

# Distinct tags keep the K/V stream and the gradient stream apart when both are in flight
# between the same two ranks (always the case at sp=2).
_BLOCK_TAG, _GRAD_TAG = 0, 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RingLayoutError(ValueError):
    """Inputs of ring attention that do not fit together (on one rank or across the SP ranks)."""


@dataclass
class RingTraffic:
    """Bytes (and exchanges) this rank has sent around the ring since ``reset()``.

    One exchange = one hop of everything that travels together (a block, or a gradient buffer).
    """

    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_hops: int = 0
    backward_hops: int = 0

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.forward_hops = self.backward_hops = 0

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


traffic = RingTraffic()  # module-level counter read by tests and bench/ring_attention.py


# ---------------------------------------------------------------------------------------------
# Block attention (fused kernel), the online-softmax merge, and what travels (codecs)
# ---------------------------------------------------------------------------------------------


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (b, s, h, d) -> (b, h, s, d), the kernel's layout; a view


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: out (b, t, h, dv) fp32, lse (b, t, h) fp32 absorb a block's normalised result.

    lse_new = log(e^lse + e^blk_lse); out_new = out·e^(lse-lse_new) + blk_out·e^(blk_lse-lse_new).
    Rows where both are -inf (nothing seen yet) stay 0 / -inf instead of becoming NaN.
    """
    top = torch.maximum(lse, blk_lse)
    top = top.masked_fill(top == float("-inf"), 0.0)
    w_old, w_blk = (lse - top).exp(), (blk_lse - top).exp()
    total = w_old + w_blk  # 0 when nothing was seen, else in [1, 2]: one term is e^0
    norm = total.clamp_min(1.0)
    out.mul_((w_old / norm)[..., None]).add_(blk_out * (w_blk / norm)[..., None])
    lse.copy_(top + total.log())


class _FullKV:
    """The ring carries k (b, t, h, d) and v (b, t, h, dv) as they are; padding to one width is local."""

    def __init__(self, width: int, k_dim: int, v_dim: int) -> None:
        self.width, self.dk_width, self.dv_width = width, k_dim, v_dim

    def expand(self, payload: Sequence[torch.Tensor], cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = payload
        return _pad(k[:, cols], self.width), _pad(v[:, cols], self.width)

    def grad_buffers(self, grads: list[torch.Tensor], cols: slice, lead: torch.Size):
        return grads[0][:, cols], grads[1][:, cols]  # accumulate straight into the travelling gradient

    def collapse(self, payload, cols, dk, dv, grads) -> None:
        pass


class _LatentKV:
    """The ring carries MLA's latent (b, t, kv_rank) and shared rope key (b, t, rope); each rank expands.

    Expansion as in ``MultiLatentAttention._expanded``: [k_nope | v] = latent · W^T per head,
    k = [k_nope | k_rope repeated over heads]. ``collapse`` maps a key tile's per-head dk/dv back to
    d latent = d[k_nope | v] · W and d k_rope = Σ_heads dk_rope, and adds this rank's share of
    dW = d[k_nope | v]^T · latent to ``weight_grad`` (fp32). Work is per key tile, so only a
    tile's expanded keys and values exist at a time.
    """

    def __init__(self, weight: torch.Tensor, num_heads: int, nope_dim: int, rope_dim: int, v_dim: int,
                 width: int) -> None:
        self.weight, self.weight32 = weight, weight.float()
        self.heads, self.nope, self.width = num_heads, nope_dim, width
        self.dk_width, self.dv_width = nope_dim + rope_dim, v_dim
        self.weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def expand(self, payload: Sequence[torch.Tensor], cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_rope = payload[0][:, cols], payload[1][:, cols]
        kv = F.linear(latent, self.weight).view(*latent.shape[:2], self.heads, self.nope + self.dv_width)
        k_nope, v = kv.split([self.nope, self.dv_width], dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, self.heads, -1)), dim=-1)
        return _pad(k, self.width), _pad(v, self.width)

    def grad_buffers(self, grads: list[torch.Tensor], cols: slice, lead: torch.Size):
        return (torch.zeros(*lead, self.dk_width, dtype=torch.float32, device=self.weight.device),
                torch.zeros(*lead, self.dv_width, dtype=torch.float32, device=self.weight.device))

    def collapse(self, payload, cols, dk, dv, grads) -> None:
        d_kv = torch.cat((dk[..., : self.nope], dv), dim=-1).flatten(2)  # (b, t, h*(nope+v))
        self.weight_grad.addmm_(d_kv.flatten(0, 1).t(), payload[0][:, cols].flatten(0, 1).float())
        grads[0][:, cols] += d_kv @ self.weight32
        grads[1][:, cols] += dk[..., self.nope :].sum(2)


Codec = _FullKV | _LatentKV


def _attend_block(q: torch.Tensor, payload: Sequence[torch.Tensor], codec: Codec, plan: Plan,
                  scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """q (b, s, h, W); merge the block's result into out (b, s, h, dv), lse (b, s, h), both fp32."""
    for tiles in plan:
        k, v = codec.expand(payload, tiles[0].cols)  # (b, t, h, W): one key tile at a time
        for tile in tiles:
            # rows that see no key of the tile come back with out 0 and lse -inf
            blk_out, blk_lse = attention_forward(_heads_first(q[:, tile.rows]), _heads_first(k), _heads_first(v),
                                                 scale=scale, causal=tile.causal, allowed=tile.allowed(),
                                                 empty_rows=tile.empty_rows)
            _merge(out[:, tile.rows], lse[:, tile.rows], _heads_first(blk_out)[..., : out.shape[-1]],
                   blk_lse.transpose(1, 2))
            del blk_out, blk_lse  # tile-sized buffers die before the next tile's are made (peak memory)
        del k, v


def _attend_block_backward(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           payload: Sequence[torch.Tensor], codec: Codec, plan: Plan, scale: float,
                           dq: torch.Tensor) -> list[torch.Tensor]:
    """One block's gradients from the final out/lse (FlashAttention-2 backward, per tile).

    dout/out (b, s, h, dv), q (b, s, h, W), lse (b, s, h) fp32. Adds to dq (b, s, h, W) fp32;
    returns this rank's fp32 gradient of the payload. dout/out are padded per tile (transient).
    """
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in payload]
    for tiles in plan:
        cols = tiles[0].cols
        k, v = codec.expand(payload, cols)
        dk, dv = codec.grad_buffers(grads, cols, k.shape[:3])
        for tile in tiles:
            r = tile.rows
            gq, gk, gv = attention_backward(
                _heads_first(_pad(dout[:, r], codec.width)), _heads_first(q[:, r]), _heads_first(k), _heads_first(v),
                _heads_first(_pad(out[:, r], codec.width)), lse[:, r].transpose(1, 2), scale=scale,
                causal=tile.causal, allowed=tile.allowed(),
            )
            dq[:, r] += _heads_first(gq)
            dk += _heads_first(gk)[..., : codec.dk_width]
            dv += _heads_first(gv)[..., : codec.dv_width]
            del gq, gk, gv  # as in _attend_block: one tile's buffers at a time
        codec.collapse(payload, cols, dk, dv, grads)
        del k, v, dk, dv
    return grads


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------


class _Ring:
    """Point-to-point neighbours of this rank in the SP group; counts what it sends."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group or dist.group.WORLD, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group or dist.group.WORLD, (self.rank - 1) % self.size)

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int, backward: bool) -> tuple[list[torch.Tensor], list]:
        """Post sends of ``tensors`` to the next rank and receives of the same shapes from the previous.

        Returns the receive buffers and the pending works; the sent tensors must stay unmodified
        until the works are waited for.
        """
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in received]
        works = dist.batch_isend_irecv(ops)
        sent = sum(t.numel() * t.element_size() for t in tensors)
        if backward:
            traffic.backward_bytes += sent
            traffic.backward_hops += 1
        else:
            traffic.forward_bytes += sent
            traffic.forward_hops += 1
        return received, works


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _ring_forward(ring: _Ring, q: torch.Tensor, payload: Sequence[torch.Tensor], codec: Codec, plans: list[Plan],
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, s, h, W); plans[step] for the block held at each step. Returns out (b, s, h, dv), lse (b, s, h), fp32."""
    b, s, h, _ = q.shape
    out = torch.zeros(b, s, h, codec.dv_width, dtype=torch.float32, device=q.device)
    lse = torch.full((b, s, h), float("-inf"), dtype=torch.float32, device=q.device)
    current = [t.contiguous() for t in payload]
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            incoming, works = ring.exchange(current, _BLOCK_TAG, backward=False)
        if plans[step]:  # an entirely masked block costs nothing but its hop
            _attend_block(q, current, codec, plans[step], scale, out, lse)
        if not last:
            _wait(works)
            current = incoming
    return out, lse


def _ring_backward(ring: _Ring, dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   payload: Sequence[torch.Tensor], codec: Codec, plans: list[Plan],
                   scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Returns dq (b, s, h, W) fp32 and the fp32 gradients of this rank's payload."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    current = [t.contiguous() for t in payload]
    grads: list[torch.Tensor] = []
    grads_in: list[torch.Tensor] = []
    grad_works: list = []
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            incoming, works = ring.exchange(current, _BLOCK_TAG, backward=True)
        plan = plans[step]  # the forward's plan: the backward reads nothing from the host
        mine = _attend_block_backward(dout, q, out, lse, current, codec, plan, scale, dq) if plan else None
        if step == 0:
            grads = mine or [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in current]
        else:
            _wait(grad_works)  # the block's gradient so far, from the ranks that held it before this one
            grads = grads_in
            for acc, add in zip(grads, mine or [], strict=False):
                acc.add_(add)
        mine = None
        if not last:
            _wait(works)
            current = incoming
        if ring.size > 1:  # the hop after the last step brings each block's gradient home
            grads_in, grad_works = ring.exchange(grads, _GRAD_TAG, backward=True)
    if ring.size > 1:
        _wait(grad_works)
        grads = grads_in
    return dq, grads


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, ring, scale):
        codec = _FullKV(max(q.shape[-1], v.shape[-1]), k.shape[-1], v.shape[-1])
        # contiguous(): the fused kernel silently misreads a last dim whose stride is not 1
        out, lse = _ring_forward(ring, _pad(q, codec.width).contiguous(), (k, v), codec, plans, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.plans, ctx.scale = ring, plans, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        codec = _FullKV(max(q.shape[-1], v.shape[-1]), k.shape[-1], v.shape[-1])
        dq, (dk, dv) = _ring_backward(ctx.ring, dout.to(q.dtype).contiguous(), _pad(q, codec.width).contiguous(), out,
                                      lse, (k, v), codec, ctx.plans, ctx.scale)
        return dq[..., : q.shape[-1]].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _RingLatentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_rope, latent, k_rope, weight, plans, ring, scale, num_heads, v_dim):
        q = torch.cat((q_nope, q_rope), dim=-1)
        nope, rope = q_nope.shape[-1], q_rope.shape[-1]
        codec = _LatentKV(weight, num_heads, nope, rope, v_dim, max(nope + rope, v_dim))
        out, lse = _ring_forward(ring, _pad(q, codec.width), (latent, k_rope), codec, plans, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, latent, k_rope, weight, out, lse)
        ctx.ring, ctx.plans, ctx.scale = ring, plans, scale
        ctx.num_heads, ctx.nope, ctx.v_dim = num_heads, nope, v_dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, latent, k_rope, weight, out, lse = ctx.saved_tensors
        nope, rope = ctx.nope, k_rope.shape[-1]
        codec = _LatentKV(weight, ctx.num_heads, nope, rope, ctx.v_dim, max(nope + rope, ctx.v_dim))
        dq, (d_latent, d_k_rope) = _ring_backward(ctx.ring, dout.to(q.dtype).contiguous(), _pad(q, codec.width),
                                                  out, lse, (latent, k_rope), codec, ctx.plans, ctx.scale)
        return (dq[..., :nope].to(q.dtype), dq[..., nope : nope + rope].to(q.dtype), d_latent.to(latent.dtype),
                d_k_rope.to(k_rope.dtype), codec.weight_grad.to(weight.dtype), *([None] * 5))


# ---------------------------------------------------------------------------------------------
# Validation and the public entry points
# ---------------------------------------------------------------------------------------------


def _meta_problem(t: torch.Tensor | None, name: str, batch: int, seq: int, device: torch.device) -> str | None:
    if t is None:
        return None
    if t.dim() != 2 or t.shape[1] != seq or t.shape[0] not in (1, batch):
        return f"{name} has shape {tuple(t.shape)}; expected (batch or 1, seq_local) = ({batch} or 1, {seq})"
    if t.is_floating_point() or t.dtype == torch.bool:
        return f"{name} has dtype {t.dtype}; expected an integer dtype (global row positions / document ids)"
    if t.device != device:
        return f"{name} is on {t.device} but the attention inputs are on {device}"
    return None


def _tensors_problem(named: dict[str, torch.Tensor], batch_seq: tuple[int, int]) -> str | None:
    """Shared dtype/device/(batch, seq) of the attention inputs."""
    dtypes = {t.dtype for t in named.values()}
    devices = {t.device for t in named.values()}
    listing = ", ".join(f"{n} {t.dtype} on {t.device}" for n, t in named.items())
    if len(dtypes) > 1 or len(devices) > 1:
        return f"the attention inputs must share one dtype and device; got {listing}"
    dtype = dtypes.pop()
    if dtype not in _DTYPES:
        return f"the attention inputs have dtype {dtype}; expected one of {', '.join(map(str, _DTYPES))}"
    try:
        select_kernel(device_kind(next(iter(named.values()))), dtype, 1, 1, masked=True)
    except AttentionKernelError as err:
        return str(err)
    for name, t in named.items():
        if tuple(t.shape[:2]) != batch_seq:
            return f"{name} has shape {tuple(t.shape)}; every input must start with (batch, seq_local) = {batch_seq}"
    return None


def _agree(ring: _Ring, fields: dict[str, int], problem: str | None, zigzag: torch.Tensor) -> bool:
    """Every SP rank learns whether all ranks' inputs are valid and alike (one small all-gather, one read).

    A rank with a bad input raises its own message; the others name it instead of hanging in the ring.
    ``zigzag`` (0-dim, on the inputs' device) rides along: True where this rank's rows are the
    zig-zag layout without documents. Returns whether they are on every rank (then the tile plan
    follows from the layout).
    """
    names = list(fields)
    checks = upload([problem is None, *fields.values()], dtype=torch.int64, device=zigzag.device)
    mine = torch.cat((checks, zigzag.to(torch.int64).view(1)))

    def gather() -> list[list[int]]:
        everyone = [torch.empty_like(mine) for _ in range(ring.size)]
        dist.all_gather(everyone, mine, group=ring.group)
        return torch.stack(everyone).tolist()  # the one host read of the check

    table = host_read(gather, witness=mine)  # a checkpoint's recompute reuses the forward's table
    if problem is not None:
        raise RingLayoutError(f"ring attention (SP rank {ring.rank}): {problem}")
    rejected = [rank for rank, row in enumerate(table) if not row[0]]
    if rejected:
        raise RingLayoutError(f"ring attention: SP rank(s) {rejected} rejected their inputs (their error says why)")
    differ = []
    for i, name in enumerate(names, start=1):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            shown = [str(_DTYPES[x]) if name == "dtype" else str(x) for x in values]
            differ.append(f"{name} [{', '.join(shown)}]")
    if differ:
        raise RingLayoutError(
            "ring attention: the SP ranks disagree on " + "; ".join(differ) + " (by SP rank). Every SP rank must "
            "hold the same (batch, seq_local) rows — cut the sequence with zigzag_split — in the same dtype, with the "
            "same causal flag and the same document-ids option."
        )
    return all(row[-1] for row in table)


def _zigzag_flag(meta: torch.Tensor | None, causal: bool, ring: _Ring, device: torch.device) -> torch.Tensor:
    """0-dim bool on the device (no host read): causal rows without documents at the zig-zag positions of
    this rank (``xoron_dist.parallel.sequence.zigzag_positions``), the only case the layout alone plans."""
    seq = -1 if meta is None else meta.shape[-1]
    if meta is None or not causal or meta.shape[0] != 1 or seq < 2 or seq % 2:
        return torch.zeros((), dtype=torch.bool, device=device)
    chunk, first, second = seq // 2, ring.rank, 2 * ring.size - 1 - ring.rank
    expected = torch.cat((torch.arange(first * chunk, (first + 1) * chunk, device=device),
                          torch.arange(second * chunk, (second + 1) * chunk, device=device)))
    return (meta[0] == expected).all()


def _ring_plans(ring: _Ring, meta: torch.Tensor, causal: bool, zigzag: bool) -> list[Plan]:
    """The plan of every ring step of this layer call, made before the ring turns; the backward reuses it.

    Zig-zag rows without documents: from the layout. Otherwise every rank's meta is gathered (one
    all-gather, counted as forward traffic) and every tile classified in one device pass, read once.
    """
    if zigzag:
        return _zigzag_plans(ring.rank, ring.size, meta.shape[-1])
    if not causal and meta.shape[0] == 1:
        return _plans(meta, [meta] * ring.size, causal)  # every tile is full: no one's rows are needed
    everyone = [torch.empty_like(meta) for _ in range(ring.size)]
    dist.all_gather(everyone, meta, group=ring.group)
    traffic.forward_bytes += (ring.size - 1) * meta.numel() * meta.element_size()
    return _plans(meta, [everyone[(ring.rank - step) % ring.size] for step in range(ring.size)], causal)


def _pack_meta(positions: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """(1 or 2, batch or 1, seq_local) int64: the rows' positions, then their document ids if packed."""
    parts = [positions] if document_ids is None else [positions, document_ids]
    rows = max(p.shape[0] for p in parts)
    return torch.stack([p.to(torch.int64).expand(rows, -1) for p in parts]).contiguous()


def _group_ring(group: dist.ProcessGroup | None) -> _Ring:
    if not dist.is_initialized():
        raise RingLayoutError("ring attention needs torch.distributed initialised (xoron_dist.parallel.state)")
    ring = _Ring(group)
    if ring.rank < 0:
        raise RingLayoutError("this rank is not a member of the sequence-parallel group passed to ring attention")
    return ring


def _common_fields(batch: int, seq: int, heads: int, dtype: torch.dtype, meta: torch.Tensor | None,
                   causal: bool) -> dict[str, int]:
    return {"batch": batch, "seq_local": seq, "heads": heads,
            "dtype": _DTYPES.index(dtype) if dtype in _DTYPES else -1,
            "positions/document_ids batch": meta.shape[1] if meta is not None else -1,
            "document_ids given": int(meta is not None and meta.shape[0] == 2), "causal": int(causal)}


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None,
                   scale: float, causal: bool = True, positions: torch.Tensor,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this rank's queries to the keys of every rank in ``group`` (the SP group).

    q, k (batch, seq_local, heads, d), v (batch, seq_local, heads, dv), dv may differ from d;
    positions (batch or 1, seq_local) global row order of the local rows (``zigzag_positions``),
    document_ids (batch or 1, seq_local) optional: a query attends a key iff (not causal or
    key position <= query position) and (no document ids or same document).
    Returns (batch, seq_local, heads, dv) in q's dtype; differentiable in q, k, v.
    """
    ring = _group_ring(group)
    problem, meta = None, None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        problem = (f"q, k, v must be (batch, seq_local, heads, dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                   f"{tuple(v.shape)}")
    elif q.shape[:3] != k.shape[:3] or q.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        problem = (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q and k must have one shape, "
                   "and v the same (batch, seq_local, heads)")
    else:
        problem = (_tensors_problem({"q": q, "k": k, "v": v}, tuple(q.shape[:2]))
                   or _meta_problem(positions, "positions", q.shape[0], q.shape[1], q.device)
                   or _meta_problem(document_ids, "document_ids", q.shape[0], q.shape[1], q.device))
    if problem is None:
        meta = _pack_meta(positions, document_ids)
    fields = _common_fields(*(q.shape[:3] if q.dim() == 4 else (-1, -1, -1)), q.dtype, meta, causal)
    fields |= {"qk head dim": q.shape[-1], "v head dim": v.shape[-1]}
    zigzag = _agree(ring, fields, problem, _zigzag_flag(meta, causal, ring, q.device))
    plans = _ring_plans(ring, meta, causal, zigzag)
    return _RingAttentionFunction.apply(q, k, v, plans, ring, float(scale))


def ring_attention_latent(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                          kv_up_weight: torch.Tensor, *, num_heads: int, nope_dim: int, v_dim: int,
                          group: dist.ProcessGroup | None, scale: float, causal: bool = True,
                          positions: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """MLA ring attention that passes the compressed KV (latent + rope key) around the ring.

    q_nope (b, s, h, nope), q_rope (b, s, h, rope) (already rotated), latent (b, s, kv_rank) (the
    normed c_kv), k_rope (b, s, rope) (already rotated, shared by all heads), kv_up_weight
    (h*(nope+v), kv_rank) in torch Linear layout, local heads only under TP. Masking arguments as
    ``ring_attention``. Returns (b, s, h, v_dim); equal to expanding the latent and calling
    ``ring_attention``. The kv_up_weight gradient is this rank's share (its queries against every
    block); the sum over the SP ranks is the full gradient, which the gradient all-reduce over the
    SP x DP group provides.
    """
    ring = _group_ring(group)
    problem, meta = None, None
    shapes = {"q_nope": q_nope, "q_rope": q_rope, "latent": latent, "k_rope": k_rope}
    listing = ", ".join(f"{n} {tuple(t.shape)}" for n, t in shapes.items())
    rope_dim, kv_rank = k_rope.shape[-1], latent.shape[-1]
    if q_nope.dim() != 4 or q_rope.dim() != 4 or latent.dim() != 3 or k_rope.dim() != 3:
        problem = f"expected q_nope/q_rope (b, s, heads, dim), latent/k_rope (b, s, dim); got {listing}"
    elif (q_nope.shape[2:] != (num_heads, nope_dim) or q_rope.shape[:3] != q_nope.shape[:3]
          or q_rope.shape[-1] != rope_dim):
        problem = (f"{listing}: q_nope must be (b, s, num_heads={num_heads}, nope_dim={nope_dim}) and q_rope "
                   f"(b, s, num_heads, rope_dim={rope_dim}, the width of k_rope)")
    elif kv_up_weight.shape != (num_heads * (nope_dim + v_dim), kv_rank):
        problem = (f"kv_up_weight has shape {tuple(kv_up_weight.shape)}; expected (num_heads*(nope_dim+v_dim), "
                   f"kv_rank) = ({num_heads * (nope_dim + v_dim)}, {kv_rank}) (under TP: this rank's heads only)")
    else:
        b, s = q_nope.shape[:2]
        problem = (_tensors_problem(shapes, (b, s))
                   or (None if kv_up_weight.dtype == latent.dtype and kv_up_weight.device == latent.device else
                       f"kv_up_weight is {kv_up_weight.dtype} on {kv_up_weight.device}; the inputs are "
                       f"{latent.dtype} on {latent.device}")
                   or _meta_problem(positions, "positions", b, s, latent.device)
                   or _meta_problem(document_ids, "document_ids", b, s, latent.device))
    if problem is None:
        meta = _pack_meta(positions, document_ids)
    lead = q_nope.shape[:2] if q_nope.dim() == 4 else (-1, -1)
    fields = _common_fields(*lead, num_heads, latent.dtype, meta, causal)
    fields |= {"nope_dim": nope_dim, "rope_dim": rope_dim, "v_dim": v_dim, "kv_rank": kv_rank}
    zigzag = _agree(ring, fields, problem, _zigzag_flag(meta, causal, ring, latent.device))
    plans = _ring_plans(ring, meta, causal, zigzag)
    return _RingLatentAttentionFunction.apply(q_nope, q_rope, latent, k_rope, kv_up_weight, plans, ring,
                                              float(scale), num_heads, v_dim)
