"""Training-step throughput of the Xoron LLM backbone vs HF transformers DeepseekV3ForCausalLM.

Same config, same weights (copied through the HF adapter), same batches, same optimizer
(torch AdamW), same process; the two alternate round by round. A step is
forward + cross-entropy + backward + optimizer step. Writes bench/out/llm_step.json.

    python -m bench.llm_step [--model tiny|small] [--seq N --batch N --rounds 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import transformers

from bench.common import machine, time_alternating, write_result
from xoron_dist.config import load_config
from xoron_dist.model.hf_adapter import from_hf_state_dict, hf_config_kwargs
from xoron_dist.model.llm import XoronLLM

# --model tiny: the smoke run's model, as it is. --model small: 4x wider and 2x deeper, longer rows.
MODELS = {
    "tiny": ["preset=tiny"],
    "small": [
    "preset=tiny",
    "model.llm.vocab_size=4000", "model.llm.hidden_size=256", "model.llm.num_layers=4", "model.llm.num_heads=8",
    "model.llm.q_lora_rank=128", "model.llm.kv_lora_rank=64", "model.llm.qk_nope_head_dim=32",
    "model.llm.qk_rope_head_dim=16", "model.llm.v_head_dim=32", "model.llm.moe.expert_intermediate_size=256",
    ],
}


def make_step(model: torch.nn.Module, batches: list[torch.Tensor], hf: bool):
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

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--seq", type=int, default=None, help="default: 128 (tiny), 512 (small)")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (tiny), 2 (small)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    args.seq = args.seq or {"tiny": 128, "small": 512}[args.model]
    args.batch = args.batch or {"tiny": 8, "small": 2}[args.model]
    cfg = load_config(None, MODELS[args.model]).llm
    torch.manual_seed(0)
    peers = {}
    for impl in ("grouped_mm", "eager"):
        hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg))
        hf_cfg._experts_implementation = impl
        torch.manual_seed(0)
        peers[impl] = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
    ours = XoronLLM(cfg).train()
    ours.load_state_dict(from_hf_state_dict(peers["eager"].state_dict()))
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1)) for _ in range(4)]
    with torch.no_grad():  # same weights -> same loss before timing
        a = ours(batches[0][:, :-1]).logits
        b = peers["eager"](batches[0][:, :-1]).logits
        assert (a - b).abs().max() < 1e-3, "models differ; the comparison would be meaningless"

    fns = {"ours": make_step(ours, batches, False)}
    fns.update({f"hf_{impl}": make_step(m, batches, True) for impl, m in peers.items()})
    seconds = time_alternating(fns, rounds=args.rounds, reps=args.reps)
    tokens = args.batch * args.seq
    tps = {name: tokens / s for name, s in seconds.items()}
    best_peer = max((n for n in tps if n != "ours"), key=tps.get)
    print(f"{'model':<16} {'s/step':>8} {'tokens/s':>10}")
    for name in fns:
        print(f"{name:<16} {seconds[name]:>8.4f} {tps[name]:>10.0f}")
    result = {
        "metric": "training-step tokens/s (fwd+bwd+AdamW), higher is better",
        "unit": "tokens/s",
        "ours": round(tps["ours"], 1),
        "peer": round(tps[best_peer], 1),
        "peer_name": f"transformers {transformers.__version__} DeepseekV3ForCausalLM "
                     f"({best_peer}, the faster HF setting)",
        "ratio": round(tps["ours"] / tps[best_peer], 3),
        "goal": 1.5,
        "machine": machine(),
        "details": {
            "tokens_per_step": tokens,
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_vs_each": {k: round(tps["ours"] / v, 3) for k, v in tps.items() if k != "ours"},
            "model": args.model,
            "config": MODELS[args.model],
            "seq": args.seq,
            "batch": args.batch,
        },
    }
    print(f"ratio vs {best_peer}: {result['ratio']}x -> {write_result(f'llm_step_{args.model}', result)}")


if __name__ == "__main__":
    main()
