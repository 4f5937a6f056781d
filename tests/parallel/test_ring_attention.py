"""Ring attention on 2 and 4 gloo ranks == single-rank attention on the gathered sequence.

Oracles: ``torch.nn.functional.scaled_dot_product_attention`` over the full sequence (out and the
grads of q, k, v) and, for the MLA latent option, the expanded single-rank attention of
``MultiLatentAttention._expanded`` (out and the grads of q_nope, q_rope, latent, k_rope and the
kv_up weight). Each SP size runs its cases in one set of ranks (a module fixture) so that the
process start-up is paid once; the tests then read their case's result.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.parallel.harness import run_ranks
from xoron_dist.parallel import ring_attention as ra
from xoron_dist.parallel.ring_attention import RingLayoutError, ring_attention, ring_attention_latent
from xoron_dist.parallel.sequence import zigzag_gather, zigzag_positions, zigzag_split

pytestmark = pytest.mark.multirank

TOL = 1e-5
# name -> (batch, seq, heads, qk dim, v dim, causal, packed documents, layout)
CASES = {
    "causal": (2, 16, 3, 7, 5, True, False, "zigzag"),
    "causal_packed": (2, 24, 3, 7, 5, True, True, "zigzag"),
    "full": (2, 16, 2, 5, 9, False, False, "zigzag"),
    "full_packed": (2, 24, 3, 5, 9, False, True, "zigzag"),
    "causal_packed_contiguous": (2, 24, 2, 6, 3, True, True, "contiguous"),
}
LATENT = {"batch": 2, "seq": 24, "heads": 3, "nope": 5, "rope": 3, "v": 4, "rank": 6}


# --- inputs and references (every rank builds the same full tensors from a seed) ------------


def _documents(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq) packed document ids: ~5 documents per row, boundaries anywhere (also mid-chunk)."""
    starts = torch.rand(batch, seq, generator=gen) < 0.2
    starts[:, 0] = True
    return starts.long().cumsum(-1)


