"""The GPU check of issue 18, one command (``bench/gpu_check.sh``), at most 9.5 minutes on one H200.

Parts, each in its own subprocess with its own time box (a crash, an out-of-memory or a timeout is
recorded in the report, and the next part runs):

    backbone   the full-size LLM (LLMConfig defaults = pipelines/xoron_full.yaml's model: hidden 1024,
               12 layers, MLA, 8 routed + 1 shared experts top-2, vocabulary 151,936 rows) forward +
               backward in bf16 at seq 4096: MFU, tokens/s, peak memory; beside a Megatron-core
               ``GPTModel`` of the same hidden size, layers, heads, vocabulary and sequence length in the
               same process. The peer is the comparable dense GPT: standard multi-head attention (head
               dim hidden/heads), SwiGLU with the mean *active* FFN width of our layers (dense layers:
               dense_intermediate_size; MoE layers: (top_k + shared) x expert_intermediate_size), RMSNorm,
               RoPE, tied embeddings, no biases; Transformer Engine's layer spec when it is installed,
               else Megatron's local spec. Each model's MFU is its own model FLOPs (ours:
               ``xoron_dist.model.flops``; the peer's: ``gpt_forward_flops``) over the device's bf16 peak.
               Layers are halved until the pair fits in memory (the report says how many ran).
    kernels    the attention-kernel adapter (``xoron_dist.model.common.attention_kernels``, the ring's
               block step) on CUDA against ``F.scaled_dot_product_attention``: max error of out and
               gradients, and forward + backward time, bf16 (flash kernel) and fp32 (efficient kernel).
    tests      ``pytest tests/model/test_attention_kernels.py -k real_cuda``, the bf16 lane of the
               trainer tests (``tests/train/test_trainer.py -k bf16``) and the pinned-memory batch path
               (``tests/data/test_arrow_blocks.py -k pin``, skipped without an accelerator).
    smoke      the multimodal smoke run on the GPU: ``xoron train --config pipelines/smoke.yaml`` for
               ``SMOKE_STEPS`` steps, with TensorBoard samples and a checkpoint at the last; its last
               metrics.jsonl line (loss, TFLOP/s, MFU) and the checkpoints it wrote.
    compile    ``train.compile`` on the GPU: the backbone (layers as the backbone part ran) eager vs with
               every decoder block compiled (``xoron_dist.train.compile.compile_blocks``, inductor), bf16
               fwd + bwd at the backbone's shape: the speedup and the first compiled step's seconds (on CPU,
               with the experts compiled in their blocks, 1.25x at the smoke shape, but a short CPU run does
               not earn back the cold compile, so the option defaults off; this decides the GPU default).
    moe        one MoE layer of the full model (LLMConfig's: hidden 1024, 8 routed experts + 1 shared of
               width 2048, top-2) fwd + bwd in bf16 on ``MOE_TOKENS`` tokens: ours (grouped GEMMs) vs
               DeepSpeed's dropless ``MoE`` with the same shared expert (``bench/moe_layer.py``'s peer),
               tokens/s.
    syncs      device-to-host syncs per optimizer step as CUDA reports them (``set_sync_debug_mode``)
               beside ``HostSyncCounter``'s count of the same steps (``bench.host_syncs.step_syncs``): the
               multimodal smoke run and the LLM recipe; the difference is what the CPU counter cannot see
               (blocking copies with ``.to(device)``, syncs inside kernels).
    head       the full model's LM head + loss (bf16, 151,936 rows, BATCH x SEQ tokens) fwd + bwd with
               ``train.loss_chunk_tokens`` at each of ``HEAD_CHUNKS`` (0: the one-piece head): seconds and
               peak memory, which check the option's CUDA default (2048, from the roofline in
               ``TrainConfig.loss_chunk_for``), and whether the bf16 ∂W accumulates in place.

Writes bench/out/gpu_check.json: the benchmark fields of DESIGN.md (headline: our MFU over the
peer's, higher is better) plus every part's status, seconds and numbers.

    python -m bench.gpu_check                 # every part (bench/gpu_check.sh checks for a GPU first)
    python -m bench.gpu_check --part kernels  # one part, its JSON on stdout

The CPU-testable pieces are tested in tests/model/test_flops.py: the peer's config; its FLOP formula
equal to ``FlopCounterMode`` on the Megatron model built at tiny size on one gloo rank and called as
here (its forward asks ``torch.cuda`` for a buffer device, the causal mask and the RNG tracker: the test
answers those on CPU); MFU; the report writer; the part runner's failure and timeout records; the no-GPU
exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "gpu_check.json"
SEQ, BATCH = 4096, 2
SMOKE_STEPS = 40
# seconds per part; together under 8 minutes with the interpreter starts
MOE_TOKENS = 8192
# seconds per part (the first H200 run took 24, 8, 56 and 105 s for the first four); bench/gpu_check.sh
# gives the whole check 570 s
TIME_BOX = {"backbone": 70, "kernels": 30, "tests": 90, "smoke": 125, "compile": 110, "moe": 50, "syncs": 75,
            "head": 20}
PARTS = tuple(TIME_BOX)


class NoGPUError(RuntimeError):
    """This check needs a CUDA device."""


# --- the peer and the arithmetic (CPU-testable) ---------------------------------------------------


@dataclass(frozen=True)
class PeerConfig:
    """The dense Megatron-core GPT compared with our backbone."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int


