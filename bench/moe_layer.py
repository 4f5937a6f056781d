"""MoE layer throughput (forward + backward, EP=1): ours vs DeepSpeed's native MoE vs HF DeepseekV3MoE.

Same dims for all three: ``num_experts`` routed SwiGLU experts of width ``expert_intermediate_size``,
top-2, plus one shared SwiGLU expert of the same width, on the same tokens, in the same process,
alternating round by round (bench/common.py). One call = forward, a mean-square loss, backward
(gradients of the input and of every weight).

- ours: ``xoron_dist.model.common.moe.MoEFeedForward`` (sigmoid router + expert bias, sorted dropless dispatch,
  grouped expert GEMMs with device-side offsets: no host sync).
- ours_loop: the same layer with ``RoutedExperts.use_grouped_mm = False`` (one matmul per expert over slice sizes
  read on the host: one sync per layer), printed beside ours; not a peer.
- HF: ``transformers`` ``DeepseekV3MoE`` with the same weights (its output is checked equal to ours),
  both of its experts implementations (``grouped_mm`` and ``eager``).
- DeepSpeed: ``deepspeed.moe.layer.MoE`` (top-2 softmax gate, dropless ``drop_tokens=False``, no
  second-expert sampling noise) with a SwiGLU expert of the same width, plus the same shared expert
  added alongside (its gate differs from ours, so only the work, not the output, is the same).
- limit: not a peer but the bound: one dense SwiGLU of width (top_k + 1) x the expert width over the same
  tokens: the routed and shared experts' FLOPs as two large GEMMs (forward), no routing, no gather/scatter.

    python -m bench.moe_layer [--cases tiny@4096,mid@2048,full@1024] [--rounds 5]

Writes bench/out/moe_layer.json (headline: the ``mid`` case).
"""

from __future__ import annotations

import argparse
import os
import re

import deepspeed
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from bench.common import machine, time_alternating, write_result
from xoron_dist.config import MoEConfig
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.parallel.launcher_env import free_port

CASES = {  # name -> (hidden, expert_intermediate_size)
    "tiny": (128, 64),  # the tiny preset's MoE (tests, smoke)
    "mid": (512, 512),
    "full": (1024, 1408),  # XoronConfig(): the seed's full size
}
DEFAULT_CASES = "tiny@4096,mid@2048,full@1024"
HEADLINE = "mid"
NUM_EXPERTS, TOP_K = 8, 2

# HF DeepseekV3MoE parameter -> ours (MoEFeedForward)
_NAMES = {
    "gate.weight": "router.weight",
    "gate.e_score_correction_bias": "router.expert_bias",
    "experts.gate_up_proj": "experts.gate_up",
    "experts.down_proj": "experts.down",
    "shared_experts.gate_proj.weight": "shared.gate_proj.weight",
    "shared_experts.up_proj.weight": "shared.up_proj.weight",
    "shared_experts.down_proj.weight": "shared.down_proj.weight",
}


class SwiGLUExpert(nn.Module):
    """The expert module DeepSpeed's MoE replicates: SwiGLU of the same width as ours."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DeepSpeedMoEWithShared(nn.Module):
    """DeepSpeed's dropless MoE plus a shared SwiGLU expert; ``ep_size`` > 1 needs torch.distributed up
    (bench/ep_overlap.py: DeepSpeed reuses the expert group ``ep_size_<n>`` when one is registered)."""

    def __init__(self, hidden: int, intermediate: int, ep_size: int = 1, num_experts: int = NUM_EXPERTS,
                 top_k: int = TOP_K) -> None:
        super().__init__()
        self.moe = deepspeed.moe.layer.MoE(hidden, SwiGLUExpert(hidden, intermediate), num_experts=num_experts,
                                           ep_size=ep_size, k=top_k, drop_tokens=False, use_rts=False,
                                           top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        self.shared = SwiGLUExpert(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.moe(x)
        return out + self.shared(x)


def _init_single_rank_comm(backend: str = "gloo") -> None:
    """A one-rank process group for DeepSpeed's MoE (its expert groups); nccl for CUDA tensors."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as parallel/state.py: no JIT build on CPU
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def make_call(module: nn.Module, x: torch.Tensor):
    def call() -> None:
        inp = x.detach().requires_grad_()
        out = module(inp)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return call