def _allowed(seq: int, docs: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """(batch or 1, 1, seq, seq) bool: the masking semantics of MultiLatentAttention (row order, documents)."""
    order = torch.arange(seq)
    allowed = torch.ones(1, 1, seq, seq, dtype=torch.bool)
    if causal:
        allowed = allowed & (order[None, :] <= order[:, None])
    if docs is not None:
        allowed = allowed & (docs[:, None, None, :] == docs[:, None, :, None])
    return allowed


def _sdpa(q, k, v, allowed, scale):
    """(b, s, h, d) in, (b, s, h, dv) out; attention over the full sequence."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                         scale=scale)
    return out.transpose(1, 2)


class _Layout:
    """How the full sequence is cut across the SP ranks: zig-zag, or plain contiguous (masks must not care)."""

    def __init__(self, kind: str, seq: int, group) -> None:
        self.kind, self.seq, self.group = kind, seq, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "zigzag":
            return zigzag_split(x, 1, self.rank, self.size)
        return x.chunk(self.size, dim=1)[self.rank]

    def positions(self) -> torch.Tensor:
        if self.kind == "zigzag":
            return zigzag_positions(self.seq, self.rank, self.size)[None]
        return self.split(torch.arange(self.seq)[None])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "zigzag":
            return zigzag_gather(x, 1, self.group)
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)


def _max_diffs(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: (ours[name].double() - ref[name].double()).abs().max().item() for name in ref}


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values with a last-dim stride of 2 (as a slice of a fused projection would have)."""
    return torch.stack((x, x), dim=-1)[..., 0]


def _expanded_case(case: str, group, seed: int) -> dict[str, float]:
    batch, seq, heads, d, dv, causal, packed, kind = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, batch, seq, heads, d, generator=gen).unbind(0)
    v, dout = torch.randn(2, batch, seq, heads, dv, generator=gen).unbind(0)
    docs = _documents(batch, seq, gen) if packed else None
    scale = d**-0.5
    full = {"q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_()}
    ref_out = _sdpa(*full.values(), _allowed(seq, docs, causal), scale)
    ref_out.backward(dout)
    ref = {"out": ref_out.detach()} | {f"d{n}": t.grad for n, t in full.items()}

    layout = _Layout(kind, seq, group)
    local = {n: layout.split(t.detach()).requires_grad_() for n, t in full.items()}
    out = ring_attention(*(_strided(t) for t in local.values()), group=group, scale=scale, causal=causal,
                         positions=layout.positions(), document_ids=layout.split(docs) if packed else None)
    out.backward(layout.split(dout))
    ours = {"out": layout.gather(out.detach())} | {f"d{n}": layout.gather(t.grad) for n, t in local.items()}
    return _max_diffs(ours, ref)


def _latent_inputs(dtype: torch.dtype, seed: int):
    c = LATENT
    gen = torch.Generator().manual_seed(seed)
    b, s, h = c["batch"], c["seq"], c["heads"]
    tensors = {
        "q_nope": torch.randn(b, s, h, c["nope"], generator=gen),
        "q_rope": torch.randn(b, s, h, c["rope"], generator=gen),
        "latent": torch.randn(b, s, c["rank"], generator=gen),
        "k_rope": torch.randn(b, s, c["rope"], generator=gen),
        "kv_up_weight": torch.randn(h * (c["nope"] + c["v"]), c["rank"], generator=gen) / c["rank"] ** 0.5,
    }
    dout = torch.randn(b, s, h, c["v"], generator=gen)
    return {n: t.to(dtype) for n, t in tensors.items()}, dout.to(dtype), _documents(b, s, gen)


def _expanded_latent_reference(q_nope, q_rope, latent, k_rope, kv_up_weight, allowed, scale):
    """What MultiLatentAttention._expanded computes (single rank, full sequence)."""
    c = LATENT
    b, s, h = c["batch"], c["seq"], c["heads"]
    kv = F.linear(latent, kv_up_weight).view(b, s, h, c["nope"] + c["v"])
    k_nope, v = kv.split([c["nope"], c["v"]], dim=-1)
    k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, h, -1)), dim=-1)
    return _sdpa(torch.cat((q_nope, q_rope), dim=-1), k, v, allowed, scale)


def _latent_case(group, seed: int, causal: bool, packed: bool) -> dict[str, float]:
    c = LATENT
    inputs, dout, docs = _latent_inputs(torch.float32, seed)
    docs = docs if packed else None
    scale = (c["nope"] + c["rope"]) ** -0.5
    full = {n: t.requires_grad_() for n, t in inputs.items()}
    ref_out = _expanded_latent_reference(*full.values(), _allowed(c["seq"], docs, causal), scale)
    ref_out.backward(dout)
    ref = {"out": ref_out.detach()} | {f"d{n}": t.grad for n, t in full.items()}

    layout = _Layout("zigzag", c["seq"], group)
    local = {n: (t if n == "kv_up_weight" else layout.split(t)).detach().requires_grad_() for n, t in inputs.items()}
    out = ring_attention_latent(*local.values(), num_heads=c["heads"], nope_dim=c["nope"], v_dim=c["v"], group=group,
                                scale=scale, causal=causal, positions=layout.positions(),
                                document_ids=layout.split(docs) if packed else None)
    out.backward(layout.split(dout))
    ours = {"out": layout.gather(out.detach())}
    ours |= {f"d{n}": layout.gather(t.grad) for n, t in local.items() if n != "kv_up_weight"}
    weight_grad = local["kv_up_weight"].grad.clone()
    dist.all_reduce(weight_grad, group=group)  # each rank holds its queries' share
    ours["dkv_up_weight"] = weight_grad
    return _max_diffs(ours, ref)


