"""The LM head + token loss, forward + backward: ``LinearCrossEntropy`` chunks (ours) vs the one-piece head.

One rank's final step of a training forward: hidden (tokens, width) -> logits over the vocabulary ->
mean cross-entropy, then backward to the hidden states and the head's weight. Same weights, hidden
states and targets (5 % of them -100) in every variant; each variant's loss and gradients are checked
against the one-piece head's (max relative difference in the JSON).

    ours        ``lm_loss`` with ``chunk_tokens`` = ``--chunk``: ``LinearCrossEntropy``, each chunk's
                gradients made in the forward from its softmax; three GEMMs, no logits held.
    one_piece   ``lm_loss`` with ``chunk_tokens`` = 0: ``F.linear`` + ``F.cross_entropy`` over the whole
                logits, as HF's ``ForCausalLMLoss`` computes it. The peer.
    recomputed  the chunked path before ``LinearCrossEntropy`` (``_recomputed_loss``, kept here): each
                chunk's head + loss checkpointed and recomputed in backward; four GEMMs.

Peak memory: ``tests.plan.memory_meter.LiveTensorMeter`` (live tensor bytes above those alive before
the call; deterministic). Time: ``bench.common.time_alternating``, median of interleaved rounds.

    python -m bench.lm_head_loss [--cases 4096x128x32000,2048x256x16000] [--chunk N] [--rounds 5]

``--chunk`` defaults to the trainer's ``train.loss_chunk_tokens``.

Writes bench/out/lm_head_loss.json. Headline: the first case, time of one_piece / ours (higher is
better); the peak memory ratios beside it.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.utils.checkpoint import checkpoint

from bench.common import machine, time_alternating, write_result
from tests.plan.memory_meter import LiveTensorMeter
from xoron_dist.config.run import TrainConfig
from xoron_dist.model.llm.head import IGNORE_INDEX, LMHead, lm_loss

MIB = 2**20


class _Head(LMHead):
    """An ``LMHead`` of a given size without a full ``LLMConfig``."""

    def __init__(self, rows: int, width: int) -> None:
        torch.nn.Module.__init__(self)
        self.usable, self.chunk_tokens = rows, 0
        self.weight = torch.nn.Parameter(torch.randn(rows, width) * width**-0.5)


def _chunk_loss_sum(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    labelled = targets != IGNORE_INDEX
    return (head.token_losses(head(hidden), targets) * labelled).sum()


def _recomputed_loss(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``lm_loss``'s chunked path before ``LinearCrossEntropy``: checkpointed chunks of head + loss."""
    hidden, targets = hidden.flatten(0, 1), labels.flatten()
    chunk = head.chunk_tokens
    total = sum(checkpoint(_chunk_loss_sum, head, hidden[i: i + chunk], targets[i: i + chunk], use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk))
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def run_case(case: str, chunk: int, rounds: int, dtype: torch.dtype) -> dict:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", case)
    if not match:
        raise SystemExit(f"case '{case}' must look like TOKENSxWIDTHxVOCAB")
    tokens, width, vocab = (int(g) for g in match.groups())
    torch.manual_seed(0)
    heads = {"ours": _Head(vocab, width), "one_piece": _Head(vocab, width), "recomputed": _Head(vocab, width)}
    for head in heads.values():
        head.load_state_dict(heads["ours"].state_dict())
        head.to(dtype)
    heads["ours"].chunk_tokens = heads["recomputed"].chunk_tokens = chunk
    hidden = torch.randn(1, tokens, width).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens))
    labels[torch.rand(1, tokens) < 0.05] = IGNORE_INDEX

    def call(head, loss_of):
        def run():
            x = hidden.detach().requires_grad_()
            head.weight.grad = None
            loss = loss_of(head, x, labels)
            loss.backward()
            return loss.detach(), x.grad, head.weight.grad
        return run

    fns = {name: call(head, _recomputed_loss if name == "recomputed" else lambda *a: lm_loss(*a).loss)
           for name, head in heads.items()}
    reference = fns["one_piece"]()
    diffs, peaks = {}, {}
    for name, fn in fns.items():
        got = fn()
        diffs[name] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                          for a, b in zip(got, reference, strict=True))
        with LiveTensorMeter() as meter:
            fn()
        peaks[name] = round((meter.peak - meter.baseline) / MIB, 2)
    seconds = time_alternating(fns, rounds=rounds, reps=1)
    row = {"tokens": tokens, "width": width, "vocab": vocab, "chunk": chunk, "dtype": str(dtype).split(".")[-1],
           "ms": {k: round(v * 1e3, 1) for k, v in seconds.items()}, "peak_mib": peaks,
           "max_rel_diff_vs_one_piece": {k: float(f"{v:.2e}") for k, v in diffs.items()},
           "time_one_piece_over_ours": round(seconds["one_piece"] / seconds["ours"], 3),
           "time_recomputed_over_ours": round(seconds["recomputed"] / seconds["ours"], 3),
           "memory_one_piece_over_ours": round(peaks["one_piece"] / peaks["ours"], 2),
           "memory_recomputed_over_ours": round(peaks["recomputed"] / peaks["ours"], 2)}
    print(f"{case} {row['dtype']}: ms {row['ms']}  peak MiB {peaks}  one_piece/ours time "
          f"{row['time_one_piece_over_ours']}, memory {row['memory_one_piece_over_ours']}; recomputed/ours time "
          f"{row['time_recomputed_over_ours']}, memory {row['memory_recomputed_over_ours']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="4096x128x32000,2048x256x16000,1024x64x1088")
    parser.add_argument("--chunk", type=int, default=TrainConfig().loss_chunk_for("cpu"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16-case", default="2048x128x16000", help="also this case in bf16 ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {case: run_case(case, args.chunk, args.rounds, torch.float32) for case in args.cases.split(",")}
    if args.bf16_case:
        cases[f"{args.bf16_case}/bf16"] = run_case(args.bf16_case, args.chunk, args.rounds, torch.bfloat16)
    head_name = next(iter(cases))
    head = cases[head_name]
    result = {
        "metric": f"LM head + loss forward + backward time, case {head_name} (tokens x width x vocab, fp32, chunks of "
                  f"{args.chunk}), one_piece / ours; higher is better",
        "unit": "ms",
        "ours": head["ms"]["ours"],
        "peer": head["ms"]["one_piece"],
        "peer_name": "the one-piece head: F.linear + F.cross_entropy over the whole logits (HF's ForCausalLMLoss)",
        "ratio": head["time_one_piece_over_ours"],
        "goal": "faster than the one-piece head and than recomputed chunks, at a fraction of the one-piece memory",
        "machine": machine(),
        "cases": cases,
    }
    print(f"\n-> {write_result('lm_head_loss', result)}")


if __name__ == "__main__":
    main()
