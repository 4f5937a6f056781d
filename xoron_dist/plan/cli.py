"""``xoron plan``: rank the parallel layouts of a cluster for a run config; write the best one.

    xoron plan --config pipelines/xoron_full.yaml --cluster h100x8 --nodes 4 --out plans/
    xoron plan --config RUN.yaml --cluster my_cluster.yaml --verbose      (also list refused layouts)

Prints a table (layout, memory per GPU by component, estimated step time and tokens/s, whether it
fits), for a multimodal run the parameters each part (encoders, projectors, fusion, generators)
puts on one GPU of the chosen layout, and writes ``plan.yaml`` + ``ds_config.json`` for the fastest
layout that fits.
"""

from __future__ import annotations

import argparse
import sys

from xoron_dist.plan.cluster import GIB, PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="run YAML (default: the full-size model)")
    parser.add_argument("--cluster", default="h100x8",
                        help=f"a preset ({', '.join(PRESETS)}) or a YAML file of cluster fields")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--gpu-memory-gib", type=float, default=None)
    parser.add_argument("--mfu", type=float, default=None, help="fraction of peak FLOPs a step reaches")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per optimizer step (default: micro_batch_size * grad_accum_steps * GPUs)")
    parser.add_argument("--out", default="plans", help="where plan.yaml and ds_config.json go")
    parser.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    parser.add_argument("--verbose", action="store_true", help="also list refused layouts with the reason")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_table(result, top: int) -> str:
    """The ranked layouts; memory in GiB per GPU (the busiest pipeline stage). "comm": the share of
    the step spent communicating; "latent KV": the MLA cache an inference batch of the same
    micro-batch and sequence length would take on that GPU (not part of the training total)."""
    rows = [("#", "layout", "weights", "grads", "optim", "activ", "buffers", "total GiB", "fits", "step s",
             "tokens/s", "comm", "latent KV")]
    for i, c in enumerate(result.ranked[:top], 1):
        m, cost = c.memory, c.cost
        rows.append((str(i), c.describe(), _gib(m.weights), _gib(m.grads), _gib(m.optimizer), _gib(m.activations),
                     _gib(m.buffers), _gib(m.total), "yes" if c.fits else "NO", f"{cost.step_time:.3g}",
                     f"{cost.tokens_per_s:,.0f}", f"{cost.communication / cost.step_time:.0%}", _gib(m.latent_cache)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if j != 1 else cell.ljust(w) for j, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in rows)


def format_parts(candidate) -> str:
    """The multimodal parts on one GPU of ``candidate``'s layout: parameters of the single-rank part,
    on this GPU (after TP and EP) and, of those, routed generator experts (ZeRO shards them over
    dp/ep ranks). Empty without parts."""
    parts = candidate.memory.parts
    if not parts:
        return ""
    rows = [("part", "whole", "per GPU", "of which experts")]
    rows += [(p.name, f"{p.whole:,}", f"{p.params.total:,}", f"{p.params.expert:,}") for p in parts]
    rows.append(("total", f"{sum(p.whole for p in parts):,}", f"{sum(p.params.total for p in parts):,}",
                 f"{sum(p.params.expert for p in parts):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"multimodal parts on each GPU of {candidate.describe()} (parameters; their weights, grads and "
             "optimizer states are in the table, their activations and compute are not modelled: "
             "xoron_dist/plan/parts.py):"]
    lines += ["  " + "  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in rows]
    return "\n".join(lines)


def format_refusals(refused) -> str:
    """One line per refused (tp, pp, sp, ep, ZeRO) and reason; batch splits sharing it are counted."""
    groups: dict[tuple, int] = {}
    for c in refused:
        key = (c.tp, c.pp, c.sp, c.ep, c.zero_stage, c.refusal)
        groups[key] = groups.get(key, 0) + 1
    return "\n".join(f"  tp{tp} pp{pp} sp{sp} ep{ep} z{zero} ({n} batch split{'s' * (n > 1)}): {reason}"
                     for (tp, pp, sp, ep, zero, reason), n in groups.items())


def run(args: argparse.Namespace) -> int:
    from xoron_dist.config import load_config
    from xoron_dist.plan.cluster import load_cluster
    from xoron_dist.plan.search import plan
    from xoron_dist.plan.writer import write_plan

    cfg = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           gpu_memory_gib=args.gpu_memory_gib, mfu=args.mfu)
    result = plan(cfg, cluster, global_batch=args.global_batch)
    print(cluster.describe())
    print(f"global batch {result.global_batch} sequences of {result.seq_len} tokens (the longest stage); "
          f"{len(result.ranked)} layouts accepted, {len(result.refused)} refused; "
          f"{sum(c.fits for c in result.ranked)} fit in {cluster.usable_bytes / GIB:.1f} GiB per GPU")
    if result.ranked:
        print(format_table(result, args.top))
        parts = format_parts(result.best or result.ranked[0])
        if parts:
            print("\n" + parts)
    if args.verbose and result.refused:
        print("\nrefused layouts (validator's reason):")
        print(format_refusals(result.refused))
    best = result.best
    if best is None:
        print("error: no accepted layout fits in GPU memory; add nodes, use bigger GPUs, shorten train.seq_len "
              "or lower the global batch", file=sys.stderr)
        return 1
    yaml_path, ds_path = write_plan(cfg, best, cluster, args.out)
    print(f"\nchosen: {best.layout.describe()}; micro-batch {best.micro_batch_size} x {best.grad_accum_steps}"
          f"{', activation checkpointing' if best.activation_checkpointing else ''}: "
          f"{best.memory.total / GIB:.2f} GiB per GPU, {best.cost.step_time:.3g} s per step (estimated)")
    print(f"wrote {yaml_path} and {ds_path}")
    return 0