def _bf16_case(group, seed: int) -> dict[str, float]:
    """bf16 inputs against fp32 attention on the same (rounded) inputs: mean abs errors of the output,
    then the latent option's max output error and its gradients' max error relative to their size.

    ``ring_bf16_merge`` rounds the running output and log-sum-exp to bf16 after every merge (a naive
    bf16 accumulator, simulated by wrapping ``_merge``): it is what the fp32 accumulators avoid.
    """
    rank, sp = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 1, 64, 4, 16, generator=gen).bfloat16().unbind(0)
    q = q * 2  # peakier softmax: larger log-sum-exps, where bf16 rounding hurts
    exact = _sdpa(q.float(), k.float(), v.float(), _allowed(64, None, True), 0.25)
    errors = {"sdpa_bf16": (_sdpa(q, k, v, _allowed(64, None, True), 0.25).float() - exact).abs().mean().item()}
    local = [zigzag_split(t, 1, rank, sp) for t in (q, k, v)]
    positions = zigzag_positions(64, rank, sp)[None]
    fp32_merge = ra._merge

    def bf16_merge(out, lse, blk_out, blk_lse):
        fp32_merge(out, lse, blk_out, blk_lse)
        out.copy_(out.bfloat16())
        lse.copy_(lse.bfloat16())

    for name, merge in (("ring", fp32_merge), ("ring_bf16_merge", bf16_merge)):
        ra._merge = merge
        try:
            out = ring_attention(*local, group=group, scale=0.25, positions=positions)
        finally:
            ra._merge = fp32_merge
        assert out.dtype == torch.bfloat16
        errors[name] = (zigzag_gather(out, 1, group).float() - exact).abs().mean().item()

    c = LATENT
    inputs, dout, docs = _latent_inputs(torch.bfloat16, seed)
    scale = (c["nope"] + c["rope"]) ** -0.5
    full = [t.float().requires_grad_() for t in inputs.values()]
    exact = _expanded_latent_reference(*full, _allowed(c["seq"], docs, True), scale)
    exact.backward(dout.float())
    layout = _Layout("zigzag", c["seq"], group)
    local = [(t if n == "kv_up_weight" else layout.split(t)).detach().requires_grad_() for n, t in inputs.items()]
    out = ring_attention_latent(*local, num_heads=c["heads"], nope_dim=c["nope"], v_dim=c["v"], group=group,
                                scale=scale, causal=True, positions=layout.positions(),
                                document_ids=layout.split(docs))
    out.backward(layout.split(dout))
    errors["latent_out_max"] = (layout.gather(out.detach()).float() - exact.detach()).abs().max().item()
    weight_grad = local[-1].grad.float()
    dist.all_reduce(weight_grad, group=group)
    grads = [layout.gather(t.grad).float() for t in local[:-1]] + [weight_grad]
    # bf16 gradients, relative to the size of the fp32 gradient
    errors["latent_grad_rel"] = max(((g - f.grad).abs().max() / f.grad.abs().max()).item()
                                    for g, f in zip(grads, full, strict=True))
    return errors


def _traffic_case(group, sp: int) -> dict[str, int]:
    """Bytes per rank for the full model's MLA dims (16 heads, nope 64, rope 32, v 64, kv rank 256), bf16."""
    heads, nope, rope, v_dim, rank, seq = 16, 64, 32, 64, 256, 8 * sp
    gen = torch.Generator().manual_seed(3)
    q_nope = torch.randn(1, seq, heads, nope, generator=gen).bfloat16()
    q_rope = torch.randn(1, seq, heads, rope, generator=gen).bfloat16()
    latent = torch.randn(1, seq, rank, generator=gen).bfloat16()
    k_rope = torch.randn(1, seq, rope, generator=gen).bfloat16()
    weight = (torch.randn(heads * (nope + v_dim), rank, generator=gen) / rank**0.5).bfloat16()
    layout = _Layout("zigzag", seq, group)
    local = [layout.split(t).requires_grad_() for t in (q_nope, q_rope, latent, k_rope)]
    kw = {"group": group, "scale": 0.1, "positions": layout.positions()}
    result = {}
    ra.traffic.reset()
    out = ring_attention_latent(*local, weight.requires_grad_(), num_heads=heads, nope_dim=nope, v_dim=v_dim, **kw)
    out.sum().backward()
    result["latent"] = (ra.traffic.forward_bytes, ra.traffic.backward_bytes, ra.traffic.forward_hops)
    with torch.no_grad():
        kv = F.linear(local[2], weight).view(*local[2].shape[:2], heads, nope + v_dim)
        k = torch.cat((kv[..., :nope], local[3][:, :, None].expand(-1, -1, heads, -1)), dim=-1)
        v = kv[..., nope:]
    q = torch.cat(local[:2], dim=-1).detach()
    ra.traffic.reset()
    ring_attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), **kw).sum().backward()
    result["full"] = (ra.traffic.forward_bytes, ra.traffic.backward_bytes, ra.traffic.forward_hops)
    return result


