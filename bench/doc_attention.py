"""Packed-document attention: per-document fused calls (ours) vs SDPA with the dense document mask (before).

One causal attention over a packed row of documents (lengths drawn from a seeded exponential,
mean ``--mean-doc`` tokens), MLA's tiny head dims (q/k 24, v 16), ``--heads`` heads, batch 1,
fp32, forward + backward, at ``--seqs`` tokens. Every variant gets the same q, k, v and checks its
output and gradients against the dense-mask one (max abs difference in the JSON).

    ours        ``document_attention``: the layout (one sort, one host sync; once per forward in the
                model, timed here with every call), then one causal fused call per document length.
    dense_mask  what ``ExpandedAttention`` did before: a (batch, 1, s, s) boolean mask, v zero-padded,
                ``F.scaled_dot_product_attention``. The peer.
    flex        ``torch.nn.attention.flex_attention`` with a document ``BlockMask`` (eager, as on a CPU
                without compile). torch 2.13 refuses its backward on CPU ("FlexAttention does not
                support backward on CPU"), so it cannot serve the CPU training path; its forward
                is timed (``flex_forward_seconds``, against ours forward-only) but not metered (the
                meter cannot see inside a higher-order op).

Peak memory: ``tests.plan.memory_meter.LiveTensorMeter``, the peak of live tensor bytes during the
call minus the bytes alive before it (inputs excluded): deterministic, no allocator noise. Time:
``bench.common.time_alternating``, median of interleaved rounds.

    python -m bench.doc_attention [--seqs 2048 4096] [--heads 2] [--mean-doc 512]

Writes bench/out/doc_attention.json. Headline: peak memory of ours vs dense_mask at the largest
seq (lower is better, ratio = peer/ours; goal >= 4x, the s² mask and its bias gone); times as ratios.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bench.common import machine, time_alternating, write_result
from tests.plan.memory_meter import LiveTensorMeter
from xoron_dist.model.common.document_attention import DocumentLayout, document_attention
from xoron_dist.model.llm.attention import attention_mask

QK, V = 24, 16
MIB = 2**20


def _document_ids(seq: int, mean: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq:
        n = max(8, int(torch.empty(1).exponential_(1.0 / mean, generator=gen).item()))
        lengths.append(min(n, seq - total))
        total += lengths[-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None], len(lengths)


def _variants(q, k, v, ids, scale):
    seq = q.shape[1]

    def ours():
        return document_attention(q, k, v, DocumentLayout.from_ids(ids), scale=scale)

    def dense_mask():
        order = torch.arange(seq).expand(1, -1)
        mask = attention_mask(order, order, ids, ids)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             F.pad(v, (0, QK - V)).transpose(1, 2), attn_mask=mask, scale=scale)
        return out.transpose(1, 2)[..., :V]

    doc = ids[0]

    def document_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    def flex():
        block = create_block_mask(document_causal, None, None, seq, seq, device="cpu")
        qd, kd, vd = (t.detach().transpose(1, 2) for t in (q, k, v))  # inputs needing grad are refused on CPU
        out = flex_attention(qd, kd, vd, block_mask=block, scale=scale)
        return out.transpose(1, 2)

    return {"ours": ours, "dense_mask": dense_mask}, flex


def _step(fn, dout, inputs):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(dout)
    return out.detach(), [t.grad.clone() for t in inputs]


def _peak(fn, dout, inputs) -> int:
    with LiveTensorMeter() as meter:
        _step(fn, dout, inputs)
    return meter.peak - meter.baseline


def _forward_peak(fn) -> int:
    with torch.no_grad(), LiveTensorMeter() as meter:
        fn()
    return meter.peak - meter.baseline


def run(seq: int, heads: int, mean_doc: int, rounds: int):
    gen = torch.Generator().manual_seed(seq)
    q, k = (torch.randn(1, seq, heads, QK, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, seq, heads, V, generator=gen).requires_grad_()
    dout = torch.randn(1, seq, heads, V, generator=gen)
    ids, docs = _document_ids(seq, mean_doc, seq + 1)
    variants, flex = _variants(q, k, v, ids, QK**-0.5)
    ref_out, ref_grads = _step(variants["dense_mask"], dout, (q, k, v))
    row = {"seq": seq, "documents": docs, "max_abs_diff": {}, "peak_mib": {}, "seconds": {}, "forward_peak_mib": {}}
    for name, fn in variants.items():
        row["forward_peak_mib"][name] = round(_forward_peak(fn) / MIB, 2)

    def flex_pass() -> None:
        """Run after every metered call: flex's internal tracing leaves fake tensors the meter would count."""
        row["max_abs_diff"]["flex_forward"] = (flex() - ref_out).abs().max().item()

        def forward(fn):
            with torch.no_grad():
                fn()

        row["forward_seconds"] = {name: round(t, 4) for name, t in time_alternating(
            {"ours": lambda: forward(variants["ours"]), "flex": lambda: forward(flex)}, rounds=rounds,
            reps=1).items()}
    for name, fn in variants.items():
        out, grads = _step(fn, dout, (q, k, v))
        row["max_abs_diff"][name] = max((a - b).abs().max().item() for a, b in zip([out, *grads],
                                                                                    [ref_out, *ref_grads],
                                                                                    strict=True))
        row["peak_mib"][name] = round(_peak(fn, dout, (q, k, v)) / MIB, 2)
    times = time_alternating({name: (lambda fn=fn: _step(fn, dout, (q, k, v))) for name, fn in variants.items()},
                             rounds=rounds, reps=1)
    row["seconds"] = {name: round(t, 4) for name, t in times.items()}
    return row, flex_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--mean-doc", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = [run(seq, args.heads, args.mean_doc, args.rounds) for seq in args.seqs]
    for _, flex_pass in runs:
        flex_pass()
    rows = [row for row, _ in runs]
    print(f"{'seq':>6} {'docs':>5} | {'fwd+bwd peak MiB: ours':>23} {'dense':>8} | {'seconds: ours':>14} "
          f"{'dense':>8} | {'fwd peak MiB: ours':>19} {'dense':>8} | {'fwd s: ours':>11} {'flex':>8} | max diff")
    for r in rows:
        p, s, f = r["peak_mib"], r["seconds"], r["forward_peak_mib"]
        print(f"{r['seq']:>6} {r['documents']:>5} | {p['ours']:>23} {p['dense_mask']:>8} | {s['ours']:>14} "
              f"{s['dense_mask']:>8} | {f['ours']:>19} {f['dense_mask']:>8} | {r['forward_seconds']['ours']:>11} "
              f"{r['forward_seconds']['flex']:>8} | "
              f"{max(r['max_abs_diff'].values()):.1e}")
    last = rows[-1]
    result = {
        "metric": (f"peak live tensor memory of one causal packed-document attention fwd+bwd at seq {last['seq']} "
                   "(fp32, MLA tiny head dims), per-document fused calls vs SDPA with the dense (s x s) document "
                   "mask; lower is better, ratio = peer/ours"),
        "unit": "MiB",
        "ours": last["peak_mib"]["ours"],
        "peer": last["peak_mib"]["dense_mask"],
        "peer_name": "F.scaled_dot_product_attention with the (batch, 1, s, s) document mask (the code before)",
        "ratio": round(last["peak_mib"]["dense_mask"] / last["peak_mib"]["ours"], 2),
        "goal": 4.0,
        "machine": machine(),
        "config": {"heads": args.heads, "qk_dim": QK, "v_dim": V, "mean_doc": args.mean_doc, "dtype": "float32",
                   "batch": 1},
        "time_ratio_dense_over_ours": {r["seq"]: round(r["seconds"]["dense_mask"] / r["seconds"]["ours"], 2)
                                       for r in rows},
        "memory_ratio_dense_over_ours": {r["seq"]: round(r["peak_mib"]["dense_mask"] / r["peak_mib"]["ours"], 2)
                                         for r in rows},
        "rows": rows,
    }
    print(f"\n-> {write_result('doc_attention', result)}")


if __name__ == "__main__":
    main()
