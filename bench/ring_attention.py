"""Ring attention at SP=2 (two gloo CPU ranks) vs single-rank attention over the full sequence.

One causal attention layer of the full model's MLA shape (nope 64, rope 32, v 64, kv_lora_rank
256; ``--heads`` of its 16 heads), fp32, batch 1, forward + backward. Every variant starts from the
same MLA inputs (q_nope, q_rope, the normed latent, the rotated rope key, the kv_up weight) and
returns the gradients of all of them:

    single        one process, the whole machine (2 threads): ``MLA's ExpandedAttention core``'s
                  computation on all ``--seq`` tokens (kv_up expansion, v zero-padded, fused SDPA,
                  is_causal). The peer.
    ring_latent   2 ranks x 1 thread, zig-zag halves: ``ring_attention_latent`` (latent + rope key
                  travel, each rank expands the block it holds).
    ring_kv       2 ranks x 1 thread: kv_up expanded locally, then ``ring_attention`` (full K/V travel).

Memory: each variant runs in fresh processes. Per rank, the peak resident set (``getrusage``
ru_maxrss) during the first step minus the resident set just before it (inputs built, nothing
run): everything the step made the OS hand over, i.e. activations, saved tensors, gradients,
ring buffers, kernel workspace and allocator slack; the inputs themselves are excluded, and a rank
holds half of them. Time: median of ``--steps`` further steps. Bytes: ``ring_attention.traffic``
(everything a rank sends per step, positions included). The outputs' and gradients' checksums are
compared across variants, so the three compute the same thing. Memory and bytes are deterministic;
times are one step each and move with whatever else runs on the machine (the JSON records the load).

    python -m bench.ring_attention [--seq 16384] [--heads 16] [--steps 1]

Writes bench/out/ring_attention.json. Headline: per-rank memory of ring_latent vs single (goal
<= 0.6x); also latent vs full-K/V bytes per hop (goal <= 0.3x).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import machine, write_result
from tests.parallel.harness import run_ranks
from xoron_dist.parallel import ring_attention as ra
from xoron_dist.parallel.sequence import zigzag_positions

NOPE, ROPE, V_DIM, KV_RANK = 64, 32, 64, 256  # the full model's MLA head dims (heads: --heads)
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(seq: int, heads: int, rank: int, sp: int) -> dict[str, torch.Tensor]:
    """This rank's share of seeded MLA inputs: the sequence is 4 seeded chunks, a ring rank (sp=2) holds
    chunks rank and 3-rank (zig-zag), the single rank all 4; the full sequence never exists on a ring rank."""
    shapes = {"q_nope": (heads, NOPE), "q_rope": (heads, ROPE), "latent": (KV_RANK,), "k_rope": (ROPE,),
              "dout": (heads, V_DIM)}

    def chunk(c: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1 + c)
        return {name: torch.randn(1, seq // 4, *shape, generator=gen) for name, shape in shapes.items()}

    held = [chunk(c) for c in range(4)] if sp == 1 else [chunk(rank), chunk(3 - rank)]
    local = {name: torch.cat([c[name] for c in held], dim=1) for name in shapes}
    gen = torch.Generator().manual_seed(0)
    local["kv_up_weight"] = torch.randn(heads * (NOPE + V_DIM), KV_RANK, generator=gen) / KV_RANK**0.5
    return local


def _expand(latent, weight, heads):
    kv = F.linear(latent, weight).view(*latent.shape[:2], heads, NOPE + V_DIM)
    return kv.split([NOPE, V_DIM], dim=-1)


def _single_step(x: dict[str, torch.Tensor], heads: int, scale: float) -> torch.Tensor:
    """MLA's ExpandedAttention core on the full sequence; returns out (1, seq, h, v)."""
    k_nope, v = _expand(x["latent"], x["kv_up_weight"], heads)
    k = torch.cat((k_nope, x["k_rope"][:, :, None].expand(-1, -1, heads, -1)), dim=-1)
    q = torch.cat((x["q_nope"], x["q_rope"]), dim=-1)
    v = F.pad(v, (0, NOPE + ROPE - V_DIM))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)[..., :V_DIM]