def _parity_body(seed: int) -> dict:
    dist.init_process_group("gloo")
    sp = dist.get_world_size()
    results: dict = {"expanded": {case: _expanded_case(case, None, seed) for case in CASES}}
    results["latent"] = {f"causal={c},packed={p}": _latent_case(None, seed, c, p)
                         for c, p in ((True, False), (True, True), (False, True))}
    results["bf16"] = _bf16_case(None, seed)
    results["traffic"] = _traffic_case(None, sp)
    # SP groups inside the world whose group ranks differ from the global ranks: two interleaved
    # groups {0, 2}, {1, 3} at 4 ranks; at 2 ranks, one group per rank (sp=1, a ring without hops).
    members = [[0, 2], [1, 3]] if sp == 4 else [[0], [1]]
    groups = [dist.new_group(ranks) for ranks in members]
    mine = groups[dist.get_rank() % 2]
    results["subgroup"] = _expanded_case("causal_packed", mine, seed + dist.get_rank() % 2)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["sp2", "sp4"])
def parity(request):
    ranks = run_ranks(_parity_body, request.param, 0, timeout=120)
    return request.param, ranks


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_matches_sdpa_forward_and_backward(parity, case):
    sp, ranks = parity
    for rank, result in enumerate(ranks):
        diffs = result["expanded"][case]
        assert max(diffs.values()) <= TOL, f"sp={sp} rank {rank} {case}: {diffs}"


def test_ring_attention_in_subgroups_whose_ranks_are_not_global_ranks(parity):
    _, ranks = parity
    for rank, result in enumerate(ranks):
        assert max(result["subgroup"].values()) <= TOL, f"rank {rank}: {result['subgroup']}"


@pytest.mark.parametrize("variant", ["causal=True,packed=False", "causal=True,packed=True", "causal=False,packed=True"])
def test_latent_ring_matches_expanded_attention_incl_kv_up_gradient(parity, variant):
    sp, ranks = parity
    for rank, result in enumerate(ranks):
        diffs = result["latent"][variant]
        assert set(diffs) == {"out", "dq_nope", "dq_rope", "dlatent", "dk_rope", "dkv_up_weight"}
        assert max(diffs.values()) <= TOL, f"sp={sp} rank {rank} {variant}: {diffs}"


def test_bf16_inputs_stay_close_to_fp32_because_the_merge_is_fp32(parity):
    sp, ranks = parity
    errors = ranks[0]["bf16"]
    # fp32 accumulators: splitting the keys over sp ranks costs about what one fused bf16 kernel does ...
    assert errors["ring"] <= 1.5 * errors["sdpa_bf16"], f"sp={sp}: {errors}"
    # ... while bf16 accumulators would be clearly worse (and grow with sp).
    assert errors["ring_bf16_merge"] >= 1.4 * errors["ring"], f"sp={sp}: {errors}"
    assert errors["latent_out_max"] <= 2e-2 and errors["latent_grad_rel"] <= 2e-2, f"sp={sp}: {errors}"


