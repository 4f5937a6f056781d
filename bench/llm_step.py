"""Training-step throughput of the Xoron LLM backbone vs HF transformers DeepseekV3ForCausalLM.

Same config, same weights (copied through the HF adapter), same batches, same optimizer
(torch AdamW), same process; ours and HF's two experts implementations alternate round by
round. A step is forward + cross-entropy + backward + optimizer step.

Cases (model @ tokens per row x rows):
    tiny@128x8     the smoke run's model and batch shape, the headline
    tiny@1024x2    the same model on longer rows (attention-heavy)
    small@512x2    4x wider, 2x deeper, 4x the vocabulary

    python -m bench.llm_step [--cases tiny@128x8,small@512x2] [--rounds 5] [--compile]

``--compile`` adds ours with every decoder block compiled (``train.compile``, inductor; the routed
experts stay eager): its first step must give eager's loss, the compile time is reported apart, and
its tokens/s join the case (``ours_compiled``, ratio ``compiled_over_eager``).

Writes bench/out/llm_step.json.
"""

from __future__ import annotations

import argparse
import copy
import re
import time

import torch
import torch.nn.functional as F
import transformers

from bench.common import machine, time_alternating, write_result
from xoron_dist.config import load_config
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


def make_step(model: torch.nn.Module, batches: list[torch.Tensor]):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step() -> None:
        ids = batches[state["i"] % len(batches)]
        state["i"] += 1
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


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
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1)) for _ in range(4)]
    with torch.no_grad():  # same weights -> same logits, else the comparison would be meaningless
        usable = cfg.usable_vocab_size  # ours masks the embedding's padding rows to -inf (never predicted)
        diff = (ours(batches[0][:, :-1]).logits[..., :usable]
                - peers["hf_eager"](batches[0][:, :-1]).logits[..., :usable]).abs().max()
        assert diff < 1e-3, f"models differ by {diff}"
    fns = {"ours": make_step(ours, batches)} | {name: make_step(m, batches) for name, m in peers.items()}
    compile_s = None
    if compiled:
        twin = copy.deepcopy(ours)
        if not compile_blocks(twin, torch.device("cpu")):
            raise SystemExit("--compile: inductor has no C++ compiler here (see the log)")
        fns["ours_compiled"] = make_step(twin, batches)
        eager_loss = fns["ours"]()  # both take their first step on the same batch from the same weights
        start = time.perf_counter()
        compiled_loss = fns["ours_compiled"]()
        compile_s = time.perf_counter() - start
        assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4), (compiled_loss, eager_loss)
    reps = max(1, 8192 // (seq * batch))  # about 8K tokens per timed sample
    seconds = time_alternating(fns, rounds=rounds, reps=reps)
    tps = {name: batch * seq / s for name, s in seconds.items()}
    best_peer = max((n for n in tps if n.startswith("hf_")), key=tps.get)
    print(f"\n{case}: {batch} x {seq} tokens per step")
    for name in fns:
        print(f"  {name:<14} {seconds[name] * 1e3:>9.1f} ms/step {tps[name]:>10.0f} tokens/s")
    print(f"  ours / {best_peer} = {tps['ours'] / tps[best_peer]:.3f}")
    result = {"tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "best_peer": best_peer,
              "ratio": round(tps["ours"] / tps[best_peer], 3), "config": MODELS[model_name]}
    if compiled:
        result["compiled_over_eager"] = round(tps["ours_compiled"] / tps["ours"], 3)
        result["compile_first_step_s"] = round(compile_s, 1)
        print(f"  ours_compiled / ours = {result['compiled_over_eager']:.3f} (first step with compile "
              f"{compile_s:.1f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time ours with train.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {case: run_case(case, args.rounds, args.compile) for case in args.cases.split(",")}
    head = cases.get(HEADLINE) or next(iter(cases.values()))
    head_name = HEADLINE if HEADLINE in cases else next(iter(cases))
    result = {
        "metric": f"training-step tokens/s (fwd+bwd+AdamW), case {head_name}, higher is better",
        "unit": "tokens/s",
        "ours": head["tokens_per_s"]["ours"],
        "peer": head["tokens_per_s"][head["best_peer"]],
        "peer_name": f"transformers {transformers.__version__} DeepseekV3ForCausalLM, {head['best_peer']} "
                     "(the faster of its two experts implementations)",
        "ratio": head["ratio"],
        "goal": 1.5,
        "machine": machine(),
        "cases": cases,
    }
    if args.compile:  # train.compile on the headline case: tokens/s with compiled blocks over eager ones
        result["compile"] = {"case": head_name, "compiled_over_eager": head["compiled_over_eager"],
                             "compile_first_step_s": head["compile_first_step_s"],
                             "ours_compiled_tokens_per_s": head["tokens_per_s"]["ours_compiled"]}
    print(f"\n-> {write_result('llm_step', result)}")


if __name__ == "__main__":
    main()
