"""Training-step throughput of the Xoron LLM backbone vs HF transformers DeepseekV3ForCausalLM.

Same config, same weights (copied through the HF adapter), same batches, same optimizer
(torch AdamW), same process; ours and HF's two experts implementations alternate round by
round. A step is forward + cross-entropy + backward + optimizer step, the loss through each model's
own training path (``labels=``), as each one's trainer calls it: ours with the trainer's default
``train.loss_chunk_tokens`` (``LinearCrossEntropy`` chunks), HF's ``ForCausalLMLoss`` (the whole
logits, ``F.cross_entropy``) given the same shifted targets (``shift_labels``). Until 2026-12-05 the
bench took both models' logits and computed one ``F.cross_entropy`` itself (``STEP`` in the JSON says
which; the headline's earlier runs are kept only for the same step).

Cases (model @ tokens per row x rows):
    tiny@128x8     the smoke run's model and batch shape, the headline
    tiny@1024x2    the same model on longer rows (attention-heavy)
    small@512x2    4x wider, 2x deeper, 4x the vocabulary

    python -m bench.llm_step [--cases tiny@128x8,small@512x2] [--rounds 5] [--compile]

``--against DIR --lever NAME`` (alone: no cases run) times this tree's model against the one in DIR (a copy
of the code before a change, e.g. ``git archive <commit> xoron_dist | tar -x -C DIR``) on the headline
step, in alternating fresh processes (``time_against``), and records the speedup under ``levers`` in the
JSON. Sections a run does not measure (``compile``, ``levers``, ``attempts``) are kept from the previous JSON.

``--compile`` adds ours with every decoder block compiled (``train.compile``, inductor; the routed experts
compile inside their block as ``xoron::grouped_mm``) and, as its peer, HF's model compiled whole
(``model.compile()``, the faster experts implementation): ours' first step must give eager's loss, the
compile times are reported apart, and their tokens/s join the case (``ours_compiled``, ``hf_compiled``;
ratios ``compiled_over_eager`` and ``compiled_over_hf_compiled``). The headline ratio stays eager vs eager.

``--checkpointed`` (alone: no cases run) times ``train.compile`` as the full recipe runs it: ours with
activation checkpointing on every block and packed documents (4 per row), eager vs compiled (the blocks
compile inside their checkpoints; the document layout is the graph break), on the headline shape; the
result goes under ``compile.checkpointed``. HF has neither packed documents nor this checkpointing: no peer.

Writes bench/out/llm_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from bench.common import OUT_DIR, machine, time_alternating, write_result
from xoron_dist.config import load_config
from xoron_dist.config.run import TrainConfig
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.hf import from_hf_state_dict, hf_config_kwargs
from xoron_dist.train.compile import compile_blocks

MODELS = {
    "tiny": ["preset=tiny"],
    "small": [
        "preset=tiny",
        "model.llm.vocab_size=4000", "model.llm.hidden_size=256", "model.llm.num_layers=4", "model.llm.num_heads=8",
        "model.llm.q_lora_rank=128", "model.llm.kv_lora_rank=64", "model.llm.qk_nope_head_dim=32",
        "model.llm.qk_rope_head_dim=16", "model.llm.v_head_dim=32", "model.llm.moe.expert_intermediate_size=256",
    ],
}
DEFAULT_CASES = "tiny@128x8,tiny@1024x2,small@512x2"
HEADLINE = "tiny@128x8"


STEP = "own_loss"  # each model's training loss path (labels=); "bench_cross_entropy" before 2026-12-05


def training_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of rows ``ids`` through the model's own training path."""
    inputs, targets = ids[:, :-1], ids[:, 1:].contiguous()
    if isinstance(model, XoronLLM):
        return model(inputs, labels=targets).loss  # labels already shifted
    return model(inputs, labels=targets, shift_labels=targets).loss  # HF: shift_labels taken as they are