def test_latent_option_sends_under_0_3_of_the_full_kv_bytes(parity):
    sp, ranks = parity
    heads, nope, rope, v_dim, rank, seq_local = 16, 64, 32, 64, 256, 8
    for result in ranks:
        (lat_fwd, lat_bwd, hops), (full_fwd, full_bwd, _) = result["traffic"]["latent"], result["traffic"]["full"]
        assert hops == sp - 1
        # forward: sp-1 hops of the block (bf16); zig-zag rows without documents send no positions
        assert full_fwd == (sp - 1) * seq_local * heads * (nope + rope + v_dim) * 2
        assert lat_fwd == (sp - 1) * seq_local * (rank + rope) * 2
        # backward: sp-1 hops of the block again, and sp hops of its fp32 gradient
        assert full_bwd == seq_local * heads * (nope + rope + v_dim) * ((sp - 1) * 2 + sp * 4)
        assert lat_bwd == seq_local * (rank + rope) * ((sp - 1) * 2 + sp * 4)
        assert lat_fwd / full_fwd <= 0.3 and lat_bwd / full_bwd <= 0.3, (lat_fwd / full_fwd, lat_bwd / full_bwd)


# --- zig-zag helpers and the tile plan -----------------------------------------------------


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_zigzag_gives_every_rank_the_same_causal_work_and_skips_masked_tiles(sp):
    seq = 2 * sp * 16
    metas = [zigzag_positions(seq, rank, sp)[None, None] for rank in range(sp)]
    work, skipped = [], []
    for rank in range(sp):
        plans = [ra._plan(metas[rank], metas[src], True) for src in range(sp)]
        tiles = [tile for plan in plans for group in plan for tile in group]
        assert all(tile.allowed() is None for tile in tiles)  # zig-zag causal needs no explicit mask
        work.append(sum(1 if tile.causal else 2 for tile in tiles))  # a diagonal tile is half a full one
        skipped.append(4 * sp - len(tiles))
    # The causal triangle over 2·sp chunks is (2·sp)² units; each rank does 1/sp of it and skips
    # the 2·sp-1 tiles that lie wholly above the diagonal.
    assert work == [4 * sp] * sp
    assert skipped == [2 * sp - 1] * sp


def test_a_tile_marks_query_rows_that_see_none_of_its_keys_and_skips_when_none_do():
    positions = torch.arange(3)[None]
    q_meta = torch.stack([positions, torch.tensor([[0, 1, 0]])])  # positions, then document ids
    k_meta = torch.stack([positions, torch.tensor([[0, 0, 0]])])
    [[tile]] = ra._plan(q_meta, k_meta, False)
    assert tile.empty_rows.tolist() == [[False, True, False]]
    assert (~tile.allowed()[0, 0]).tolist() == [[False] * 3, [True] * 3, [False] * 3]
    other_document = torch.stack([positions, torch.full((1, 3), 7)])
    assert ra._plan(q_meta, other_document, False) == []


def test_zigzag_split_holds_chunks_r_and_2sp_minus_1_minus_r():
    x = torch.arange(16).view(1, 16)
    assert zigzag_split(x, 1, 0, 4).tolist() == [[0, 1, 14, 15]]
    assert zigzag_split(x, 1, 3, 4).tolist() == [[6, 7, 8, 9]]
    for rank in range(4):
        assert torch.equal(zigzag_positions(16, rank, 4), zigzag_split(torch.arange(16), 0, rank, 4))


def _gather_body() -> list[bool]:
    dist.init_process_group("gloo")
    rank, sp = dist.get_rank(), dist.get_world_size()
    x = torch.randn(2, 3, 24, 5, generator=torch.Generator().manual_seed(1))
    back = zigzag_gather(zigzag_split(x, 2, rank, sp), 2, None)
    positions = zigzag_gather(zigzag_positions(24, rank, sp), 0, None)
    return [torch.equal(back, x), torch.equal(positions, torch.arange(24))]


