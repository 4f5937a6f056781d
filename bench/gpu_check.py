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
               Layers are halved until the pair fits in memory (the report says how many ran). One more
               step of ours runs under ``torch.profiler``: its 15 kernels with the most GPU time and the
               GPU's busy time (beside the step's seconds: how much it waits on the host).
    kernels    the attention-kernel adapter (``xoron_dist.model.common.attention_kernels``, the ring's
               block step) on CUDA against ``F.scaled_dot_product_attention``: max error of out and
               gradients, and forward + backward time, bf16 (flash kernel) and fp32 (efficient kernel);
               then bf16 with the efficient kernel (it takes MLA's narrower v as it is; flash pads it) and
               SDPA held to each of its backends (flash, efficient, cuDNN): which kernel bf16 should take.
    tests      ``pytest tests/model/test_attention_kernels.py -k real_cuda``, the bf16 lane of the
               trainer tests (``tests/train/test_trainer.py -k bf16``) and the pinned-memory batch path
               (``tests/data/test_arrow_blocks.py -k pin``, skipped without an accelerator).
    smoke      the multimodal smoke run on the GPU: ``xoron train --config pipelines/smoke.yaml`` for
               ``SMOKE_STEPS`` steps, with TensorBoard samples and a checkpoint at the last; its last
               metrics.jsonl line (loss, TFLOP/s, MFU) and the checkpoints it wrote. One step in the middle
               is profiled (``train.profile``): the op summary's top rows go into the report, the trace
               and the summary into bench/out/gpu_check_profile/ (the first GPU run's smoke run logged
               841 tokens/s at its end, 2 CPU cores 1.5k: this says where the GPU's step time goes).
    compile    ``train.compile`` on the GPU: the full-size backbone eager vs with every decoder block
               compiled (``xoron_dist.train.compile.compile_blocks``, inductor), bf16 fwd + bwd at the
               backbone's shape: the speedup, the first compiled step's seconds and its loss beside eager's (on CPU,
               with the experts compiled in their blocks, 1.25x at the smoke shape, but a short CPU run does
               not earn back the cold compile, so the option defaults off; this decides the GPU default).
    moe        one MoE layer of the full model (LLMConfig's: hidden 1024, 8 routed experts + 1 shared of
               width 2048, top-2) fwd + bwd in bf16 on ``MOE_TOKENS`` tokens: ours (grouped GEMMs) vs
               DeepSpeed's dropless ``MoE`` with the same shared expert (``bench/moe_layer.py``'s peer),
               tokens/s; and ours' call under ``torch.profiler`` (its 10 costliest kernels).
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
    python -m bench.gpu_check --rehearse      # every part on the CPU at the tiny size (about 2 minutes)
    python -m bench.gpu_check --parts compile,head   # rerun these, keeping the report's other parts

What a part runs on, and at what size, is a ``Target``: ``gpu_target`` (cuda:0, the full-size model and
the shapes above) or ``rehearsal_target`` (the CPU, the tiny preset's model, a few dozen tokens, a
2-step smoke run). A rehearsal runs every part's own code, so a GPU session is not spent finding a
broken part; its report goes to a temporary file (its times are not measurements), and it exits 1
when a part fails. tests/bench/test_gpu_check.py rehearses the in-process parts in the suite (compile
there with aot_eager) and tests the rest without a GPU: the peer's config; its FLOP formula equal to
``FlopCounterMode`` on the Megatron model built at tiny size on one gloo rank and called as here (its
forward asks ``torch.cuda`` for a buffer device, the causal mask and the RNG tracker:
``megatron_on_cpu`` answers those on the CPU); MFU; the report writer; the part runner's failure and
timeout records; the no-GPU exit; the syncs part's step cutting.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xoron_dist.config import LLMConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "gpu_check.json"
# a rehearsal's report is not a measurement: it stays out of bench/out
REHEARSAL_OUT = Path(tempfile.gettempdir()) / "xoron_gpu_check_rehearsal.json"
# the smoke part's step profile (train.profile): trace and op summary, beside the report
PROFILE_DIR = REPO / "bench" / "out" / "gpu_check_profile"
REHEARSAL_PROFILE_DIR = Path(tempfile.gettempdir()) / "xoron_gpu_check_rehearsal_profile"
SEQ, BATCH = 4096, 2
SMOKE_STEPS = 40
MOE_TOKENS = 8192
HEAD_CHUNKS = (0, 256, 1024, 2048, 4096)  # train.loss_chunk_tokens tried by the head part (0: one piece)
# seconds per part; bench/gpu_check.sh gives the whole check 570 s. The first H200 run took 24, 8, 56 and 105 s
# for the first four; the smoke run has since drawn samples and saved a checkpoint at its last step, so its
# box took 35 s from the slack of backbone, kernels and moe (kernels now compares the CUDA kernels too: 25 s),
# and 10 s more from backbone for its one profiled step (its trace's export took 16 s on 2 CPU cores)
TIME_BOX = {"backbone": 40, "kernels": 25, "tests": 90, "smoke": 170, "compile": 110, "moe": 40, "syncs": 75,
            "head": 20}
