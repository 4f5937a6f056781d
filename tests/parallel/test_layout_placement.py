"""The model-parallel paths keep every tensor on the training device: 2 gloo ranks run the tiny text model's
forward and backward under tensor, sequence (ring attention over packed documents) and expert parallelism
(the dropless all-to-all, chunked to overlap), and a 1F1B pipeline step (activations and gradients between
the stages, the tied embedding's gradient sum), on the stand-in accelerator (tests/model/device_standin.py),
where a host tensor mixed into device tensors raises as on a GPU; each rank's loss and gradients equal the
same rank's CPU run. The multimodal model runs SP=2 too (media encoded once per replica and exchanged over
the sequence ranks, spans across chunk boundaries). (That the CPU runs equal one rank is each layout's
own test.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.model.device_standin import ACCEL, OnAccel, standin_accelerator
from tests.parallel.harness import run_ranks

pytestmark = pytest.mark.multirank


def _on(device, batch: dict) -> dict:
    """Every tensor of ``batch`` (lists of media too) on ``device``."""
    move = lambda v: v.to(device) if torch.is_tensor(v) else [move(t) for t in v] if isinstance(v, list) else v  # noqa: E731
    return {k: move(v) for k, v in batch.items()}


def _batch(cfg, device) -> dict:
    """test_sequence_parallel's packed batch (row 0 holds two documents) as keyword arguments on ``device``."""
    from tests.parallel.test_sequence_parallel import _batch as packed

    names = ("input_ids", "labels", "position_ids", "document_ids")
    return _on(device, dict(zip(names, packed(cfg, packed=True), strict=True)))


