"""Device-to-host syncs per optimizer step of the real trainer, at the full recipe's structure, vs HF's training step.

A sync (a value read on the host, or an op whose output size is data) stalls a GPU's queue. On CPU they cost
nothing, so they are counted, not timed: ``utils.host_syncs.HostSyncCounter`` sees
every one Python asks for, by call and by calling line.

- ours: ``xoron_dist.train.trainer.train`` on one rank (gloo, CPU), the LLM of the full recipe's structure
  (12 layers, MoE on every second: 6 MoE layers, 8 routed + 1 shared experts, top-2; tiny widths, which
  change no control flow), gradient accumulation 8, activation checkpointing (every block's forward runs
  twice), a log line every step (the worst case). The whole trainer is counted: data, forward, loss,
  backward, optimizer, expert balancing, guard, logging. Per step = (syncs of a 4-step run - a 2-step
  run) / 2, so set-up and the final save cancel out. Sites under ``xoron_dist/model`` are the model's.
- peer: HF ``transformers`` ``DeepseekV3ForCausalLM`` of the same config (its ``grouped_mm`` experts,
  gradient checkpointing on) except that its 6 layers are all MoE (it cannot interleave dense and MoE
  layers), 8 micro-batches of forward + loss + backward, then fused AdamW (the HF Trainer's default
  optimizer; torch's for-loop AdamW reads each parameter's CPU step counter with ``.item()``, which is no
  GPU sync but which a CPU-only count cannot tell apart): the same counter.

The counter sees reads of CPU tensors too (a CPU-only machine has no other kind), so a site that reads a
tensor kept on the CPU is listed although on a GPU it waits for nothing; ``ours_by_site`` shows each.
  A model step without a trainer around it, so it is the lower bound of what a trainer built on it pays.

Cases: ``ep1`` (one rank) and ``ep2`` (two ranks, ``parallel.ep=2``: each holds 4 of the 8 experts and
exchanges tokens by all-to-all; rank 0's count), and ``multimodal_smoke``: the README's smoke run as it is
(every modality's encoders and generators; what is left of its media paths' reads sits where the data
decides a shape: document and prompt lengths, the speech alignment, the codebook's dead codes, input
checks). Each site is owned by the model (``xoron_dist/`` outside ``train/``, the parallel layers
included), the trainer (``xoron_dist/train/``) or DeepSpeed.

Goal (issue 18): <= 1 per MoE layer with expert parallelism, 0 without (the model's count per MoE layer).

    python -m bench.host_syncs [--ep 2] [--no-multimodal]

Writes bench/out/host_syncs.json (``ours``/``peer``: syncs per optimizer step, ratio = peer / ours).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from bench.common import machine, write_result
from tests.parallel.harness import run_ranks

SMOKE = Path(__file__).resolve().parent.parent / "pipelines" / "smoke.yaml"
ACCUM = 8
RECIPE = ["data.source=synthetic_text", "model.llm.num_layers=12", "model.llm.moe_layer_freq=2",
          f"train.grad_accum_steps={ACCUM}", "train.micro_batch_size=1", "train.seq_len=64",
          "train.activation_checkpointing=true", "train.log_every=1", "train.tensorboard=false"]
# The README's smoke run as it is (pipelines/smoke.yaml: the multimodal model on its synthetic Arrow data,
# accumulation 1, no checkpointing), a log line every step; workers in-process (a harness rank cannot fork).
MULTIMODAL = ["train.log_every=1", "train.tensorboard=false", "data.num_workers=0"]
# DeepseekV3 cannot put MoE on every second layer: the peer has ours' 6 MoE layers without the 6 dense ones
PEER_LAYERS = ["model.llm.num_layers=6", "model.llm.moe_layer_freq=1"]


def _trainer_syncs(root: str, steps: int, overrides: list[str]) -> tuple[dict, dict, int]:
    from xoron_dist.config import load_config
    from xoron_dist.train.trainer import train
    from xoron_dist.utils.host_syncs import HostSyncCounter

    cfg = load_config(SMOKE, [*overrides, f"train.steps={steps}", f"train.output_dir={root}",
                              f"train.name=syncs{steps}"])
    with HostSyncCounter(where=True) as syncs:
        train(cfg)
    return dict(syncs.calls), dict(syncs.sites), len(cfg.llm.moe_layers)


def step_syncs(overrides: list[str], steps: int = 4) -> dict:
    """The syncs of each optimizer step of one trainer run (pipelines/smoke.yaml + ``overrides``), the first
    step left out (it warms up): ``counted``, ``HostSyncCounter``'s count, and on CUDA ``cuda``, what CUDA
    reports (``torch.cuda.set_sync_debug_mode``: one warning per synchronizing call, the blocking copies the
    counter cannot see included). Steps are cut where the trainer's watchdog hears a step start."""
    import warnings

    import torch

    from xoron_dist.config import load_config
    from xoron_dist.train.trainer import train
    from xoron_dist.train.watchdog import HangWatchdog
    from xoron_dist.utils.host_syncs import HostSyncCounter

    cuda = torch.cuda.is_available()
    marks: list[tuple[int, int]] = []  # (counted so far, warnings so far) at each step's start
    original = HangWatchdog.beat
    with tempfile.TemporaryDirectory() as root, HostSyncCounter() as counter, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def beat(self, step: int, phase: str) -> None:
            if phase == "step":
                marks.append((counter.total, len(caught)))
            original(self, step, phase)

        HangWatchdog.beat = beat
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(load_config(SMOKE, [*overrides, f"train.steps={steps}", f"train.output_dir={root}",
                                      "train.name=step_syncs", "train.tensorboard=false"]))
        finally:
            HangWatchdog.beat = original
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    syncing = [int("synchroniz" in str(w.message)) for w in caught]
    spans = list(zip(marks[:-1], marks[1:], strict=True))[1:]  # step k: beat k to beat k + 1; step 1 warms up
    return {"steps": [k + 2 for k in range(len(spans))], "counted": [b[0] - a[0] for a, b in spans],
            "cuda": [sum(syncing[a[1]:b[1]]) for a, b in spans] if cuda else None}