def active_ffn_width(llm) -> int:
    """Mean FFN width a token passes through per layer: dense layers' width, MoE layers' (top_k + shared) x
    expert width (the experts that run for it), rounded to a multiple of 64."""
    widths = [(llm.moe.top_k + llm.moe.num_shared_experts) * llm.moe.expert_intermediate_size
              if llm.is_moe_layer(i) else llm.dense_intermediate_size for i in range(llm.num_layers)]
    return int(round(sum(widths) / len(widths) / 64) * 64)


def peer_config(llm, seq: int) -> PeerConfig:
    """The peer of ``llm`` (LLMConfig): same hidden, layers, heads, vocabulary rows, sequence length."""
    return PeerConfig(llm.hidden_size, llm.num_layers, llm.num_heads, active_ffn_width(llm), llm.vocab_rows(1), seq)


def gpt_forward_flops(peer: PeerConfig, batch: int, causal: bool = True) -> int:
    """Forward matmul FLOPs of the peer GPT on (batch, seq): q, k, v, o projections, attention (halved when
    causal, as ``xoron_dist.model.flops``), SwiGLU, the LM head."""
    from xoron_dist.model.flops import attention_flops, linear_flops, swiglu_flops

    tokens, h = batch * peer.seq, peer.hidden
    head_dim = h // peer.heads
    layer = (linear_flops(tokens, h, 3 * h) + linear_flops(tokens, h, h) + swiglu_flops(tokens, h, peer.ffn)
             + attention_flops(batch, peer.heads, peer.seq, peer.seq, head_dim, head_dim, causal))
    return peer.layers * layer + linear_flops(tokens, h, peer.vocab)


def mfu(flops_per_step: float, step_s: float, peak_tflops: float | None) -> dict:
    """TFLOP/s of one device and the fraction of its peak (None without a peak)."""
    tflops = flops_per_step / step_s / 1e12
    return {"tflops": tflops, "mfu": None if peak_tflops is None else tflops / peak_tflops}


def write_report(path: Path, report: dict) -> Path:
    """The report as strict JSON (NaN/inf as null), creating the folder."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(report), indent=2, allow_nan=False) + "\n")
    return path


@contextlib.contextmanager
def megatron_single_rank(backend: str) -> Iterator[None]:
    """Megatron-core's parallel state over a one-rank process group (gloo on CPU, nccl on CUDA); torn down
    after. A process group that already exists is used as it is (and left)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from xoron_dist.parallel.launcher_env import free_port

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owned:
            dist.destroy_process_group()