PARTS = tuple(TIME_BOX)


class NoGPUError(RuntimeError):
    """This check needs a CUDA device."""


@dataclass(frozen=True)
class Target:
    """Where and at what size the parts run: the GPU check's (``gpu_target``: the full-size model on cuda:0)
    or a rehearsal's (``rehearsal_target``: the tiny model on the CPU, every part's own code at a size that
    runs in seconds, so the script is checked before a GPU session spends its minutes on it)."""

    device: torch.device
    llm: LLMConfig
    batch: int
    seq: int
    moe_tokens: int
    kernel_shape: tuple[int, int, int, int, int]  # batch, heads, seq, qk head dim, v head dim
    smoke_steps: int
    sync_steps: int  # trainer steps per syncs case (the first warms up, the last has no later start)
    head_chunks: tuple[int, ...]  # train.loss_chunk_tokens tried by the head part (0: one piece)
    profile_dir: Path  # where the smoke part leaves its step profile

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def gpu_target() -> Target:
    from xoron_dist.config import LLMConfig

    if not torch.cuda.is_available():
        raise NoGPUError("no CUDA device: bench/gpu_check needs a GPU (torch.cuda.is_available() is False); "
                         "--rehearse runs its parts on the CPU at a tiny size")
    # the full-size model (pipelines/xoron_full.yaml keeps LLMConfig's defaults); the kernels at its MLA head
    # dims (nope 64 + rope 32, v 64)
    return Target(torch.device("cuda", 0), LLMConfig(), BATCH, SEQ, MOE_TOKENS, (2, 16, SEQ, 96, 64), SMOKE_STEPS,
                  sync_steps=4, head_chunks=HEAD_CHUNKS, profile_dir=PROFILE_DIR)


def rehearsal_target() -> Target:
    from xoron_dist.config import load_config

    llm = load_config(None, ["preset=tiny"]).llm
    return Target(torch.device("cpu"), llm, batch=2, seq=32, moe_tokens=64, kernel_shape=(1, 2, 32, 24, 16),
                  smoke_steps=2, sync_steps=3, head_chunks=(0, 16), profile_dir=REHEARSAL_PROFILE_DIR)


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


# --- the parts (GPU; at a tiny size on the CPU in a rehearsal) ---------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` (synchronised with the device)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_memory_gb(device: torch.device, base: int = 0) -> float | None:
    """GB allocated at the peak since ``_reset_peak_memory`` above ``base`` (None off CUDA: not measured)."""
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak(device: torch.device) -> tuple[str, float | None]:
    from xoron_dist.train.metrics import lookup_device_peak

    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    entry = lookup_device_peak(name)
    return name, None if entry is None else entry.bf16


def _fwd_bwd_step(model: torch.nn.Module, loss_of):
    """Forward + backward of ``loss_of(model)``, gradients dropped after."""
    def step() -> None:
        loss_of(model).backward()
        model.zero_grad(set_to_none=True)

    return step


