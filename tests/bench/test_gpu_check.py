"""``bench/gpu_check.py`` without a GPU: its arithmetic, its report and driver, and a rehearsal of its parts.

The check runs when a session is lent a GPU, for a few minutes at most, so a part that fails on its own code
wastes the one chance that session has. Here every part that measures in-process (backbone with its Megatron
peer, kernels, compile, moe, head) runs its own code at the tiny rehearsal size on the CPU, in a fresh rank
(DeepSpeed's MoE and Megatron set up process groups; compiling sets dynamo's global config); the parts that
start the trainer or pytest (smoke, syncs, tests) run in ``python -m bench.gpu_check --rehearse``, and the
syncs part's step cutting is tested below.
"""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xoron_dist.config import LLMConfig
from xoron_dist.model.flops import TRAIN_FACTOR, attention_flops


def test_gpu_check_peer_is_the_dense_gpt_of_the_full_backbone():
    from bench.gpu_check import active_ffn_width, peer_config

    full = LLMConfig()  # pipelines/xoron_full.yaml's model: 6 dense layers (2048) and 6 MoE layers ((2 + 1) x 2048)
    assert active_ffn_width(full) == (6 * 2048 + 6 * 3 * 2048) // 12 == 4096
    peer = peer_config(full, 4096)
    assert (peer.hidden, peer.layers, peer.heads, peer.ffn, peer.vocab, peer.seq) == (1024, 12, 16, 4096, 151_936, 4096)


def test_gpu_check_megatron_peer_flops_match_the_flop_counter(one_thread):
    """The peer's FLOP formula against the Megatron-core GPTModel it describes (tiny, one gloo rank), the way
    bench/gpu_check.py calls it: its unfused attention (local spec) counts the full s², and has no recompute."""
    from bench.gpu_check import PeerConfig, build_megatron_gpt, gpt_forward_flops, megatron_on_cpu, megatron_single_rank

    peer = PeerConfig(hidden=32, layers=2, heads=4, ffn=48, vocab=64, seq=16)
    batch = 3
    ids, positions = torch.randint(0, peer.vocab, (batch, peer.seq)), torch.arange(peer.seq).expand(batch, -1)
    with megatron_single_rank("gloo"), megatron_on_cpu():
        torch.manual_seed(0)
        model, spec = build_megatron_gpt(peer, torch.float32, torch.device("cpu"))
        if spec != "local":
            pytest.skip("Transformer Engine is installed: its layers run on CUDA only")
        with FlopCounterMode(display=False) as forward:
            losses = model(ids, positions, attention_mask=None, labels=ids)
        with FlopCounterMode(display=False) as both:
            model(ids, positions, attention_mask=None, labels=ids).float().mean().backward()
    assert losses.shape == (batch, peer.seq) and torch.isfinite(losses).all()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert any(p.shape == (2 * peer.ffn, peer.hidden) for p in matrices)  # SwiGLU of the stated width
    assert forward.get_total_flops() == gpt_forward_flops(peer, batch, causal=False)
    assert both.get_total_flops() == TRAIN_FACTOR * gpt_forward_flops(peer, batch, causal=False)
    attention = peer.layers * attention_flops(batch, peer.heads, peer.seq, peer.seq, 8, 8, causal=False)
    assert gpt_forward_flops(peer, batch, causal=True) == gpt_forward_flops(peer, batch, causal=False) - attention // 2


def test_megatron_on_cpu_restores_what_it_answers():
    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core import tensor_parallel

    from bench.gpu_check import megatron_on_cpu

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = (torch.cuda.current_device, fused_softmax.get_default_causal_mask, type(tracker).fork)
    with megatron_on_cpu():
        assert torch.cuda.current_device() == "cpu" and "fork" in vars(tracker)
    assert (torch.cuda.current_device, fused_softmax.get_default_causal_mask) == before[:2]
    assert "fork" not in vars(tracker) and type(tracker).fork is before[2]