def build_megatron_gpt(peer: PeerConfig, dtype: torch.dtype, device: torch.device):
    """The peer as a Megatron-core ``GPTModel`` (inside ``megatron_single_rank``); returns (model, spec name)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        import transformer_engine  # noqa: F401

        spec, spec_name = specs.get_gpt_layer_with_transformer_engine_spec(), "transformer_engine"
    except ImportError:
        spec, spec_name = specs.get_gpt_layer_local_spec(normalization="RMSNorm"), "local"
    on_cpu = device.type == "cpu"
    config = TransformerConfig(
        num_layers=peer.layers, hidden_size=peer.hidden, num_attention_heads=peer.heads, ffn_hidden_size=peer.ffn,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        attention_dropout=0.0, hidden_dropout=0.0, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=on_cpu)  # Megatron's fusions stay at their defaults: off (they need apex / TE builds)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=peer.vocab, max_sequence_length=peer.seq,
                     position_embedding_type="rope", share_embeddings_and_output_weights=True)
    return model.to(device), spec_name


# --- the parts (GPU) ------------------------------------------------------------------------------


def _require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGPUError("no CUDA device: bench/gpu_check needs a GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda", 0)


def _time_cuda(fn, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak() -> tuple[str, float | None]:
    from xoron_dist.train.metrics import lookup_device_peak

    name = torch.cuda.get_device_name(0)
    entry = lookup_device_peak(name)
    return name, None if entry is None else entry.bf16


def _fwd_bwd_seconds(model: torch.nn.Module, loss_of) -> float:
    """Median seconds of forward + backward of ``loss_of(model)`` (gradients dropped after each)."""
    def step() -> None:
        loss_of(model).backward()
        model.zero_grad(set_to_none=True)

    return _time_cuda(step, warmup=2, iters=5)


def _ours(llm, ids: torch.Tensor, device: torch.device, peak: float | None) -> dict:
    from xoron_dist.model.flops import llm_step_flops
    from xoron_dist.model.llm.model import XoronLLM

    torch.manual_seed(0)
    model = XoronLLM(llm).to(device=device, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    seconds = _fwd_bwd_seconds(model, lambda m: m(ids, labels=ids).loss)
    flops = llm_step_flops(llm, BATCH, SEQ)
    return {"step_s": seconds, "tokens_per_s": BATCH * SEQ / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "flops_per_step": flops,
            **mfu(flops, seconds, peak)}


def _peer(peer: PeerConfig, ids: torch.Tensor, device: torch.device, peak: float | None) -> dict:
    from megatron.core import tensor_parallel

    from xoron_dist.model.flops import TRAIN_FACTOR

    with megatron_single_rank("nccl"):
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model, spec = build_megatron_gpt(peer, torch.bfloat16, device)
        positions = torch.arange(SEQ, device=device).expand(BATCH, -1)
        torch.cuda.reset_peak_memory_stats()
        seconds = _fwd_bwd_seconds(model, lambda m: m(ids, positions, attention_mask=None, labels=ids).float().mean())
    flops = TRAIN_FACTOR * gpt_forward_flops(peer, BATCH)
    return {"step_s": seconds, "tokens_per_s": BATCH * SEQ / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "flops_per_step": flops, "spec": spec,
            "config": asdict(peer), **mfu(flops, seconds, peak)}


def _measure_pair(llm, layers: int, device: torch.device, peak: float | None) -> dict:
    llm = replace(llm, num_layers=layers)
    ids = torch.randint(0, llm.vocab_size, (BATCH, SEQ), device=device)
    ours = _ours(llm, ids, device, peak)
    torch.cuda.empty_cache()
    peer = _peer(peer_config(llm, SEQ), ids, device, peak)
    torch.cuda.empty_cache()
    return {"ours": ours, "peer": peer}


def part_backbone() -> dict:
    from xoron_dist.config import LLMConfig

    device = _require_cuda()
    name, peak = _peak()
    llm = LLMConfig()  # the full-size model (pipelines/xoron_full.yaml keeps the defaults)
    layers = llm.num_layers
    while True:
        try:
            pair = _measure_pair(llm, layers, device, peak)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if layers == 1:
                raise
            layers //= 2
    return {"device": name, "peak_bf16_tflops": peak, "layers": layers, "full_layers": llm.num_layers,
            "hidden": llm.hidden_size, "batch": BATCH, "seq": SEQ, **pair}


def _kernel_case(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int, int, int]) -> dict:
    """The adapter's causal fused attention (forward + external-LSE backward) against SDPA's on one input."""
    import torch.nn.functional as F

    from xoron_dist.model.common import attention_kernels as ak

    b, h, s, qk, dv = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(b, h, s, qk, device=device, dtype=dtype, generator=gen) for _ in range(2))
    v, dout = (torch.randn(b, h, s, dv, device=device, dtype=dtype, generator=gen) for _ in range(2))
    scale = qk**-0.5

    def adapter():
        o, lse = ak.attention_forward(q, k, v, scale=scale, causal=True)
        return o, ak.attention_backward(dout, q, k, v, o, lse, scale=scale, causal=True)

    def reference():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
        o.backward(dout)
        return o, tuple(t.grad for t in leaves)

    (o1, g1), (o2, g2) = adapter(), reference()
    errors = [(a.float() - r.float()).abs().max().item() for a, r in zip((o1, *g1), (o2, *g2), strict=True)]
    return {"kernel": ak.select_kernel("cuda", dtype, qk, dv, masked=False), "max_err_out": errors[0],
            "max_err_grads": max(errors[1:]), "adapter_s": _time_cuda(adapter, 2, 10),
            "sdpa_s": _time_cuda(reference, 2, 10)}


def part_kernels() -> dict:
    device = _require_cuda()
    shape = (2, 16, 4096, 96, 64)  # batch, heads, seq, the full model's MLA head dims (nope 64 + rope 32, v 64)
    out = {str(dtype).removeprefix("torch."): _kernel_case(dtype, device, shape)
           for dtype in (torch.bfloat16, torch.float32)}
    return {"shape": dict(zip(("batch", "heads", "seq", "qk_dim", "v_dim"), shape, strict=True)), **out}


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _run(cmd: list[str], timeout: float) -> dict:
    """A command's exit status (None: killed at ``timeout`` seconds), seconds and the tail of its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = None, _text(err.stdout) + _text(err.stderr)
    return {"cmd": " ".join(cmd), "returncode": returncode, "seconds": time.perf_counter() - start,
            "tail": output[-1500:]}