def _ring_latent_step(x, heads, scale, positions):
    return ra.ring_attention_latent(x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["kv_up_weight"],
                                    num_heads=heads, nope_dim=NOPE, v_dim=V_DIM, group=None, scale=scale,
                                    causal=True, positions=positions)


def _ring_kv_step(x, heads, scale, positions):
    k_nope, v = _expand(x["latent"], x["kv_up_weight"], heads)
    k = torch.cat((k_nope, x["k_rope"][:, :, None].expand(-1, -1, heads, -1)), dim=-1)
    q = torch.cat((x["q_nope"], x["q_rope"]), dim=-1)
    return ra.ring_attention(q, k, v, group=None, scale=scale, causal=True, positions=positions)


def _variant_body(variant: str, seq: int, heads: int, steps: int) -> dict:
    sp = 1
    if variant != "single":
        dist.init_process_group("gloo")
        sp = dist.get_world_size()
    rank = dist.get_rank() if sp > 1 else 0
    x = _inputs(seq, heads, rank, sp)
    dout = x.pop("dout")
    for t in x.values():
        t.requires_grad_()
    scale = (NOPE + ROPE) ** -0.5
    positions = zigzag_positions(seq, rank, sp)[None]

    def step() -> torch.Tensor:
        for t in x.values():
            t.grad = None
        if variant == "single":
            out = _single_step(x, heads, scale)
        elif variant == "ring_latent":
            out = _ring_latent_step(x, heads, scale, positions)
        else:
            out = _ring_kv_step(x, heads, scale, positions)
        out.backward(dout)
        return out.detach()

    before = _rss()
    ra.traffic.reset()
    start = time.perf_counter()
    out = step()
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    sent = (ra.traffic.forward_bytes, ra.traffic.total_bytes, ra.traffic.forward_hops)
    sums = [out.double().sum().item()] + [t.grad.double().sum().item() for t in x.values()]
    del out
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    if sp > 1:
        dist.barrier()
    return {"peak_bytes": peak, "seconds": statistics.median(seconds) if seconds else first, "first_step_s": first,
            "sent": sent, "sums": sums, "threads": torch.get_num_threads()}