def test_gpu_check_mfu_report_and_part_failures(tmp_path, monkeypatch):
    import bench.gpu_check as gc

    got = gc.mfu(6e14, 2.0, 989.5)
    assert got["tflops"] == pytest.approx(300.0) and got["mfu"] == pytest.approx(300.0 / 989.5)
    assert gc.mfu(6e14, 2.0, None)["mfu"] is None
    path = gc.write_report(tmp_path / "out" / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    # a part that fails or overruns is recorded, and the driver goes on
    failed = gc.run_part("backbone", timeout=60, module="json.tool")  # json.tool refuses these arguments: exit status 2
    assert failed["status"] == "failed" and failed["returncode"] == 2 and "json.tool" in failed["tail"]
    assert gc.run_part("backbone", timeout=0.001)["status"] == "timeout"
    summary = gc.summarise({"backbone": failed}, "cpu")
    assert summary["ours"] is None and summary["ratio"] is None and summary["parts"]["backbone"] is failed
    ok = {"status": "ok", "result": {"ours": {"mfu": 0.4}, "peer": {"mfu": 0.5, "spec": "local"}}}
    assert gc.summarise({"backbone": ok}, "H200")["ratio"] == pytest.approx(0.8)
    # no GPU: the driver says so and exits 2 (bench/gpu_check.sh checks the same before starting it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 2 and not (tmp_path / "x.json").exists()
    with pytest.raises(gc.NoGPUError, match="needs a GPU.*--rehearse"):
        gc.gpu_target()
    # a rehearsal that a part fails is a failure: the script is not ready for the GPU
    out = tmp_path / "r.json"
    monkeypatch.setattr(gc, "run_part", lambda name, timeout, rehearse: {"status": "failed", "seconds": 0.0})
    assert gc.main(["--rehearse", "--out", str(out)]) == 1
    assert {name: part["status"] for name, part in json.loads(out.read_text())["parts"].items()} == \
        dict.fromkeys(gc.PARTS, "failed")
    # --parts reruns some, in PARTS order, and keeps the report's others
    ran = []

    def run_part(name, timeout, rehearse):
        ran.append(name)
        return {"status": "ok", "seconds": 1.0}

    monkeypatch.setattr(gc, "run_part", run_part)
    assert gc.main(["--rehearse", "--parts", "head,kernels", "--out", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert ran == ["kernels", "head"] and list(parts) == list(gc.PARTS)
    assert {name for name, part in parts.items() if part["status"] == "ok"} == {"kernels", "head"}
    with pytest.raises(SystemExit):  # argparse's usage error
        gc.main(["--rehearse", "--parts", "kernel"])


# The in-process parts, in the order of PARTS. compile runs with aot_eager (dynamo's capture and AOT autograd
# graphs with eager kernels): inductor's cold C++ build costs about 30 s here (--rehearse runs inductor).
REHEARSED = ("backbone", "kernels", "compile", "moe", "head")


def _rehearse_parts() -> dict:
    import bench.gpu_check as gc
    import xoron_dist.model.common.attention_kernels as ak
    import xoron_dist.train.compile as compile_module
    from tests.model import cuda_sdpa_emulator as emu

    compile_module.BACKEND = "aot_eager"
    target = gc.rehearsal_target()
    got = {name: gc.PART_FUNCTIONS[name](target) for name in REHEARSED}
    # the kernels part's CUDA branch (both CUDA kernels compared), on the emulated CUDA ops
    ak._device_type, ak.CUDA_OPS = (lambda t: "cuda"), emu.EMULATED_CUDA_OPS
    got["kernels_emulated_cuda"] = gc.part_kernels(target)
    return got


def test_gpu_check_parts_rehearse_on_cpu():
    """Each in-process part's own code at the tiny size on the CPU: it runs and reports what the GPU run would
    (times, ratios, errors), and its numbers say the two sides computed the same thing."""
    from bench.gpu_check import PARTS, rehearsal_target
    from tests.parallel.harness import run_ranks

    [got] = run_ranks(_rehearse_parts, 1, timeout=240)
    assert set(REHEARSED) <= set(PARTS)
    target = rehearsal_target()
    tokens = target.batch * target.seq

    backbone = got["backbone"]
    assert backbone["layers"] == backbone["full_layers"] == target.llm.num_layers and backbone["device"] == "cpu"
    for side in ("ours", "peer"):
        seconds = backbone[side]["step_s"]
        assert seconds > 0 and backbone[side]["tokens_per_s"] == pytest.approx(tokens / seconds)
        assert backbone[side]["mfu"] is None and backbone[side]["peak_memory_gb"] is None  # no peak, no CUDA memory
    assert backbone["peer"]["config"]["hidden"] == target.llm.hidden_size and backbone["peer"]["spec"] == "local"
    profile = backbone["ours"]["profile"]  # one profiled step: its costliest ops, on the CPU here
    assert profile["time"] == "cpu" and profile["busy_s"] > 0 and len(profile["top"]) == 15
    assert "aten::mm" in {row["op"] for row in profile["top"]} and 0 < sum(r["share"] for r in profile["top"]) <= 1

    kernels = got["kernels"]
    assert kernels["bfloat16"]["max_err_out"] < 0.05 and kernels["float32"]["max_err_out"] < 1e-5
    assert kernels["float32"]["max_err_grads"] < 1e-5 and kernels["bfloat16"]["kernel"] == "cpu_flash"
    assert "bfloat16_efficient" not in kernels  # the CPU has one kernel
    # SDPA's fused CPU kernel takes one head dim (MLA's v is narrower); the CUDA backends are not on the CPU
    assert all("refused" in backend for backend in kernels["sdpa_backends_bfloat16"].values())
    emulated = got["kernels_emulated_cuda"]
    assert [emulated[case]["kernel"] for case in ("bfloat16", "float32", "bfloat16_efficient")] == \
        ["cuda_flash", "cuda_efficient", "cuda_efficient"]
    assert all(emulated[case]["max_err_out"] < 0.05 and emulated[case]["max_err_grads"] < 0.05
               for case in ("bfloat16", "bfloat16_efficient"))

    compiled = got["compile"]
    assert compiled["blocks"] == target.llm.num_layers and compiled["speedup"] > 0
    assert compiled["loss_compiled"] == pytest.approx(compiled["loss_eager"], rel=1e-2)  # bf16, other kernel order

    moe = got["moe"]
    assert moe["tokens"] == target.moe_tokens and moe["ratio"] > 0 and moe["experts"] == target.llm.moe.num_experts
    assert "aten::_grouped_mm" in {row["op"] for row in moe["profile"]["top"]}  # ours' experts, in the profile

    head = got["head"]
    assert list(head["chunks"]) == [str(c) for c in target.head_chunks] and head["tokens"] == tokens
    assert head["vocab_rows"] == target.llm.vocab_rows(1) and head["dW_accumulates_in_place"] is False  # CPU: no kernel
    assert head["loss_spread"] < 1e-2 and all(math.isfinite(r["seconds"]) for r in head["chunks"].values())


def _step_syncs_body() -> dict:
    from bench.host_syncs import step_syncs

    return step_syncs(["data.source=synthetic_text", "train.log_every=1", "data.num_workers=0"], steps=4)


def test_gpu_check_syncs_part_cuts_the_run_into_steps():
    """``bench/gpu_check.py``'s syncs part on CPU: the counter's syncs per step, steps 2 and 3 (step 1 warms
    up; step 4 has no later start), alike from step to step; no CUDA column without CUDA."""
    from tests.parallel.harness import run_ranks

    [result] = run_ranks(_step_syncs_body, 1, timeout=240)
    assert result["steps"] == [2, 3] and result["cuda"] is None
    assert result["counted"][0] == result["counted"][1] > 0, result


def test_gpu_session_refuses_wheels_of_another_python(tmp_path):
    """bench/gpu_session.sh on a lent machine: without wheels, or with wheels built for another Python than the
    machine's, it stops before installing anything and says what to run here (device minutes are scarce)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "bench").mkdir()
    script = shutil.copy(Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh", tmp_path / "bench")

    def session() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})

    missing = session()
    assert missing.returncode == 2 and "bash bench/gpu_wheels.sh" in missing.stderr
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "x-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / ".whl" / "PYTHON_VERSION").write_text("2.7\n")
    other = session()
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert other.returncode == 2 and f"for Python 2.7, {sys.executable} here is {here}" in other.stderr
    assert f"PYVER={here} bash bench/gpu_wheels.sh" in other.stderr