def part_tests() -> dict:
    _require_cuda()
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return {"real_cuda_kernels": _run([*pytest, "tests/model/test_attention_kernels.py", "-k", "real_cuda"], 40),
            "bf16_lane": _run([*pytest, "tests/train/test_trainer.py", "-k", "bf16"], 60),
            "pinned_memory": _run([*pytest, "tests/data/test_arrow_blocks.py", "-k", "pin"], 20)}


def part_smoke() -> dict:
    _require_cuda()
    with tempfile.TemporaryDirectory() as tmp:
        xoron = [sys.executable, "-m", "xoron_dist.cli"]
        # samples and a checkpoint at the last step: the README's run draws and saves at 60 and 120, which a
        # 40-step run would not reach (a bf16 speech sample crashed there until 2026-12-06); once, for the time box
        run = _run([*xoron, "train", "--config", "pipelines/smoke.yaml", f"train.steps={SMOKE_STEPS}",
                    f"train.output_dir={tmp}", "train.name=gpu_smoke", f"train.save_every={SMOKE_STEPS}",
                    f"train.sample_every={SMOKE_STEPS}", "train.log_every=5"],
                   TIME_BOX["smoke"] - 15)
        metrics = Path(tmp) / "gpu_smoke" / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        checkpoints = Path(tmp) / "gpu_smoke" / "checkpoints"
        run["checkpoints"] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        run["steps_logged"] = len(lines)
        run["last"] = json.loads(lines[-1]) if lines else None
        run["first_loss"] = json.loads(lines[0])["loss"] if lines else None
    return run


