"""Text decoding: ``generate_text`` with the latent KV cache vs HF ``generate`` on the same weights.

Same config, same weights (copied through the HF adapter), same prompts, greedy, a fixed number of
new tokens (HF: ``min_new_tokens = max_new_tokens``, no EOS; ours: no ``eos_token_id``), in one
process, alternating round by round. The two must produce the same tokens (checked before timing).

Two numbers per case:

- tokens/s: new tokens (batch x new) per second of the whole call (prefill + decode);
- cache bytes per token: what each keeps per position of context, over all layers, read off the
  caches themselves after a prefill: ours the MLA latent (kv_lora_rank) + the shared rope key
  (qk_rope_head_dim). transformers 5's DeepseekV3 caches the same latent (its ``DynamicCache`` layers
  hold (batch, 1, seq, kv_lora_rank) "keys" and (batch, 1, seq, rope) "values"), so the issue's
  peer, a full per-head K/V cache, is computed: heads x (nope + rope + v) per layer and position,
  what a multi-head-attention cache of the same heads would keep (``full_kv``).

Cases (model @ prompt+new x batch):
    tiny@32+64x1     the smoke model, one stream (the headline)
    tiny@32+64x4     four streams
    small@128+64x1   4x wider, 2x deeper: bigger caches

    python -m bench.generate [--cases tiny@32+64x1] [--rounds 5] [--threads 1]
    python -m bench.generate --against DIR --lever NAME    (the headline decode, this tree vs DIR's)

``--against`` works as in ``bench.llm_step`` (``time_against``, workload "generate"); sections a run does
not measure (``levers``, ``attempts``) are kept from the previous JSON.

Writes bench/out/generate.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import transformers

from bench.common import OUT_DIR, machine, time_alternating, write_result
from bench.llm_step import MODELS, kept_sections, record_lever
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.attention import LatentKVCache
from xoron_dist.model.llm.hf import from_hf_state_dict, hf_config_kwargs

DEFAULT_CASES = "tiny@32+64x1,tiny@32+64x4,small@128+64x1"
HEADLINE = "tiny@32+64x1"


def cache_bytes_per_token(ours: XoronLLM, hf, prompt: torch.Tensor) -> dict[str, float]:
    cfg, (batch, seq) = ours.cfg, prompt.shape
    cache = LatentKVCache.allocate(cfg, batch, seq, prompt.device, ours.embed_tokens.weight.dtype)
    with torch.no_grad():
        ours(prompt, cache=cache)
        past = hf(prompt, use_cache=True).cache
    ours_bytes = sum(t.numel() * t.element_size() for t in (*cache.latent, *cache.rope_key))
    hf_bytes = sum(t.numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values))
    width = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    full = cfg.num_layers * width * ours.embed_tokens.weight.element_size()
    return {"ours": ours_bytes / (batch * seq), "hf": hf_bytes / (batch * seq), "full_kv": float(full)}


def run_case(case: str, rounds: int) -> dict:
    match = re.fullmatch(r"(\w+)@(\d+)\+(\d+)x(\d+)", case)
    if not match or match.group(1) not in MODELS:
        raise SystemExit(f"case '{case}' must look like MODEL@PROMPT+NEWxBATCH with MODEL in {sorted(MODELS)}")
    model_name, prompt_len, new, batch = match.group(1), *map(int, match.groups()[1:])
    cfg = load_config(None, MODELS[model_name]).llm
    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg))
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    ours = XoronLLM(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()))
    prompt = torch.randint(0, cfg.usable_vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))

    def run_ours() -> torch.Tensor:
        return ours.generate_text(prompt, new, temperature=0)

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                               pad_token_id=0, eos_token_id=None)

    same = torch.equal(run_ours(), run_hf())
    if not same:  # greedy ties can flip on float noise; report it rather than time different work
        print(f"  warning: {case}: greedy tokens differ between ours and HF")
    seconds = time_alternating({"ours": run_ours, "hf": run_hf}, rounds=rounds, reps=1)
    tps = {name: batch * new / s for name, s in seconds.items()}
    cache = cache_bytes_per_token(ours, hf, prompt)
    print(f"\n{case}: prompt {prompt_len}, {new} new tokens x {batch}")
    for name in tps:
        print(f"  {name:<5} {seconds[name] * 1e3:>9.1f} ms/call {tps[name]:>8.1f} tokens/s "
              f"{cache[name]:>8.0f} cache bytes/token")
    print(f"  a full per-head K/V cache: {cache['full_kv']:.0f} bytes/token")
    return {"tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "ratio": round(tps["ours"] / tps["hf"], 3),
            "cache_bytes_per_token": cache, "cache_ratio_vs_full_kv": round(cache["ours"] / cache["full_kv"], 3),
            "cache_ratio_vs_hf": round(cache["ours"] / cache["hf"], 3),
            "same_tokens": same, "config": MODELS[model_name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--against", type=Path, help="folder holding the xoron_dist of before a change")
    parser.add_argument("--lever", default="levers", help="the change's name in the JSON's levers list")
    parser.add_argument("--lever-what", default="", help="one line saying what the change is")
    parser.add_argument("--lever-rounds", type=int, default=6)
    args = parser.parse_args()
    if args.against is not None:  # only the lever: the rest of the JSON stays as recorded
        result = json.loads((OUT_DIR / "generate.json").read_text())
        record_lever(result, args.lever, args.against, "generate", args.lever_rounds, args.lever_what)
        print(f"\n-> {write_result('generate', result)}")
        return
    torch.set_num_threads(args.threads)
    cases = {case: run_case(case, args.rounds) for case in args.cases.split(",")}
    kept = kept_sections("generate", {"headline": HEADLINE, "machine": machine(), "cases": cases})
    head_name = HEADLINE if HEADLINE in kept["cases"] else next(iter(cases))
    head = kept["cases"][head_name]
    result = {
        "headline": head_name,
        "metric": f"greedy decoding tokens/s (prefill + decode), case {head_name}, higher is better; "
                  "and KV-cache bytes per token of context",
        "unit": "tokens/s",
        "ours": head["tokens_per_s"]["ours"],
        "peer": head["tokens_per_s"]["hf"],
        "peer_name": f"transformers {transformers.__version__} DeepseekV3ForCausalLM.generate (DynamicCache, "
                     "full per-head K/V), same weights",
        "ratio": head["ratio"],
        "goal": "tokens/s >= 1.5x HF; cache bytes/token <= 0.3x a full per-head K/V cache",
        "cache_ratio_vs_full_kv": head["cache_ratio_vs_full_kv"],
        "cache_ratio_vs_hf": head["cache_ratio_vs_hf"],
        "machine": machine(),
        "cases": kept["cases"],
    }
    result |= {key: value for key, value in kept.items() if key not in result}
    print(f"\n-> {write_result('generate', result)}")


if __name__ == "__main__":
    main()
