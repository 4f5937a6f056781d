"""Every tensor of a training step, its readout, the generation samples and text decoding stays on the
training device: the code runs on the stand-in accelerator (tests/model/device_standin.py), where an op that
mixes a host tensor into device tensors raises as it would on a GPU, and the results equal the CPU run's.

The first GPU run died on such a mix that no CPU test could see (``fill_spans``' host ``arange`` beside
CUDA span lengths). These tests run the paths a GPU run takes: the multimodal smoke model's step with every
objective (pinned batches, each encoder and generator, the loss weights, the readout with the expert-bias
update and codebook restarts) and the TensorBoard samples (image, video, speech), in fp32 against the CPU
and then in bf16 and fp16 (what ``train.precision=auto`` trains in on a GPU: the bf16 speech sample and the
fp16 speaker encoder's NaN failed here),
and the text model in bf16 (the grouped-GEMM experts, the emulated flash kernel, latent-cache decoding with
a device generator).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.model.device_standin import ACCEL, DeviceMixError, OnAccel, standin_accelerator
from tests.parallel.harness import run_ranks
from tests.train.conftest import SMOKE


class _Engine:
    """What ``StepRunner`` and ``read_step`` use of DeepSpeed's engine: forward, backward, ``step`` after each
    micro-batch (the update at the last of ``micro``), the gradient norm (in fp32, as DeepSpeed takes it).
    SGD: these tests check where tensors live, not the optimizer, and SGD keeps no state that half-precision
    weights would need in fp32 (Adam's eps is 0 in fp16: 0 / 0 where a gradient is 0)."""

    def __init__(self, model: torch.nn.Module, micro: int) -> None:
        self.module, self.micro, self.calls = model, micro, 0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.norm = None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.micro:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        self.norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return self.norm


class _Board:
    """TensorBoard's part that the samples use: what each tag got."""

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def image(self, tag, value, step) -> None:
        self.got[tag] = torch.as_tensor(value).float()

    def audio(self, tag, value, rate, step) -> None:
        self.got[tag] = torch.as_tensor(value).float()


def _covering_batches(source, runner, objectives, pool: int = 16) -> list:
    """Few of the first ``pool`` micro-batches of the smoke data that, together, give every objective items
    (greedy: each pick brings the most objectives the earlier picks lack)."""
    wanted = {obj.name for obj, _ in objectives}
    batches = [source.next_batch() for _ in range(pool)]
    has = [{obj.name for obj, _ in objectives if int(obj.count(runner.model_inputs(b))) > 0} for b in batches]
    kept, seen = [], set()
    while seen != wanted:
        best = max(range(pool), key=lambda i: len(has[i] - seen))
        if not has[best] - seen:
            raise AssertionError(f"the first {pool} smoke micro-batches give no items to {sorted(wanted - seen)}")
        kept.append(batches[best])
        seen |= has[best]
    return kept


def _placement_rank(data_path: str, tokenizer_dir: str) -> dict:
    """One rank: the smoke model's samples and one step (readout included) on the CPU and on the stand-in."""
    from xoron_dist.config import load_config
    from xoron_dist.model.xoron import build_model
    from xoron_dist.parallel import state
    from xoron_dist.tokenizer import build_tokenizer
    from xoron_dist.train.objectives import TokenGroups, active_objectives
    from xoron_dist.train.sources import build_source
    from xoron_dist.train.stages import plan_stages
    from xoron_dist.train.step import StepRunner

    cfg = load_config(SMOKE, [f"data.path={data_path}", "data.num_workers=0", "train.sample_prompts=[a red circle]"])
    ctx = state.initialize(cfg)
    tokenizer = build_tokenizer(cfg, Path(tokenizer_dir))
    groups = TokenGroups(cfg, tokenizer.token_id)
    objectives = active_objectives(cfg)
    torch.manual_seed(0)
    models = {"cpu": build_model(cfg)}
    models["accel"] = copy.deepcopy(models["cpu"])
    probe = StepRunner(cfg, ctx, _built(models["cpu"], None), groups)
    batches = _covering_batches(build_source(cfg, tokenizer, plan_stages(cfg)[0], 0, 1), probe, objectives)
    out = {"micro_batches": len(batches)}
    accel_ctx = dataclasses.replace(ctx, device_info=dataclasses.replace(ctx.device_info, device=ACCEL))
    for name, model in models.items():
        torch.manual_seed(1)  # draws from the default generator (the codec's) start alike in both runs
        on_accel = name == "accel"
        with standin_accelerator() if on_accel else contextlib.nullcontext():
            model.to(accel_ctx.device if on_accel else ctx.device)
            out[name] = _samples_and_step(cfg, accel_ctx if on_accel else ctx, model, tokenizer, groups, batches)
    with standin_accelerator():  # then as train.precision=auto trains on a GPU (DeepSpeed casts the model):
        for dtype in (torch.bfloat16, torch.float16):  # bf16, or fp16 where the GPU has no bf16
            out[f"accel_{dtype}"] = _samples_and_step(cfg, accel_ctx, models["accel"].to(dtype), tokenizer, groups,
                                                      batches)
    state.destroy()
    return out


def _samples_and_step(cfg, ctx, model, tokenizer, groups, batches) -> dict:
    """The generation samples, then one step over ``batches`` and its readout, on ``ctx.device``."""
    from xoron_dist.train.codebooks import CodebookKeeper
    from xoron_dist.train.expert_balance import ExpertBalancer
    from xoron_dist.train.guard import NumericsGuard
    from xoron_dist.train.readout import read_step
    from xoron_dist.train.samples import GenerationSamples
    from xoron_dist.train.sources import to_device
    from xoron_dist.train.step import StepRunner

    on_accel = ctx.device == ACCEL
    board = _Board()
    GenerationSamples(cfg, tokenizer).write(1, model, board)
    engine = _Engine(model, len(batches))
    runner = StepRunner(cfg, ctx, _built(model, engine), groups)
    # as on a GPU: the loader pins each batch, the trainer copies it without blocking
    step_batches = [to_device(b.pin_memory() if on_accel else b, ctx.device) for b in batches]
    balancer = ExpertBalancer(model)
    balancer.keep_fp32()
    readout = read_step(runner.run(step_batches), engine=engine, guard=NumericsGuard(cfg.train, fp16=False),
                        balancer=balancer, codebooks=CodebookKeeper(model), ctx=ctx, stop_requested=False,
                        engine_skipped=False, bias_update=True, rates={"llm": cfg.llm.moe.bias_update_rate},
                        num_experts=cfg.llm.moe.num_experts, with_biases=True)
    return {"losses": readout.result.losses, "counts": readout.result.counts, "grad_norm": readout.grad_norm,
            "load": readout.load, "biases": readout.biases, "skipped": readout.skipped, "samples": board.got,
            "on_accel": all(isinstance(p, OnAccel) for p in model.parameters()),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def _built(model, engine):
    return SimpleNamespace(model=model, engine=engine, pipeline=None)


def test_multimodal_step_readout_and_samples_stay_on_the_device(smoke_data):
    """The smoke model (every encoder and generator) on the stand-in accelerator: generation samples, one
    step over micro-batches that give every objective items, and its readout raise no device mix, and
    give the CPU run's losses, item counts, grad norm, expert load and biases, and samples; then the same
    in bf16 and in fp16 runs too, with finite losses, gradients and samples."""
    (got,) = run_ranks(_placement_rank, 1, str(smoke_data), str(smoke_data.parent / "tokenizer"), timeout=400)
    cpu, accel = got["cpu"], got["accel"]
    assert accel["on_accel"]
    assert set(cpu["counts"]) == set(accel["counts"]) and all(c > 0 for c in accel["counts"].values()), accel
    assert accel["counts"] == cpu["counts"]
    assert not cpu["skipped"] and not accel["skipped"]
    for name, loss in cpu["losses"].items():
        assert math.isfinite(loss) and accel["losses"][name] == pytest.approx(loss, rel=1e-4, abs=1e-6), name
    assert accel["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-4)
    assert accel["load"] == cpu["load"]
    torch.testing.assert_close(torch.tensor(accel["biases"]), torch.tensor(cpu["biases"]))
    assert set(accel["samples"]) == set(cpu["samples"]) == {"samples/image/0", "samples/video/0",
                                                            "samples/speech/0"}
    for tag, value in cpu["samples"].items():
        assert accel["samples"][tag].shape == value.shape, tag
        assert (accel["samples"][tag] - value).abs().max() <= 1e-3 * max(1.0, float(value.abs().max())), tag
    # bf16 and fp16 (the flash kernel where the attention has no mask, every sample from half-precision weights)
    for dtype in ("torch.bfloat16", "torch.float16"):
        half = got[f"accel_{dtype}"]
        assert half["on_accel"] and dtype in half["dtypes"] and not half["skipped"], (dtype, half["losses"])
        assert half["counts"] == cpu["counts"] and set(half["samples"]) == set(cpu["samples"]), dtype
        assert all(math.isfinite(v) for v in half["losses"].values()) and math.isfinite(half["grad_norm"]), half
        assert all(bool(torch.isfinite(v).all()) for v in half["samples"].values()), dtype


def test_text_model_bf16_step_and_decoding_stay_on_the_device(monkeypatch):
    """The text model in bf16 on the stand-in: packed documents through the emulated CUDA flash kernel, the
    routed experts through the grouped GEMM (the bf16 rule of an H100; not the per-expert loop), greedy
    decoding with the latent cache equal to the CPU's, sampling with a device generator; a host generator
    is refused as CUDA refuses it."""
    from xoron_dist.config import load_config
    from xoron_dist.model.common import moe
    from xoron_dist.model.llm import XoronLLM

    cfg = load_config(None, ["preset=tiny"])
    torch.manual_seed(0)
    cpu = XoronLLM(cfg.llm).to(torch.bfloat16)
    ids = torch.randint(5, cfg.llm.vocab_size, (2, 32))
    docs = torch.tensor([[0] * 16 + [1] * 16, [0] * 32])
    positions = torch.cat([torch.arange(16), torch.arange(16)]).expand(2, -1)
    batch = dict(input_ids=ids, labels=ids, position_ids=positions, document_ids=docs)

    def step(model, device):
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        return out.loss.float().item(), [p.grad.float().cpu() for p in model.parameters()]

    loops = []
    looped = moe._looped
    monkeypatch.setattr(moe, "_looped", lambda *args: (loops.append(1), looped(*args))[1])
    with standin_accelerator():
        dev = copy.deepcopy(cpu).to(ACCEL)
        dev_loss, dev_grads = step(dev, ACCEL)
        assert not loops, "the experts took the per-expert loop on the accelerator in bf16"
        greedy = dev.generate_text(ids[:, :8].to(ACCEL), 6, temperature=0).cpu()
        sampled = dev.generate_text(ids[:, :8].to(ACCEL), 6, temperature=0.8, top_p=0.9, top_k=20,
                                    eos_token_id=3, generator=torch.Generator(device=ACCEL).manual_seed(0))
        assert sampled.device == ACCEL and sampled.shape == (2, 14)
        with pytest.raises(DeviceMixError, match="generator on the host"):
            dev.generate_text(ids[:, :8].to(ACCEL), 2, temperature=0.8, generator=torch.Generator())
    cpu_loss, cpu_grads = step(cpu, "cpu")
    assert dev_loss == pytest.approx(cpu_loss, rel=2e-2)
    for got, want in zip(dev_grads, cpu_grads, strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    assert torch.equal(greedy, cpu.generate_text(ids[:, :8], 6, temperature=0))