def part_compile() -> dict:
    from xoron_dist.config import LLMConfig
    from xoron_dist.model.llm.model import XoronLLM
    from xoron_dist.train.compile import compile_blocks

    device = _require_cuda()
    llm = LLMConfig()
    ids = torch.randint(0, llm.vocab_size, (BATCH, SEQ), device=device)
    torch.manual_seed(0)
    model = XoronLLM(llm).to(device=device, dtype=torch.bfloat16)
    eager = _fwd_bwd_seconds(model, lambda m: m(ids, labels=ids).loss)
    blocks = compile_blocks(model, device)
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()  # the first compiled step compiles
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    compiled = _fwd_bwd_seconds(model, lambda m: m(ids, labels=ids).loss)
    return {"blocks": blocks, "eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled,
            "first_compiled_step_s": first, "batch": BATCH, "seq": SEQ}


def part_moe() -> dict:
    from bench.moe_layer import DeepSpeedMoEWithShared, _init_single_rank_comm, make_call
    from xoron_dist.config import LLMConfig
    from xoron_dist.model.common.moe import MoEFeedForward

    device = _require_cuda()
    llm = LLMConfig()
    hidden, moe = llm.hidden_size, llm.moe
    _init_single_rank_comm("nccl")  # DeepSpeed's MoE asks for its expert groups
    torch.manual_seed(0)
    ours = MoEFeedForward(hidden, moe).to(device=device, dtype=torch.bfloat16).train()
    peer = DeepSpeedMoEWithShared(hidden, moe.expert_intermediate_size, num_experts=moe.num_experts,
                                  top_k=moe.top_k).to(device=device, dtype=torch.bfloat16).train()
    with torch.no_grad():  # DeepSpeed's init is not ours: both at the bench's std
        for param in (*ours.parameters(), *peer.parameters()):
            param.normal_(std=0.02)
    x = torch.randn(1, MOE_TOKENS, hidden, device=device, dtype=torch.bfloat16)
    times = {name: _time_cuda(make_call(module, x), warmup=3, iters=10)
             for name, module in (("ours", ours), ("deepspeed", peer))}
    return {"tokens": MOE_TOKENS, "hidden": hidden, "experts": moe.num_experts, "top_k": moe.top_k,
            "expert_intermediate_size": moe.expert_intermediate_size,
            "tokens_per_s": {name: MOE_TOKENS / t for name, t in times.items()},
            "ratio": times["deepspeed"] / times["ours"]}


def part_syncs() -> dict:
    """Syncs per optimizer step as CUDA reports them beside HostSyncCounter's count of the same steps (the
    CPU suite's bound): the multimodal smoke run and the LLM recipe of bench/host_syncs.py, 3 steps each."""
    from bench.host_syncs import MULTIMODAL, RECIPE, step_syncs
    from tests.parallel.harness import run_ranks

    _require_cuda()
    return {name: run_ranks(step_syncs, 1, overrides, timeout=TIME_BOX["syncs"] / 2 - 5, start_method="spawn")[0]
            for name, overrides in (("multimodal_smoke", MULTIMODAL), ("llm_recipe", RECIPE))}


HEAD_CHUNKS = (0, 256, 1024, 2048, 4096)  # train.loss_chunk_tokens tried by the head part (0: one piece)