def _hf_syncs(overrides: list[str]) -> tuple[dict, dict]:
    import torch
    import torch.nn.functional as F
    import transformers

    from xoron_dist.config import load_config
    from xoron_dist.model.llm.hf import hf_config_kwargs
    from xoron_dist.utils.host_syncs import HostSyncCounter

    cfg = load_config(SMOKE, [*overrides, *PEER_LAYERS])
    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg.llm))
    hf_cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = [torch.randint(0, cfg.llm.usable_vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1))
               for _ in range(ACCUM)]

    def step() -> None:
        for ids in batches:
            logits = model(ids[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).div(ACCUM).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step builds the optimizer state
    with HostSyncCounter(where=True) as syncs:
        step()
    return dict(syncs.calls), dict(syncs.sites)


def _per_step(long: dict, short: dict, steps: int) -> dict[str, float]:
    diff = Counter(long)
    diff.subtract(short)
    return {k: v / steps for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v}


def _owner(site: str) -> str:
    """Who asks for a sync: the model (and its parallel layers), the trainer, the data path, DeepSpeed, or other."""
    if site.startswith("xoron_dist/train/"):
        return "trainer"
    if site.startswith("xoron_dist/data/"):
        return "data"
    if site.startswith("xoron_dist/"):
        return "model"
    return "deepspeed" if site.startswith("deepspeed/") else "other"


def trainer_case(ranks: int, overrides: list[str], recipe: bool = True) -> dict:
    """Rank 0's syncs per optimizer step of the trainer on ``ranks`` gloo ranks, by call, site and owner."""
    root = tempfile.mkdtemp(prefix="host_syncs_")
    runs = {steps: run_ranks(_trainer_syncs, ranks, root, steps, overrides, timeout=1200)[0] for steps in (2, 4)}
    calls = _per_step(runs[4][0], runs[2][0], 2)
    sites = _per_step(runs[4][1], runs[2][1], 2)
    moe_layers = runs[4][2]
    by_owner: Counter[str] = Counter()
    by_part: Counter[str] = Counter()  # the model's syncs by package (xoron_dist/model/speech, ...)
    for site, n in sites.items():
        owner = _owner(site)
        by_owner[owner] += n
        if owner == "model":
            by_part["/".join(site.split(":")[0].split("/")[:3])] += n
    model = by_owner.get("model", 0)
    case = {"ranks": ranks, "config": overrides, "moe_layers": moe_layers, "syncs_per_step": sum(calls.values()),
            "by_owner": dict(by_owner), "model_by_part": dict(by_part.most_common()), "by_call": calls,
            "by_site": sites}
    if recipe:  # the LLM recipe: every MoE layer's forward runs twice per micro-batch (checkpointing)
        case["model_per_moe_layer_forward"] = round(model / (moe_layers * ACCUM * 2), 3)
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for both sides")
    parser.add_argument("--ep", type=int, default=2, help="also the trainer on this many ranks with parallel.ep "
                        "set to it (0: skip)")
    parser.add_argument("--no-multimodal", action="store_true", help="skip the multimodal smoke case")
    args = parser.parse_args()
    overrides = [*RECIPE, *args.set]
    cases = {"ep1": trainer_case(1, overrides)}
    if args.ep > 1:
        cases[f"ep{args.ep}"] = trainer_case(args.ep, [*overrides, f"parallel.ep={args.ep}"])
    if not args.no_multimodal:  # the smoke run itself: every modality's encoder and generator
        cases["multimodal_smoke"] = trainer_case(1, [*MULTIMODAL, *args.set], recipe=False)
    hf_calls, hf_sites = _hf_syncs(overrides)
    peer = sum(hf_calls.values())
    for name, case in cases.items():
        print(f"ours, {name} ({case['ranks']} rank(s), rank 0): {case['syncs_per_step']:g} syncs per optimizer step "
              f"({case['moe_layers']} LLM MoE layers): {case['by_owner']}")
        for site, n in case["by_site"].items():
            print(f"  {n:6g}  {site}")
    print(f"peer (HF DeepseekV3ForCausalLM step): {peer} syncs: {hf_calls}")
    for site, n in sorted(hf_sites.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {site}")
    head = cases["ep1"]
    result = {
        "metric": "device-to-host syncs per optimizer step (counted, one rank), lower is better",
        "unit": "syncs per step",
        "ours": head["syncs_per_step"],
        "peer": peer,
        "peer_name": "HF transformers DeepseekV3ForCausalLM, the same config with 6 layers, all MoE (grouped_mm "
                     "experts, gradient checkpointing): 8 micro-batches of forward + loss + backward, then "
                     "fused AdamW; no trainer around it",
        "ratio": round(peer / head["syncs_per_step"], 3) if head["syncs_per_step"] else None,
        "goal": "<= 1 per MoE layer with expert parallelism, 0 without (the model's syncs: "
                "model_per_moe_layer_forward)",
        "machine": machine(),
        "cases": cases,
        "peer_by_call": hf_calls,
        "peer_by_site": hf_sites,
    }
    print(f"\n-> {write_result('host_syncs', result)}")


if __name__ == "__main__":
    main()