def _loss_and_grads(model, batch: dict, group) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's share of the token mean over ``group`` (its ranks hold different tokens), backward; the
    loss and the gradients as host tensors."""
    import torch.distributed as dist

    out = model(**batch)
    total = out.num_tokens.detach().float().reshape(1)  # on the device, as the loss computed it
    dist.all_reduce(total, group=group)
    share = out.loss * out.num_tokens / total
    share.backward()
    return share.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def _layout_rank(overrides: list[str]) -> dict:
    from megatron.core import parallel_state as ps

    from tests.parallel.test_tensor_parallel import _cfg, tensor_parallel_llm
    from xoron_dist.parallel import state
    from xoron_dist.parallel.sequence import zigzag_split

    cfg = _cfg(*overrides)
    state.initialize(cfg)
    cpu, accel = tensor_parallel_llm(cfg), tensor_parallel_llm(cfg)  # seeded: the same weights
    sp, sp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    group = ps.get_data_parallel_group(with_context_parallel=True)

    def rows(batch: dict) -> dict:
        if sp > 1:  # this rank's zig-zag chunks of every row
            return {k: zigzag_split(v, 1, sp_rank, sp) for k, v in batch.items()}
        if dp > 1:  # this rank's row
            return {k: v[dp_rank : dp_rank + 1] for k, v in batch.items()}
        return batch

    out = {"cpu": _loss_and_grads(cpu, rows(_batch(cfg, "cpu")), group)}
    with standin_accelerator():
        accel.to(ACCEL)
        out["on_accel"] = all(isinstance(p, OnAccel) for p in accel.parameters())
        out["accel"] = _loss_and_grads(accel, rows(_batch(cfg, ACCEL)), group)
    return out


def _assert_same_grads(rank: int, grads: dict, cpu_grads: dict) -> None:
    assert grads.keys() == cpu_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, cpu_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("overrides", [
    pytest.param(["parallel.tp=2"], id="tp2"),
    pytest.param(["parallel.sp=2"], id="sp2-latent-ring-packed"),
    pytest.param(["parallel.ep=2", "train.ep_overlap_chunks=2"], id="ep2-overlap2"),
])
def test_parallel_layouts_keep_every_tensor_on_the_device(overrides):
    for rank, got in enumerate(run_ranks(_layout_rank, 2, overrides, timeout=180)):
        assert got["on_accel"], rank
        (cpu_loss, cpu_grads), (loss, grads) = got["cpu"], got["accel"]
        assert loss == pytest.approx(cpu_loss, rel=1e-5), (rank, loss, cpu_loss)
        _assert_same_grads(rank, grads, cpu_grads)


class _PipelineEngine:
    """What the 1F1B schedule and the tied-embedding sum use of DeepSpeed's ZeRO-1 engine; ``step`` counts."""

    def __init__(self, module: torch.nn.Module, micro: int) -> None:
        self.module, self.micro, self.steps = module, micro, 0
        self.optimizer = self  # ZeRO's optimizer: reduces when asked (``_coalesce_grad_reduction``)
        self._coalesce_grad_reduction = False

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.micro if scale_wrt_gas else loss).backward()

    def gradient_accumulation_steps(self) -> int:
        return self.micro

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.steps + 1 == self.micro

    def step(self) -> None:
        self.steps += 1

    def coalesce_grad_reduction(self):
        return contextlib.nullcontext()

    def get_gradient_for_reduction(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.grad


def _pipeline_rank(micro: int) -> dict:
    from xoron_dist.config import load_config
    from xoron_dist.model.llm import XoronLLM
    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.parallel.pipeline.schedule import train_step_1f1b

    cfg = load_config(None, ["preset=tiny", "model.llm.num_layers=4", "model.llm.dense_layers=1", "parallel.pp=2"])
    state.initialize(cfg)
    out = {}
    for name, device in (("cpu", torch.device("cpu")), ("accel", ACCEL)):
        torch.manual_seed(0)
        parallel = parallelize(XoronLLM(cfg.llm), cfg)
        with standin_accelerator() if device == ACCEL else contextlib.nullcontext():
            engine = _PipelineEngine(parallel.model.to(device), micro)
            batches = [_batch(cfg, device) for _ in range(micro)]
            for i, batch in enumerate(batches):  # different tokens per micro-batch
                batch["input_ids"] = batch["input_ids"].roll(i, 1)
            tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
            sums = train_step_1f1b(engine, parallel.stage, batches, scale=micro / tokens)
            out[name] = (sums.cpu(), {n: p.grad.detach().cpu() for n, p in engine.module.named_parameters()},
                         all(isinstance(p, OnAccel) for p in engine.module.parameters()))
    return out


def test_pipeline_step_keeps_every_tensor_on_the_device():
    """PP=2, 3 micro-batches (warm-up, steady state and cool-down on the first stage) with the embedding tied
    to the head across the two stages."""
    for rank, got in enumerate(run_ranks(_pipeline_rank, 2, 3, timeout=180)):
        (cpu_sums, cpu_grads, _), (sums, grads, on_accel) = got["cpu"], got["accel"]
        assert on_accel, rank
        torch.testing.assert_close(sums, cpu_sums, rtol=1e-5, atol=1e-6)
        assert float(sums.sum()) > 0
        _assert_same_grads(rank, grads, cpu_grads)


def _multimodal_sp_rank() -> dict:
    from megatron.core import parallel_state as ps

    from tests.model.test_xoron_multimodal import open_gated_model, tiny_cfg
    from tests.parallel.test_multimodal_sp import _batch as media_batch
    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = tiny_cfg("parallel.sp=2")
    state.initialize(cfg)
    out = {}
    for name, device in (("cpu", torch.device("cpu")), ("accel", ACCEL)):
        model, _ = open_gated_model(cfg)  # seed 0; the fusion layers' output and gradients are not zero
        parallelize(model, cfg)
        with standin_accelerator() if device == ACCEL else contextlib.nullcontext():
            model.to(device)
            out[name] = _loss_and_grads(model, _on(device, media_batch()), ps.get_context_parallel_group())
    return out


def test_multimodal_sequence_parallel_keeps_every_tensor_on_the_device():
    for rank, got in enumerate(run_ranks(_multimodal_sp_rank, 2, timeout=180)):
        (cpu_loss, cpu_grads), (loss, grads) = got["cpu"], got["accel"]
        assert loss == pytest.approx(cpu_loss, rel=1e-5), (rank, loss, cpu_loss)
        fusion = [n for n, g in grads.items() if "fusion" in n and float(g.abs().sum()) > 0]
        assert fusion, "no fusion layer got a gradient: the media did not reach the text"
        _assert_same_grads(rank, grads, cpu_grads)