def run_case(case: str, rounds: int) -> dict:
    match = re.fullmatch(r"(\w+)@(\d+)", case)
    if not match or match.group(1) not in CASES:
        raise SystemExit(f"case '{case}' must look like NAME@TOKENS with NAME in {sorted(CASES)}")
    name, tokens = match.group(1), int(match.group(2))
    hidden, inter = CASES[name]
    torch.manual_seed(0)
    moe_cfg = MoEConfig(num_experts=NUM_EXPERTS, num_shared_experts=1, top_k=TOP_K, expert_intermediate_size=inter)
    hf_cfg = transformers.DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter,
                                           n_routed_experts=NUM_EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
                                           n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    peers: dict[str, nn.Module] = {}
    for impl in ("grouped_mm", "eager"):
        hf_cfg._experts_implementation = impl
        torch.manual_seed(0)
        module = DeepseekV3MoE(hf_cfg).train()
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(std=0.02)
        peers[f"hf_{impl}"] = module
    if impl != "grouped_mm":
        peers["hf_eager"].load_state_dict(peers["hf_grouped_mm"].state_dict())
    ours = MoEFeedForward(hidden, moe_cfg).train()
    ours.load_state_dict({_NAMES[k]: v for k, v in peers["hf_grouped_mm"].state_dict().items()})
    torch.manual_seed(1)
    peers["deepspeed"] = DeepSpeedMoEWithShared(hidden, inter).train()
    with torch.no_grad():
        for param in peers["deepspeed"].parameters():
            param.normal_(std=0.02)
    ours_loop = MoEFeedForward(hidden, moe_cfg).train()
    ours_loop.load_state_dict(ours.state_dict())
    ours_loop.experts.use_grouped_mm = False
    x = torch.randn(1, tokens, hidden)
    with torch.no_grad():  # ours and HF: same weights, same routing -> same output
        diff = (ours(x) - peers["hf_eager"](x)).abs().max().item()
        assert diff < 1e-4, f"ours and HF DeepseekV3MoE differ by {diff}"
        assert torch.equal(ours(x), ours_loop(x)), "grouped and looped experts differ"
    fns = {"ours": make_call(ours, x), "ours_loop": make_call(ours_loop, x)}
    fns |= {n: make_call(m, x) for n, m in peers.items()}
    limit = SwiGLUExpert(hidden, (TOP_K + 1) * inter).train()  # the experts' FLOPs in one dense SwiGLU
    fns["limit"] = make_call(limit, x)
    reps = max(1, 4096 // tokens)
    seconds = time_alternating(fns, rounds=rounds, reps=reps)
    tps = {n: tokens / s for n, s in seconds.items()}
    best_peer = max((n for n in tps if not n.startswith("ours") and n != "limit"), key=tps.get)
    print(f"\n{case}: hidden {hidden}, {NUM_EXPERTS}+1 experts of {inter}, top-{TOP_K}, {tokens} tokens")
    for n in fns:
        print(f"  {n:<14} {seconds[n] * 1e3:>9.1f} ms/call {tps[n]:>10.0f} tokens/s")
    print(f"  ours / {best_peer} = {tps['ours'] / tps[best_peer]:.3f}; ours / ours_loop = "
          f"{tps['ours'] / tps['ours_loop']:.3f}; ours / limit = {tps['ours'] / tps['limit']:.3f}")
    return {"tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "best_peer": best_peer,
            "ratio": round(tps["ours"] / tps[best_peer], 3), "of_limit": round(tps["ours"] / tps["limit"], 3),
            "hidden": hidden, "expert_intermediate_size": inter,
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    _init_single_rank_comm()
    cases = {case.split("@")[0]: run_case(case, args.rounds) for case in args.cases.split(",")}
    head_name = HEADLINE if HEADLINE in cases else next(iter(cases))
    head = cases[head_name]
    result = {
        "metric": f"MoE layer tokens/s (forward + backward, EP=1), case {head_name}, higher is better",
        "unit": "tokens/s",
        "ours": head["tokens_per_s"]["ours"],
        "peer": head["tokens_per_s"][head["best_peer"]],
        "peer_name": f"the faster of deepspeed {deepspeed.__version__} moe.layer.MoE (dropless) and transformers "
                     f"{transformers.__version__} DeepseekV3MoE (grouped_mm / eager): {head['best_peer']}",
        "ratio": head["ratio"],
        "goal": 1.2,
        "of_limit": head["of_limit"],  # ours / one dense SwiGLU of the same FLOPs
        "goal_of_limit": 0.9,
        "machine": machine(),
        "cases": cases,
    }
    print(f"\n-> {write_result('moe_layer', result)}")


if __name__ == "__main__":
    main()