def _fwd_bwd_seconds(model: torch.nn.Module, loss_of, device: torch.device) -> float:
    """Median seconds of forward + backward of ``loss_of(model)`` (gradients dropped after each)."""
    return _time(_fwd_bwd_step(model, loss_of), device, warmup=2, iters=5)


def _op_profile(fn, device: torch.device, rows: int = 15) -> dict:
    """One call of ``fn`` under ``torch.profiler``: the ``rows`` ops with the most self time on the device (CUDA)
    or else the CPU, in ms and as a share of all of it, and that sum (on CUDA the device's busy time: set beside
    the step's seconds, what it leaves idle)."""
    from torch.profiler import ProfilerActivity, profile

    from xoron_dist.train.profiler import DEVICE_TIME, costliest_ops, self_time_key

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        _sync(device)
    key = self_time_key(prof)
    events = costliest_ops(prof.key_averages(), key)
    busy = sum(getattr(e, key) for e in events)
    top = events[:rows]
    return {"time": "device" if key == DEVICE_TIME else "cpu", "busy_s": busy / 1e6,
            "top": [{"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / busy, "calls": e.count}
                    for e in top]}


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Megatron-core's GPTModel forward asks CUDA for its buffers' device, its default causal mask and its RNG
    tracker's fork (dropout, off here); answer those on the CPU so the same modules run (restored after)."""
    from unittest import mock

    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core import tensor_parallel

    stand_ins = [(torch.cuda, "current_device", lambda: "cpu"),
                 (fused_softmax, "get_default_causal_mask", lambda sq: torch.ones(sq, sq).triu(1).bool()),
                 (tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())]
    with contextlib.ExitStack() as patches:  # mock restores a method the tracker took from its class by deleting
        for owner, name, replacement in stand_ins:
            patches.enter_context(mock.patch.object(owner, name, replacement))
        yield


def _ours(llm, ids: torch.Tensor, target: Target, peak: float | None) -> dict:
    from xoron_dist.model.flops import llm_step_flops
    from xoron_dist.model.llm.model import XoronLLM

    torch.manual_seed(0)
    model = XoronLLM(llm).to(device=target.device, dtype=torch.bfloat16)
    _reset_peak_memory(target.device)
    loss_of = lambda m: m(ids, labels=ids).loss  # noqa: E731
    seconds = _fwd_bwd_seconds(model, loss_of, target.device)
    flops = llm_step_flops(llm, target.batch, target.seq)
    return {"step_s": seconds, "tokens_per_s": target.batch * target.seq / seconds,
            "peak_memory_gb": _peak_memory_gb(target.device), "flops_per_step": flops, **mfu(flops, seconds, peak),
            # where one step's time goes: the kernels that take it, and how busy the device is
            "profile": _op_profile(_fwd_bwd_step(model, loss_of), target.device)}


def _peer(peer: PeerConfig, ids: torch.Tensor, target: Target, peak: float | None) -> dict:
    from megatron.core import tensor_parallel

    from xoron_dist.model.flops import TRAIN_FACTOR

    device = target.device
    with megatron_single_rank("nccl" if target.on_gpu else "gloo"), \
            contextlib.nullcontext() if target.on_gpu else megatron_on_cpu():
        if target.on_gpu:
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        else:
            torch.manual_seed(0)
        model, spec = build_megatron_gpt(peer, torch.bfloat16, device)
        positions = torch.arange(target.seq, device=device).expand(target.batch, -1)
        _reset_peak_memory(device)
        seconds = _fwd_bwd_seconds(model, lambda m: m(ids, positions, attention_mask=None, labels=ids).float().mean(),
                                   device)
    flops = TRAIN_FACTOR * gpt_forward_flops(peer, target.batch)
    return {"step_s": seconds, "tokens_per_s": target.batch * target.seq / seconds,
            "peak_memory_gb": _peak_memory_gb(device), "flops_per_step": flops, "spec": spec,
            "config": asdict(peer), **mfu(flops, seconds, peak)}


def _measure_pair(target: Target, layers: int, peak: float | None) -> dict:
    llm = replace(target.llm, num_layers=layers)
    ids = torch.randint(0, llm.vocab_size, (target.batch, target.seq), device=target.device)
    ours = _ours(llm, ids, target, peak)
    _release(target.device)
    peer = _peer(peer_config(llm, target.seq), ids, target, peak)
    _release(target.device)
    return {"ours": ours, "peer": peer}


def part_backbone(target: Target) -> dict:
    name, peak = _peak(target.device)
    layers = target.llm.num_layers
    while True:
        try:
            pair = _measure_pair(target, layers, peak)
            break
        except torch.OutOfMemoryError:
            _release(target.device)
            if layers == 1:
                raise
            layers //= 2
    return {"device": name, "peak_bf16_tflops": peak, "layers": layers, "full_layers": target.llm.num_layers,
            "hidden": target.llm.hidden_size, "batch": target.batch, "seq": target.seq, **pair}


@contextlib.contextmanager
def _forced_kernel(kind: str | None) -> Iterator[None]:
    """The adapter's kernel choice forced to ``kind`` (None: its own rule), to time the kernels it could use."""
    from xoron_dist.model.common import attention_kernels as ak

    rule = ak.select_kernel
    if kind is not None:
        ak.select_kernel = lambda *args, **kwargs: kind
    try:
        yield
    finally:
        ak.select_kernel = rule


def _kernel_inputs(dtype: torch.dtype, target: Target) -> tuple[torch.Tensor, ...]:
    b, h, s, qk, dv = target.kernel_shape
    gen = torch.Generator(device=target.device).manual_seed(0)
    q, k = (torch.randn(b, h, s, qk, device=target.device, dtype=dtype, generator=gen) for _ in range(2))
    v, dout = (torch.randn(b, h, s, dv, device=target.device, dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, dout


def _sdpa_reference(q, k, v, dout, scale: float):
    import torch.nn.functional as F

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    o.backward(dout)
    return o, tuple(t.grad for t in leaves)


def _kernel_case(dtype: torch.dtype, target: Target, kernel: str | None = None) -> dict:
    """The adapter's causal fused attention (forward + external-LSE backward) against SDPA's on one input,
    with the adapter's own kernel or ``kernel``."""
    from xoron_dist.model.common import attention_kernels as ak

    q, k, v, dout = _kernel_inputs(dtype, target)
    scale = q.shape[-1] ** -0.5

    def adapter():
        with _forced_kernel(kernel):
            o, lse = ak.attention_forward(q, k, v, scale=scale, causal=True)
            return o, ak.attention_backward(dout, q, k, v, o, lse, scale=scale, causal=True)

    def reference():
        return _sdpa_reference(q, k, v, dout, scale)

    (o1, g1), (o2, g2) = adapter(), reference()
    errors = [(a.float() - r.float()).abs().max().item() for a, r in zip((o1, *g1), (o2, *g2), strict=True)]
    chosen = kernel or ak.select_kernel(ak.device_kind(q), dtype, q.shape[-1], v.shape[-1], masked=False)
    return {"kernel": chosen, "max_err_out": errors[0], "max_err_grads": max(errors[1:]),
            "adapter_s": _time(adapter, target.device, 2, 10), "sdpa_s": _time(reference, target.device, 2, 10)}


def _sdpa_backends(dtype: torch.dtype, target: Target) -> dict:
    """SDPA held to each of its fused backends on the kernel input, forward + backward: seconds, or why the
    backend refused (which one plain SDPA took is the fastest that did not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, dout = _kernel_inputs(dtype, target)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        name = backend.name.lower()
        try:
            with sdpa_kernel([backend]):
                out[name] = {"seconds": _time(lambda: _sdpa_reference(q, k, v, dout, q.shape[-1] ** -0.5),
                                              target.device, 2, 10)}
        except RuntimeError as err:  # "No available kernel": this backend does not take the call
            out[name] = {"refused": str(err).strip().splitlines()[0][:200]}
    return out


def part_kernels(target: Target) -> dict:
    from xoron_dist.model.common import attention_kernels as ak

    out = {str(dtype).removeprefix("torch."): _kernel_case(dtype, target) for dtype in (torch.bfloat16, torch.float32)}
    if ak.device_kind(torch.empty(0, device=target.device)) == "cuda":
        # MLA's v is narrower than q/k: the flash kernel (the bf16 choice) pads v to q's width, the efficient
        # one takes it as it is; the first GPU run found the adapter at 1.8x SDPA's time with flash
        out["bfloat16_efficient"] = _kernel_case(torch.bfloat16, target, kernel="cuda_efficient")
    out["sdpa_backends_bfloat16"] = _sdpa_backends(torch.bfloat16, target)
    return {"shape": dict(zip(("batch", "heads", "seq", "qk_dim", "v_dim"), target.kernel_shape, strict=True)), **out}


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


def part_tests(target: Target) -> dict:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return {"real_cuda_kernels": _run([*pytest, "tests/model/test_attention_kernels.py", "-k", "real_cuda"], 40),
            "bf16_lane": _run([*pytest, "tests/train/test_trainer.py", "-k", "bf16"], 60),
            "pinned_memory": _run([*pytest, "tests/data/test_arrow_blocks.py", "-k", "pin"], 20)}


def part_smoke(target: Target) -> dict:
    steps = target.smoke_steps
    # one step in the middle traced (train.profile): where the step's time goes on this device
    profile_start = max(1, steps // 2)
    with tempfile.TemporaryDirectory() as tmp:
        xoron = [sys.executable, "-m", "xoron_dist.cli"]
        # samples and a checkpoint at the last step: the README's run draws and saves at 60 and 120, which a
        # 40-step run would not reach (a bf16 speech sample crashed there until 2026-12-06); once, for the time box
        run = _run([*xoron, "train", "--config", "pipelines/smoke.yaml", f"train.steps={steps}",
                    f"train.output_dir={tmp}", "train.name=gpu_smoke", f"train.save_every={steps}",
                    f"train.sample_every={steps}", f"train.log_every={min(5, steps)}",
                    f"train.profile.start={profile_start}", "train.profile.steps=1"],
                   TIME_BOX["smoke"] - 15)
        run["profile"] = _keep_profile(Path(tmp) / "gpu_smoke" / "profile", target.profile_dir)
        metrics = Path(tmp) / "gpu_smoke" / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        checkpoints = Path(tmp) / "gpu_smoke" / "checkpoints"
        run["checkpoints"] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        run["steps_logged"] = len(lines)
        run["last"] = json.loads(lines[-1]) if lines else None
        run["first_loss"] = json.loads(lines[0])["loss"] if lines else None
    return run


def _keep_profile(found: Path, keep: Path, rows: int = 24) -> dict:
    """Copy a run's step profile (``train/profiler.py``: trace and op summary) into ``keep``; the summary's first
    ``rows`` lines go into the report."""
    files = sorted(found.glob("rank*_steps*")) if found.is_dir() else []
    keep.mkdir(parents=True, exist_ok=True)
    for old in keep.glob("rank*_steps*"):
        old.unlink()  # one run's profile: an earlier run's would be mistaken for it
    for file in files:
        shutil.copy2(file, keep / file.name)
    summary = next((f for f in files if f.suffix == ".txt"), None)
    return {"files": [str(keep / f.name) for f in files],
            "top": summary.read_text().splitlines()[:rows] if summary else None}


def part_compile(target: Target) -> dict:
    from xoron_dist.model.llm.model import XoronLLM
    from xoron_dist.train.compile import compile_blocks

    device = target.device
    ids = torch.randint(0, target.llm.vocab_size, (target.batch, target.seq), device=device)
    torch.manual_seed(0)
    model = XoronLLM(target.llm).to(device=device, dtype=torch.bfloat16)
    loss_of = lambda m: m(ids, labels=ids).loss  # noqa: E731
    eager_loss = loss_of(model).item()
    model.zero_grad(set_to_none=True)
    eager = _fwd_bwd_seconds(model, loss_of, device)
    blocks = compile_blocks(model, device)
    start = time.perf_counter()
    loss = loss_of(model)  # the first compiled step compiles
    loss.backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    first = time.perf_counter() - start
    compiled = _fwd_bwd_seconds(model, loss_of, device)
    return {"blocks": blocks, "eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled,
            "first_compiled_step_s": first, "loss_eager": eager_loss, "loss_compiled": loss.item(),
            "batch": target.batch, "seq": target.seq}


def part_moe(target: Target) -> dict:
    from bench.moe_layer import DeepSpeedMoEWithShared, _init_single_rank_comm, make_call
    from xoron_dist.model.common.moe import MoEFeedForward

    device = target.device
    hidden, moe = target.llm.hidden_size, target.llm.moe
    _init_single_rank_comm("nccl" if target.on_gpu else "gloo")  # DeepSpeed's MoE asks for its expert groups
    torch.manual_seed(0)
    ours = MoEFeedForward(hidden, moe).to(device=device, dtype=torch.bfloat16).train()
    peer = DeepSpeedMoEWithShared(hidden, moe.expert_intermediate_size, num_experts=moe.num_experts,
                                  top_k=moe.top_k).to(device=device, dtype=torch.bfloat16).train()
    with torch.no_grad():  # DeepSpeed's init is not ours: both at the bench's std
        for param in (*ours.parameters(), *peer.parameters()):
            param.normal_(std=0.02)
    x = torch.randn(1, target.moe_tokens, hidden, device=device, dtype=torch.bfloat16)
    times = {name: _time(make_call(module, x), device, warmup=3, iters=10)
             for name, module in (("ours", ours), ("deepspeed", peer))}
    return {"tokens": target.moe_tokens, "hidden": hidden, "experts": moe.num_experts, "top_k": moe.top_k,
            "expert_intermediate_size": moe.expert_intermediate_size,
            "tokens_per_s": {name: target.moe_tokens / t for name, t in times.items()},
            "ratio": times["deepspeed"] / times["ours"],
            # ours' call under the profiler: the grouped GEMMs against the routing, sorting and gathers
            "profile": _op_profile(make_call(ours, x), device, rows=10)}


def part_syncs(target: Target) -> dict:
    """Syncs per optimizer step as CUDA reports them beside HostSyncCounter's count of the same steps (the
    CPU suite's bound): the multimodal smoke run and the LLM recipe of bench/host_syncs.py."""
    from bench.host_syncs import MULTIMODAL, RECIPE, step_syncs
    from tests.parallel.harness import run_ranks

    return {name: run_ranks(step_syncs, 1, overrides, target.sync_steps, timeout=TIME_BOX["syncs"] / 2 - 5,
                            start_method="spawn")[0]
            for name, overrides in (("multimodal_smoke", MULTIMODAL), ("llm_recipe", RECIPE))}


def part_head(target: Target) -> dict:
    """The model's LM head + loss (bf16, its full vocabulary, batch x seq tokens), forward + backward, at each of
    ``target.head_chunks``: seconds and peak memory, which check ``TrainConfig.loss_chunk_for``'s CUDA choice
    (2048)."""
    from xoron_dist.model.llm.head import LMHead, accumulates_in_place, lm_loss

    device, llm = target.device, target.llm
    torch.manual_seed(0)
    head = LMHead(llm).to(device=device, dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=llm.hidden_size**-0.5)
    hidden = torch.randn(target.batch, target.seq, llm.hidden_size, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, llm.usable_vocab_size, (target.batch, target.seq), device=device)
    out = {"tokens": target.batch * target.seq, "vocab_rows": head.weight.shape[0], "hidden": llm.hidden_size,
           "chunks": {},
           # whether each chunk's bf16 ∂W GEMM adds into the fp32 accumulator in place (addmm, out_dtype=fp32)
           "dW_accumulates_in_place": accumulates_in_place(device, torch.bfloat16)}
    losses = {}
    for chunk in target.head_chunks:
        head.chunk_tokens = chunk

        def step() -> torch.Tensor:
            x = hidden.detach().requires_grad_()
            loss = lm_loss(head, x, labels).loss
            loss.backward()
            head.weight.grad = None
            return loss.detach()

        losses[chunk] = step().item()
        base = _reset_peak_memory(device)
        seconds = _time(step, device, warmup=1, iters=3)
        out["chunks"][str(chunk)] = {"seconds": seconds, "peak_gb": _peak_memory_gb(device, base)}
    one = out["chunks"]["0"]["seconds"]
    out["speedup_over_one_piece"] = {c: one / r["seconds"] for c, r in out["chunks"].items()}
    out["loss_spread"] = max(losses.values()) - min(losses.values())  # bf16 GEMMs: small, not 0
    return out


PART_FUNCTIONS = {"backbone": part_backbone, "kernels": part_kernels, "tests": part_tests, "smoke": part_smoke,
                  "compile": part_compile, "moe": part_moe, "syncs": part_syncs, "head": part_head}


# --- the driver -----------------------------------------------------------------------------------


def run_part(name: str, timeout: float, module: str = "bench.gpu_check", rehearse: bool = False) -> dict:
    """``python -m <module> --part <name> [--rehearse]`` in a subprocess within ``timeout`` seconds; its JSON
    result, or the failure (status ``failed`` / ``timeout`` and the output's tail). Never raises for the part's
    errors."""
    start = time.perf_counter()
    ran = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # merged reports mix runs
    cmd = [sys.executable, "-m", module, "--part", name, *(["--rehearse"] if rehearse else [])]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"status": "timeout", "seconds": time.perf_counter() - start, "time_box_s": timeout, **ran,
                "tail": (_text(err.stdout) + _text(err.stderr))[-1500:]}
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "seconds": seconds, "returncode": proc.returncode, **ran,
                "tail": (proc.stdout + proc.stderr)[-2500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", "seconds": seconds, **ran, "result": result}


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
    parser.add_argument("--rehearse", action="store_true",
                        help="run the parts on the CPU with the tiny model (no GPU needed; times mean nothing): "
                             "checks this script before a GPU session spends its minutes on it")
    parser.add_argument("--parts", type=lambda v: [p for p in v.split(",") if p], default=list(PARTS),
                        help="comma-separated parts to run, in PARTS order, merged into the report's earlier ones "
                             "(rerun what failed or timed out when a GPU session has minutes left)")
    parser.add_argument("--out", type=Path, help=f"the report (default {OUT.relative_to(REPO)}; with --rehearse "
                                                 f"{REHEARSAL_OUT})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: no part {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if args.part:
        print(json.dumps(PART_FUNCTIONS[args.part](rehearsal_target() if args.rehearse else gpu_target())))
        return 0
    if args.rehearse:
        machine = f"rehearsal on the CPU ({platform.machine()}), torch {torch.__version__}"
    elif torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        print("bench/gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or --rehearse to check the script on the CPU", file=sys.stderr)
        return 2
    out = args.out or (REHEARSAL_OUT if args.rehearse else OUT)
    parts = {}
    if set(args.parts) != set(PARTS) and out.is_file():  # a rerun of some parts keeps the others' results
        previous = json.loads(out.read_text())
        if previous.get("machine") == machine:
            parts = previous.get("parts", {})
    for name in [p for p in PARTS if p in args.parts]:
        parts[name] = run_part(name, TIME_BOX[name], rehearse=args.rehearse)
        print(f"{name:9s} {parts[name]['status']:8s} {parts[name]['seconds']:6.1f} s", flush=True)
        write_report(out, summarise(parts, machine))  # what is done so far survives a later crash
    report = summarise(parts, machine)
    path = write_report(out, report)
    print(f"ours MFU {report['ours']}  peer MFU {report['peer']}  ratio {report['ratio']}  -> {path}")
    failed = [name for name in args.parts if parts[name]["status"] != "ok"]
    if args.rehearse and failed:
        print(f"rehearsal: {', '.join(failed)} did not finish (see {path}); fix before the GPU run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