def part_head() -> dict:
    """The full model's LM head + loss (bf16, 152K vocabulary, BATCH x SEQ tokens), forward + backward, at each
    of ``HEAD_CHUNKS``: seconds and peak memory, which check ``TrainConfig.loss_chunk_for``'s CUDA choice (2048)."""
    from xoron_dist.config import LLMConfig
    from xoron_dist.model.llm.head import LMHead, accumulates_in_place, lm_loss

    device = _require_cuda()
    llm = LLMConfig()
    torch.manual_seed(0)
    head = LMHead(llm).to(device=device, dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=llm.hidden_size**-0.5)
    hidden = torch.randn(BATCH, SEQ, llm.hidden_size, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, llm.usable_vocab_size, (BATCH, SEQ), device=device)
    out = {"tokens": BATCH * SEQ, "vocab_rows": head.weight.shape[0], "hidden": llm.hidden_size, "chunks": {},
           # whether each chunk's bf16 ∂W GEMM adds into the fp32 accumulator in place (addmm, out_dtype=fp32)
           "dW_accumulates_in_place": accumulates_in_place(device, torch.bfloat16)}
    losses = {}
    for chunk in HEAD_CHUNKS:
        head.chunk_tokens = chunk

        def step() -> torch.Tensor:
            x = hidden.detach().requires_grad_()
            loss = lm_loss(head, x, labels).loss
            loss.backward()
            head.weight.grad = None
            return loss.detach()

        losses[chunk] = step().item()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = _time_cuda(step, warmup=1, iters=3)
        out["chunks"][str(chunk)] = {"seconds": seconds,
                                     "peak_gb": (torch.cuda.max_memory_allocated() - base) / 2**30}
    one = out["chunks"]["0"]["seconds"]
    out["speedup_over_one_piece"] = {c: one / r["seconds"] for c, r in out["chunks"].items()}
    out["loss_spread"] = max(losses.values()) - min(losses.values())  # bf16 GEMMs: small, not 0
    return out


PART_FUNCTIONS = {"backbone": part_backbone, "kernels": part_kernels, "tests": part_tests, "smoke": part_smoke,
                  "compile": part_compile, "moe": part_moe, "syncs": part_syncs, "head": part_head}


# --- the driver -----------------------------------------------------------------------------------


def run_part(name: str, timeout: float, module: str = "bench.gpu_check") -> dict:
    """``python -m <module> --part <name>`` in a subprocess within ``timeout`` seconds; its JSON result, or
    the failure (status ``failed`` / ``timeout`` and the output's tail). Never raises for the part's errors."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", module, "--part", name]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"status": "timeout", "seconds": time.perf_counter() - start, "time_box_s": timeout,
                "tail": (_text(err.stdout) + _text(err.stderr))[-1500:]}
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "seconds": seconds, "returncode": proc.returncode,
                "tail": (proc.stdout + proc.stderr)[-2500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", "seconds": seconds, "result": result}


def summarise(parts: dict, machine: str) -> dict:
    """The DESIGN.md benchmark fields from the backbone part (nulls when it did not finish) + every part."""
    pair = parts.get("backbone", {}).get("result") or {}
    ours, peer = pair.get("ours", {}), pair.get("peer", {})
    ratio = (ours["mfu"] / peer["mfu"]) if ours.get("mfu") and peer.get("mfu") else None
    return {"metric": "backbone fwd+bwd MFU in bf16, ours / Megatron-core GPTModel (higher is better)",
            "unit": "fraction of the bf16 peak", "ours": ours.get("mfu"), "peer": peer.get("mfu"),
            "peer_name": f"Megatron-core GPTModel ({peer.get('spec', '?')} spec), dense, same hidden/layers/seq, "
                         "FFN = our mean active width",
            "ratio": ratio, "goal": ">= 1.0", "machine": machine, "parts": parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=PARTS, help="run one part and print its JSON")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.part:
        print(json.dumps(PART_FUNCTIONS[args.part]()))
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    machine = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    parts = {}
    for name in PARTS:
        parts[name] = run_part(name, TIME_BOX[name])
        print(f"{name:9s} {parts[name]['status']:8s} {parts[name]['seconds']:6.1f} s", flush=True)
        write_report(args.out, summarise(parts, machine))  # what is done so far survives a later crash
    report = summarise(parts, machine)
    path = write_report(args.out, report)
    print(f"ours MFU {report['ours']}  peer MFU {report['peer']}  ratio {report['ratio']}  -> {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