def make_step(model: torch.nn.Module, batches: list[torch.Tensor]):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        ids = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = training_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# One workload on the xoron_dist tree at sys.argv[1] (stable APIs only: it runs against older trees too):
# prints the least process-seconds per call over 5 samples, and a checksum that must agree between trees.
_TREE_WORKLOAD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch.nn.functional as F
import xoron_dist
assert xoron_dist.__file__.startswith(sys.argv[1]), xoron_dist.__file__
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
torch.set_num_threads(1)
cfg = load_config(None, ["preset=tiny"]).llm
torch.manual_seed(0)
model = XoronLLM(cfg)
if sys.argv[2] == "generate":  # tiny@32+64x1, greedy
    model.eval()
    prompt = torch.randint(0, cfg.usable_vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    def call():
        return model.generate_text(prompt, 64, temperature=0).sum()
    per_sample = 4
else:  # tiny@128x8 training step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (8, 129))
    def call():
        loss = F.cross_entropy(model(ids[:, :-1]).logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    per_sample = 10
check = call().item()
call()
samples = []
for _ in range(5):
    start = time.process_time()
    for _ in range(per_sample):
        call()
    samples.append((time.process_time() - start) / per_sample)
print(min(samples), round(check, 4))
"""


def time_against(before: Path, workload: str, rounds: int) -> dict:
    """Speedup of this tree's ``workload`` ("step" | "generate") over the tree at ``before``.

    Each round runs both trees once, each in a fresh process, in alternating order; a process reports
    its least CPU (process) time per call over 5 samples, which other jobs on a shared machine disturb
    less than wall time. Returns the median, min and max over rounds of before / now."""
    here = Path(__file__).resolve().parent.parent
    trees = {"before": before.resolve(), "now": here}
    for name, tree in trees.items():
        if not (tree / "xoron_dist" / "__init__.py").is_file():
            raise SystemExit(f"--against: {tree} holds no xoron_dist package ({name}); give the folder above it")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    checks: dict[str, set[str]] = {"before": set(), "now": set()}
    for r in range(rounds):
        for name in ("before", "now") if r % 2 == 0 else ("now", "before"):
            run = subprocess.run([sys.executable, "-c", _TREE_WORKLOAD, str(trees[name]), workload],
                                 capture_output=True, text=True, env=env, cwd="/")
            if run.returncode:
                raise SystemExit(f"--against: the {name} tree's {workload} failed:\n{run.stderr[-2000:]}")
            value, check = run.stdout.split()[-2:]
            seconds[name].append(float(value))
            checks[name].add(check)
    ratios = [b / n for b, n in zip(seconds["before"], seconds["now"], strict=True)]
    return {"now_over_before_median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "rounds": rounds,
            "ms_per_call": {k: round(statistics.median(v) * 1e3, 2) for k, v in seconds.items()},
            "same_result": checks["before"] == checks["now"] and len(checks["now"]) == 1}


def kept_sections(name: str, measured: dict,
                  sections: tuple[str, ...] = ("compile", "levers", "attempts", "where_time_goes")) -> dict:
    """What the previous bench/out/<name>.json recorded that this run did not measure: its other sections, the
    cases this run left out (each case is its own side-by-side measurement), and the headline's earlier runs,
    to which this run's headline ratio is appended (``headline_runs``: the last 10, with their median and spread:
    one run on a shared machine is noise)."""
    path = OUT_DIR / f"{name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    kept = {key: previous[key] for key in sections if key in previous and key not in measured}
    kept["cases"] = previous.get("cases", {}) | measured["cases"]
    head = measured["cases"].get(measured["headline"])
    same = previous.get("headline") == measured["headline"] and previous.get("step") == STEP
    runs = previous.get("headline_runs", {}).get("runs", []) if same else []
    if head is not None:
        runs = [*runs, {"ratio": head["ratio"], "tokens_per_s": head["tokens_per_s"], "machine": measured["machine"]}]
    if runs:
        ratios = [run["ratio"] for run in runs[-10:]]
        kept["headline_runs"] = {"median_ratio": round(statistics.median(ratios), 3), "min": min(ratios),
                                 "max": max(ratios), "runs": runs[-10:]}
    return kept


def record_lever(result: dict, name: str, before: Path, workload: str, rounds: int, what: str) -> None:
    """Time this tree against ``before`` and append the lever to ``result["levers"]`` (replacing one of that name)."""
    measured = time_against(before, workload, rounds)
    print(f"\nlever '{name}' ({workload}): now / before = {measured['now_over_before_median']:.3f} "
          f"(min {measured['min']}, max {measured['max']}, {rounds} rounds), same result: {measured['same_result']}")
    levers = [lever for lever in result.get("levers", []) if lever.get("name") != name]
    result["levers"] = [*levers, {"name": name, "what": what, "workload": workload, **measured,
                                  "machine": machine()}]


def run_case(case: str, rounds: int, compiled: bool = False) -> dict:
    match = re.fullmatch(r"(\w+)@(\d+)x(\d+)", case)
    if not match or match.group(1) not in MODELS:
        raise SystemExit(f"case '{case}' must look like MODEL@SEQxBATCH with MODEL in {sorted(MODELS)}")
    model_name, seq, batch = match.group(1), int(match.group(2)), int(match.group(3))
    cfg = load_config(None, MODELS[model_name]).llm
    peers = {}
    for impl in ("grouped_mm", "eager"):
        hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg))
        hf_cfg._experts_implementation = impl
        torch.manual_seed(0)
        peers[f"hf_{impl}"] = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
    ours = XoronLLM(cfg).train()
    ours.load_state_dict(from_hf_state_dict(peers["hf_eager"].state_dict()))
    ours.lm_head.chunk_tokens = TrainConfig().loss_chunk_for("cpu")  # as the trainer builds it (train/build.py)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1)) for _ in range(4)]
    with torch.no_grad():  # same weights -> same logits, else the comparison would be meaningless
        usable = cfg.usable_vocab_size  # ours masks the embedding's padding rows to -inf (never predicted)
        diff = (ours(batches[0][:, :-1]).logits[..., :usable]
                - peers["hf_eager"](batches[0][:, :-1]).logits[..., :usable]).abs().max()
        assert diff < 1e-3, f"models differ by {diff}"
        hf_logits = peers["hf_eager"](batches[0][:, :-1]).logits[..., :usable]  # HF's softmax also spans padding rows
        expected = F.cross_entropy(hf_logits.flatten(0, 1), batches[0][:, 1:].flatten())
        loss = training_loss(ours, batches[0])
        assert abs(loss - expected) < 1e-4, f"our training loss {loss} differs from HF logits' {expected}"
    fns = {"ours": make_step(ours, batches)} | {name: make_step(m, batches) for name, m in peers.items()}
    compile_s = {}
    if compiled:
        twin = copy.deepcopy(ours)
        if not compile_blocks(twin, torch.device("cpu")):
            raise SystemExit("--compile: inductor has no C++ compiler here (see the log)")
        fns["ours_compiled"] = make_step(twin, batches)
        hf_twin = copy.deepcopy(peers["hf_grouped_mm"])
        hf_twin.compile()
        fns["hf_compiled"] = make_step(hf_twin, batches)
        eager_loss = fns["ours"]()  # both take their first step on the same batch from the same weights
        for name in ("ours_compiled", "hf_compiled"):
            start = time.perf_counter()
            compiled_loss = fns[name]()
            compile_s[name] = time.perf_counter() - start
            assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4), (name, compiled_loss, eager_loss)
    reps = max(1, 8192 // (seq * batch))  # about 8K tokens per timed sample
    seconds = time_alternating(fns, rounds=rounds, reps=reps)
    tps = {name: batch * seq / s for name, s in seconds.items()}
    best_peer = max(("hf_grouped_mm", "hf_eager"), key=tps.get)
    print(f"\n{case}: {batch} x {seq} tokens per step")
    for name in fns:
        print(f"  {name:<14} {seconds[name] * 1e3:>9.1f} ms/step {tps[name]:>10.0f} tokens/s")
    print(f"  ours / {best_peer} = {tps['ours'] / tps[best_peer]:.3f}")
    result = {"tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "best_peer": best_peer,
              "ratio": round(tps["ours"] / tps[best_peer], 3), "config": MODELS[model_name]}
    if compiled:
        result["compiled_over_eager"] = round(tps["ours_compiled"] / tps["ours"], 3)
        result["compiled_over_hf_compiled"] = round(tps["ours_compiled"] / tps["hf_compiled"], 3)
        result["compiled_over_best_eager_peer"] = round(tps["ours_compiled"] / tps[best_peer], 3)
        result["compile_first_step_s"] = {k: round(v, 1) for k, v in compile_s.items()}
        print(f"  ours_compiled / ours = {result['compiled_over_eager']:.3f}; ours_compiled / hf_compiled = "
              f"{result['compiled_over_hf_compiled']:.3f} (first steps with compile: "
              f"{result['compile_first_step_s']} s)")
    return result


def checkpointed_compile(rounds: int) -> dict:
    """Ours eager vs compiled (``compile_blocks``, inductor), both checkpointed, on packed documents."""
    from torch._dynamo.utils import counters

    from xoron_dist.model.llm import DecoderLayer
    from xoron_dist.parallel.checkpointing import apply_activation_checkpointing

    seq, batch = (int(n) for n in HEADLINE.split("@")[1].split("x"))
    cfg = load_config(None, MODELS[HEADLINE.split("@")[0]]).llm
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1)) for _ in range(4)]
    documents = torch.arange(seq).div(seq // 4, rounding_mode="floor").expand(batch, -1)  # 4 documents per row
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = XoronLLM(cfg).train()
        models[name].lm_head.chunk_tokens = TrainConfig().loss_chunk_for("cpu")
        apply_activation_checkpointing(models[name], (DecoderLayer,))
    if not compile_blocks(models["compiled"], torch.device("cpu")):
        raise SystemExit("--checkpointed: inductor has no C++ compiler here (see the log)")

    def make(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            ids = batches[state["i"] % len(batches)]
            state["i"] += 1
            loss = model(ids[:, :-1], labels=ids[:, :-1], document_ids=documents).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    fns = {name: make(model) for name, model in models.items()}
    eager_loss = fns["eager"]()
    start = time.perf_counter()
    compiled_loss = fns["compiled"]()
    first = time.perf_counter() - start
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4), (compiled_loss, eager_loss)
    seconds = time_alternating(fns, rounds=rounds, reps=max(1, 8192 // (seq * batch)))
    tps = {name: round(batch * seq / s, 1) for name, s in seconds.items()}
    out = {"case": HEADLINE, "documents_per_row": 4, "rounds": rounds, "tokens_per_s": tps,
           "compiled_over_eager": round(tps["compiled"] / tps["eager"], 3), "first_compiled_step_s": round(first, 1),
           "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    print(f"\ncheckpointed, packed: compiled / eager = {out['compiled_over_eager']:.3f} ({tps}), {out['graphs']} "
          f"graphs, {out['graph_breaks']} breaks, first compiled step {out['first_compiled_step_s']} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time ours with train.compile")
    parser.add_argument("--against", type=Path, help="folder holding the xoron_dist of before a change")
    parser.add_argument("--lever", default="levers", help="the change's name in the JSON's levers list")
    parser.add_argument("--lever-what", default="", help="one line saying what the change is")
    parser.add_argument("--lever-rounds", type=int, default=6)
    parser.add_argument("--checkpointed", action="store_true", help="only train.compile with checkpointing and "
                        "packed documents, eager vs compiled")
    args = parser.parse_args()
    if args.checkpointed:  # only this measurement: the rest of the JSON stays as recorded
        result = json.loads((OUT_DIR / "llm_step.json").read_text())
        previous = result.setdefault("compile", {}).get("checkpointed", {})
        run = checkpointed_compile(args.rounds)
        result["compile"]["checkpointed"] = {"latest": run, "attempts": [*previous.get("attempts", []), run]}
        print(f"\n-> {write_result('llm_step', result)}")
        return
    if args.against is not None:  # only the lever: the rest of the JSON stays as recorded
        result = json.loads((OUT_DIR / "llm_step.json").read_text())
        record_lever(result, args.lever, args.against, "step", args.lever_rounds, args.lever_what)
        print(f"\n-> {write_result('llm_step', result)}")
        return
    torch.manual_seed(0)
    cases = {case: run_case(case, args.rounds, args.compile) for case in args.cases.split(",")}
    kept = kept_sections("llm_step", {"headline": HEADLINE, "machine": machine(), "cases": cases})
    head_name = HEADLINE if HEADLINE in kept["cases"] else next(iter(cases))
    head = kept["cases"][head_name]
    result = {
        "headline": head_name,
        "metric": f"training-step tokens/s (fwd + each model's own loss + bwd + AdamW), case {head_name}, higher is "
                  "better",
        "step": STEP,
        "unit": "tokens/s",
        "ours": head["tokens_per_s"]["ours"],
        "peer": head["tokens_per_s"][head["best_peer"]],
        "peer_name": f"transformers {transformers.__version__} DeepseekV3ForCausalLM, {head['best_peer']} "
                     "(the faster of its two experts implementations)",
        "ratio": head["ratio"],
        "goal": 1.5,
        "machine": machine(),
        "cases": kept["cases"],
    }
    if args.compile and head_name in cases:  # train.compile on the headline: compiled blocks' tokens/s over eager
        previous = kept.get("compile", {})
        run = {"case": head_name, "rounds": args.rounds, "tokens_per_s": head["tokens_per_s"],
               "experts": "compiled in the block (xoron::grouped_mm)", "peer_compiled": "HF model.compile()",
               **{key: head[key] for key in ("compiled_over_eager", "compiled_over_hf_compiled",
                                             "compiled_over_best_eager_peer", "compile_first_step_s")}}
        result["compile"] = previous | {"latest": run, "attempts": [*previous.get("attempts", []), run]}
    result |= {key: value for key, value in kept.items() if key not in result}
    print(f"\n-> {write_result('llm_step', result)}")


if __name__ == "__main__":
    main()