def run_variant(variant: str, seq: int, heads: int, steps: int) -> dict:
    ranks = run_ranks(_variant_body, 1 if variant == "single" else 2, variant, seq, heads, steps, timeout=900)
    sums = [sum(r["sums"][i] for r in ranks) for i in range(len(ranks[0]["sums"]))]
    # kv_up_weight's gradient: each ring rank holds its share; the sum over ranks is the full gradient.
    return {"peak_mib": max(r["peak_bytes"] for r in ranks) / MIB, "seconds": max(r["seconds"] for r in ranks),
            "forward_bytes": ranks[0]["sent"][0], "step_bytes": ranks[0]["sent"][1],
            "hops": ranks[0]["sent"][2], "sums": sums, "threads_per_rank": ranks[0]["threads"], "ranks": len(ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the first (measured) one")
    args = parser.parse_args()
    if args.seq % 4:
        raise SystemExit(f"--seq {args.seq}: must be a multiple of 4 (2*sp chunks at sp=2)")
    # Every allocation of 64 KiB or more gets its own mapping and is unmapped when freed, so the
    # resident set follows the live tensors (glibc's default would keep freed blocks in the heap,
    # where a later step could reuse them unseen). Read by the ranks' forkserver when it starts.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    load = os.getloadavg()[0]  # the machine may be shared: times are only as steady as it is
    results = {v: run_variant(v, args.seq, args.heads, args.steps) for v in ("single", "ring_latent", "ring_kv")}
    names = ["out", "d q_nope", "d q_rope", "d latent", "d k_rope", "d kv_up_weight"]
    for variant in ("ring_latent", "ring_kv"):
        for name, a, b in zip(names, results["single"]["sums"], results[variant]["sums"], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{variant} {name}: checksum {b} vs single {a}"

    single, latent, kv = results["single"], results["ring_latent"], results["ring_kv"]
    per_hop = {v: results[v]["forward_bytes"] / results[v]["hops"] for v in ("ring_latent", "ring_kv")}
    print(f"\ncausal MLA attention fwd+bwd, fp32, seq {args.seq}, {args.heads} heads (nope {NOPE}, rope {ROPE}, "
          f"v {V_DIM}, kv_rank {KV_RANK})")
    print(f"  {'variant':<12} {'ranks x thr':>11} {'peak MiB/rank':>14} {'s/step':>8} {'fwd MiB/hop':>12} "
          f"{'MiB sent/step':>14}")
    for name, r in results.items():
        hop = r["forward_bytes"] / r["hops"] / MIB if r["hops"] else 0.0
        sent = r["step_bytes"] / MIB
        print(f"  {name:<12} {r['ranks']:>6} x {r['threads_per_rank']:<2} {r['peak_mib']:>14.1f} {r['seconds']:>8.2f} "
              f"{hop:>12.2f} {sent:>14.2f}")
    memory_ratio = latent["peak_mib"] / single["peak_mib"]
    bytes_ratio = per_hop["ring_latent"] / per_hop["ring_kv"]
    step_bytes_ratio = latent["step_bytes"] / kv["step_bytes"]
    print(f"  per-rank memory ring_latent / single = {memory_ratio:.3f} (goal <= 0.6); "
          f"ring_kv / single = {kv['peak_mib'] / single['peak_mib']:.3f}")
    print(f"  bytes per forward hop latent / full K/V = {bytes_ratio:.3f} (goal <= 0.3); per step (fwd+bwd) "
          f"{step_bytes_ratio:.3f}")
    print(f"  time per step ring_latent / single = {latent['seconds'] / single['seconds']:.2f}")

    result = {
        "metric": "per-rank peak activation memory (RSS high-water delta) of one causal MLA attention fwd+bwd, "
                  "SP=2 ring with the latent option vs one rank on the whole sequence; lower is better, "
                  "ratio = peer/ours",
        "unit": "MiB",
        "ours": round(latent["peak_mib"], 1),
        "peer": round(single["peak_mib"], 1),
        "peer_name": "single rank, full sequence, MLA's ExpandedAttention core's computation (fused SDPA)",
        "ratio": round(single["peak_mib"] / latent["peak_mib"], 3),
        "goal": round(1 / 0.6, 3),
        "machine": machine(),
        "config": {"seq": args.seq, "heads": args.heads, "nope": NOPE, "rope": ROPE, "v": V_DIM, "kv_rank": KV_RANK,
                   "dtype": "float32", "batch": 1, "causal": True, "sp": 2},
        "memory_ratio_ring_latent_vs_single": round(memory_ratio, 3),
        "memory_ratio_ring_kv_vs_single": round(kv["peak_mib"] / single["peak_mib"], 3),
        "bytes_per_hop": {"ring_latent": per_hop["ring_latent"], "ring_kv": per_hop["ring_kv"],
                          "ratio": round(bytes_ratio, 4), "goal": 0.3},
        "bytes_per_step": {v: results[v]["step_bytes"] for v in ("ring_latent", "ring_kv")}
                          | {"ratio": round(step_bytes_ratio, 4)},
        "seconds_per_step": {v: round(r["seconds"], 3) for v, r in results.items()},
        "load_average_1min_at_start": round(load, 2),
        "variants": {v: {k: val for k, val in r.items() if k != "sums"} for v, r in results.items()},
    }
    print(f"\n-> {write_result('ring_attention', result)}")


if __name__ == "__main__":
    main()