def test_zigzag_gather_inverts_split():
    assert run_ranks(_gather_body, 3) == [[True, True]] * 3


# --- errors ----------------------------------------------------------------------------------


def test_zigzag_errors_name_the_length_and_the_fix():
    with pytest.raises(RingLayoutError, match=r"has 10 rows, not a multiple of 2\*sp = 4.*pad or pack"):
        zigzag_split(torch.zeros(10), 0, 0, 2)
    with pytest.raises(RingLayoutError, match="not a multiple of 2"):
        zigzag_positions(12, 1, 4)
    with pytest.raises(RingLayoutError, match="sp_rank=2, sp_size=2"):
        zigzag_positions(8, 2, 2)


def test_ring_attention_without_process_group_says_so():
    x = torch.zeros(1, 4, 1, 2)
    with pytest.raises(RingLayoutError, match="needs torch.distributed initialised"):
        ring_attention(x, x, x, group=None, scale=1.0, positions=torch.arange(4)[None])


def _errors_body() -> dict[str, str]:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pos = zigzag_positions(8, rank, 2)[None]
    x = torch.zeros(1, 4, 2, 3)

    def attempt(**over) -> str:
        args = {"q": x, "k": x, "v": x, "positions": pos} | over
        q, k, v, positions = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("positions")
        try:
            ring_attention(q, k, v, group=None, scale=1.0, positions=positions, **args)
        except RingLayoutError as err:
            return str(err)
        return "no error"

    short = torch.zeros(1, 3, 2, 3)
    return {
        "seq_local": attempt(q=short, k=short, v=short, positions=pos[:, :3]) if rank else attempt(),
        "dtype_local": attempt(k=x.bfloat16()) if rank == 0 else attempt(),
        "dtype_across": attempt(q=x.bfloat16(), k=x.bfloat16(), v=x.bfloat16()) if rank else attempt(),
        "positions": attempt(positions=pos.float()),
        "documents": attempt(document_ids=torch.zeros(3, 4, dtype=torch.long)),
        "qk": attempt(k=torch.zeros(1, 4, 2, 5)),
        "causal": attempt(causal=bool(rank)),
        "latent_weight": _latent_weight_error(rank),
    }


def _latent_weight_error(rank: int) -> str:
    latent, k_rope = torch.zeros(1, 4, 6), torch.zeros(1, 4, 2)
    try:
        ring_attention_latent(torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 2, 2), latent, k_rope, torch.zeros(9, 6),
                              num_heads=2, nope_dim=3, v_dim=4, group=None, scale=1.0,
                              positions=zigzag_positions(8, rank, 2)[None])
    except RingLayoutError as err:
        return str(err)
    return "no error"


def test_bad_inputs_fail_on_every_rank_with_a_clear_message():
    errors = run_ranks(_errors_body, 2)
    for rank in (0, 1):
        assert "disagree on seq_local [4, 3]" in errors[rank]["seq_local"]
        assert "zigzag_split" in errors[rank]["seq_local"]
        assert "disagree on dtype [torch.float32, torch.bfloat16]" in errors[rank]["dtype_across"]
        assert "positions has dtype torch.float32; expected an integer dtype" in errors[rank]["positions"]
        assert "document_ids has shape (3, 4); expected (batch or 1, seq_local) = (1 or 1, 4)" in \
            errors[rank]["documents"]
        assert "q and k must have one shape" in errors[rank]["qk"]
        assert "disagree on causal [0, 1]" in errors[rank]["causal"]
        assert "kv_up_weight has shape (9, 6); expected (num_heads*(nope_dim+v_dim), kv_rank) = (14, 6)" in \
            errors[rank]["latent_weight"]
    assert "must share one dtype and device; got q torch.float32 on cpu, k torch.bfloat16" in \
        errors[0]["dtype_local"]
    assert "SP rank(s) [0] rejected their inputs" in errors[1]["dtype_local"]
    assert os.environ.get("RANK") is None  # the ranks' environment stayed in the ranks
