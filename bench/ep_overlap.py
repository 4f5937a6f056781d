"""Expert-parallel MoE layer (EP=2, two gloo CPU ranks): pipelined dispatch chunks vs DeepSpeed's MoE(ep_size=2).

Each rank routes its own tokens through the whole MoE layer (router, routed experts spread over the two
ranks, shared expert) and runs forward, a mean-square loss and backward, alternating the variants round by
round (bench/common.py) in the same two processes; a rank's time per call is the slower rank's.

- ours@N: ``MoEFeedForward`` whose routed experts are our EP container (``ExpertParallelExperts``) with
  ``overlap_chunks=N`` (``train.ep_overlap_chunks``): N=1 is the unpipelined dispatch, N>1 starts every
  chunk's all-to-all at once and computes chunk c while the others travel (parallel/experts.py).
- deepspeed: ``deepspeed.moe.layer.MoE(ep_size=2)`` (top-2 softmax gate, dropless ``drop_tokens=False``, its
  einsum dispatch padded to the busiest expert's capacity) over the same EP group, a SwiGLU expert of the same
  width, plus the same shared expert added alongside.

    python -m bench.ep_overlap [--cases tiny@4096,mid@2048,full@512] [--chunks 1,2,4] [--rounds 5]

Writes bench/out/ep_overlap.json; headline: the best of ours over the chunk counts vs DeepSpeed at ``mid``, and
the chunked vs the unchunked dispatch per case. On gloo the exchange is a memcpy through the same two cores
that compute (its worker thread competes with the matmuls), so the pipeline can hide little; on NCCL the
exchange runs on the network / NVLink engines beside the SM work and the overlap can hide up to the shorter of
the two.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

import torch

from bench.common import machine, time_alternating, write_result
from tests.parallel.harness import run_ranks

CASES = {"tiny": (128, 64), "mid": (512, 512), "full": (1024, 1408)}  # name -> (hidden, expert width)
DEFAULT_CASES = "tiny@4096,mid@2048,full@512"
HEADLINE = "mid"
NUM_EXPERTS, TOP_K = 8, 2


def _body(hidden: int, inter: int, tokens: int, chunk_counts: list[int], rounds: int) -> dict:
    import deepspeed

    from bench.moe_layer import DeepSpeedMoEWithShared, make_call
    from xoron_dist.config import MoEConfig, load_config
    from xoron_dist.model.common.moe import MoEFeedForward
    from xoron_dist.parallel import state
    from xoron_dist.parallel.experts import build_expert_parallel_experts, expert_split

    cfg = load_config(None, ["preset=tiny", "parallel.ep=2"])
    ctx = state.initialize(cfg)
    moe_cfg = MoEConfig(num_experts=NUM_EXPERTS, num_shared_experts=1, top_k=TOP_K, expert_intermediate_size=inter)
    torch.manual_seed(0)  # the same full weights on both ranks; each keeps its experts
    base = MoEFeedForward(hidden, moe_cfg).train()
    with torch.no_grad():
        for param in base.parameters():
            param.normal_(std=0.02)
    fns = {}
    for chunks in chunk_counts:
        layer = MoEFeedForward(hidden, moe_cfg).train()
        layer.load_state_dict(base.state_dict())
        layer.experts = build_expert_parallel_experts(layer.experts, replace(expert_split(cfg), overlap_chunks=chunks))
        fns[f"ours@{chunks}"] = layer
    torch.manual_seed(1)
    peer = DeepSpeedMoEWithShared(hidden, inter, ep_size=2, num_experts=NUM_EXPERTS, top_k=TOP_K).train()
    with torch.no_grad():
        for param in peer.parameters():
            param.normal_(std=0.02)
    torch.manual_seed(100 + ctx.dp_rank)  # each rank its own tokens
    x = torch.randn(1, tokens, hidden)
    with torch.no_grad():  # every chunk count computes the same layer
        outs = [module(x) for name, module in fns.items()]
        diff = max((out - outs[0]).abs().max().item() for out in outs)
        assert diff < 1e-5, f"chunked dispatch differs from one chunk by {diff}"
    calls = {name: make_call(module, x) for name, module in fns.items()} | {"deepspeed": make_call(peer, x)}
    calls["exchanges"] = _exchanges_only(tokens * TOP_K, hidden)
    reps = max(1, 2048 // tokens)
    seconds = time_alternating(calls, rounds=rounds, reps=reps)
    return {"seconds": seconds, "deepspeed": deepspeed.__version__, "threads": torch.get_num_threads()}


def _exchanges_only(rows: int, hidden: int):
    """The four all-to-alls one dispatch pays (forward out and back, backward out and back) for ``rows``
    (token, choice) rows, half of them for the other rank, and nothing else: the most an overlap can hide."""
    import torch.distributed as dist

    data, out = torch.randn(rows, hidden), torch.empty(rows, hidden)

    def call() -> None:
        for _ in range(4):
            dist.all_to_all_single(out, data)

    return call


def run_case(case: str, chunk_counts: list[int], rounds: int) -> dict:
    match = re.fullmatch(r"(\w+)@(\d+)", case)
    if not match or match.group(1) not in CASES:
        raise SystemExit(f"case '{case}' must look like NAME@TOKENS with NAME in {sorted(CASES)}")
    name, tokens = match.group(1), int(match.group(2))
    hidden, inter = CASES[name]
    ranks = run_ranks(_body, 2, hidden, inter, tokens, chunk_counts, rounds, timeout=900, threads_per_rank=1)
    seconds = {n: max(r["seconds"][n] for r in ranks) for n in ranks[0]["seconds"]}  # the slower rank's time
    tps = {n: tokens / s for n, s in seconds.items()}
    best = max((n for n in tps if n.startswith("ours")), key=tps.get)
    exchange_share = seconds.pop("exchanges") / seconds["ours@1"]
    tps.pop("exchanges")
    print(f"\n{case} per rank: hidden {hidden}, {NUM_EXPERTS}+1 experts of {inter}, top-{TOP_K}, EP=2 on 2 gloo ranks")
    for n in seconds:
        print(f"  {n:<10} {seconds[n] * 1e3:>9.1f} ms/call {tps[n]:>10.0f} tokens/s per rank")
    print(f"  the exchanges alone: {exchange_share:.1%} of ours@1's time (the most an overlap can hide)")
    print(f"  best ours ({best}) / deepspeed = {tps[best] / tps['deepspeed']:.3f}; "
          + ", ".join(f"{n} / ours@1 = {tps[n] / tps['ours@1']:.3f}" for n in tps if n.startswith("ours@")))
    return {"tokens_per_s_per_rank": {k: round(v, 1) for k, v in tps.items()}, "best_ours": best,
            "ratio": round(tps[best] / tps["deepspeed"], 3),
            "chunked_vs_one": {n: round(tps[n] / tps["ours@1"], 3) for n in tps if n.startswith("ours@")},
            "exchange_share_of_ours@1": round(exchange_share, 3),
            "hidden": hidden, "expert_intermediate_size": inter, "tokens_per_rank": tokens,
            "deepspeed": ranks[0]["deepspeed"], "threads_per_rank": ranks[0]["threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    if 1 not in chunk_counts:
        raise SystemExit(f"--chunks {args.chunks}: include 1 (the unchunked dispatch every ratio is taken against)")
    cases = {case.split("@")[0]: run_case(case, chunk_counts, args.rounds) for case in args.cases.split(",")}
    head_name = HEADLINE if HEADLINE in cases else next(iter(cases))
    head = cases[head_name]
    result = {
        "metric": f"MoE layer tokens/s per rank (forward + backward, EP=2 on 2 gloo CPU ranks), case {head_name}, "
                  "best chunk count; higher is better",
        "unit": "tokens/s per rank",
        "ours": head["tokens_per_s_per_rank"][head["best_ours"]],
        "peer": head["tokens_per_s_per_rank"]["deepspeed"],
        "peer_name": f"deepspeed {head['deepspeed']} moe.layer.MoE(ep_size=2, drop_tokens=False) + shared expert",
        "ratio": head["ratio"],
        "goal": 1.2,
        "machine": f"{machine()} (bench ran 2 ranks x {head['threads_per_rank']} thread)",
        "cases": cases,
    }
    print(f"\n-> {write_result('ep_overlap', result)}")


if __name__ == "__main__":
    main()
