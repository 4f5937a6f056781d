"""The multimodal model under ZeRO-3 on 2 ranks equals one rank, with media on only some ranks.

ZeRO-3 gathers a module's weights around each call of it (an all-gather over the data-parallel
ranks) and reduces gradients in buckets as they arrive, so every rank must call every module
equally often and in the same order, whatever its micro-batch holds. The batches below are made
so that they would not if the model let the data decide: step 1, rank 0 holds a video and no
image, rank 1 two images and no video; step 2, rank 0 holds images and a video, rank 1 text only
(the fusion layers then read a blank medium). Every weight is partitioned (persistence threshold
0) and the gradient buckets are small, so any divergence of the call or gradient order shows as
a gloo size mismatch or as wrong gradients. Checked against the plain single-rank model on the
global batch: loss and every gradient of both steps, the weights after two AdamW steps as the
consolidation reads them from the ZeRO-3 checkpoint, and the checkpoint reloaded into the engine.

The same batches on 4 ranks, dp 2 x tp 2 with EP = 2 over the data ranks, check ZeRO-3 with TP-split
encoders, projectors and fusion layers and with spread experts (whole on each TP rank: with TP-split
experts DeepSpeed's ZeRO-3 gradient norm misses the other TP ranks' slices, which the layout refuses).
"""

from __future__ import annotations

import pytest
import torch

from tests.model.test_xoron_multimodal import open_gated_model, packed_batch, tiny_cfg
from tests.parallel.harness import run_ranks, zero3_engine
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.model.xoron import XoronMultimodalModel
from xoron_dist.parallel.tensor import tp_slice

# Adam's eps at 1e-6: with 1e-8 a weight whose gradient is ~1e-8 moves by g / (|g| + eps), which turns a
# gradient difference far inside the gradients' tolerance (reduction order) into a visible weight difference.
CFG = ["parallel.zero_stage=3", "train.ds_config=ds_configs/zero3.json", "train.micro_batch_size=2",
       "train.grad_clip=0", "train.weight_decay=0", "train.eps=1e-6"]
TEXT_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def _without(batch: dict, *media: str) -> dict:
    """``batch`` with the given media dropped (their placeholders stay as ordinary unlabelled tokens)."""
    out = dict(batch)
    for medium in media:
        out[f"{medium}s"], out[f"{medium}_spans"] = [], torch.zeros((0, 3), dtype=torch.long)
    return out


def _rank_batches() -> list[list[dict]]:
    """Per step, the micro-batch of rank 0 and of rank 1 (2 rows each)."""
    return [[_without(packed_batch(0), "image"), _without(packed_batch(1), "video")],
            [packed_batch(2), _without(packed_batch(3), "image", "video")]]


def _global(parts: list[dict]) -> dict:
    """The ranks' micro-batches as one batch of 4 rows (what one rank reads)."""
    out = {k: torch.cat([p[k] for p in parts]) for k in TEXT_KEYS}
    for medium in ("image", "video"):
        out[f"{medium}s"] = [m for p in parts for m in p[f"{medium}s"]]
        out[f"{medium}_spans"] = torch.cat([p[f"{medium}_spans"] + torch.tensor([2 * i, 0, 0])
                                            for i, p in enumerate(parts)])
    return out


def _zero3_body(full_state: dict, ckpt_dir: str) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = tiny_cfg(*CFG)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    # the ranks' head runs its loss in chunks (LinearCrossEntropy: a custom autograd function handed the
    # ZeRO-3-gathered weight, its gradient made in the forward); the single-rank reference, in one piece
    model.llm.lm_head.chunk_tokens = 7
    parallelize(model, cfg)
    engine = zero3_engine(model, cfg, ctx, reduce_bucket_size=20_000, stage3_prefetch_bucket_size=20_000)
    partitioned = {n: p.ds_tensor.numel() == -(-p.ds_numel // 2) for n, p in engine.module.named_parameters()}
    losses, grads = [], []
    for parts in _rank_batches():
        batch = parts[ctx.dp_rank]
        total = torch.tensor([float(sum((p["labels"] != IGNORE_INDEX).sum() for p in parts))])
        out = engine(**batch)
        token_sum = out.loss * out.num_tokens
        engine.backward(token_sum * ctx.dp_size / total.item())  # ZeRO-3 averages over the DP ranks
        losses.append(token_sum.item())
        grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="two_steps")
    first = _rank_batches()[0][ctx.dp_rank]
    with torch.no_grad():
        saved_loss = engine(**first).loss.item()
    engine.backward(engine(**first).loss)
    engine.step()  # the weights move on ...
    with torch.no_grad():
        moved_loss = engine(**first).loss.item()
    engine.load_checkpoint(ckpt_dir, tag="two_steps")  # ... and come back
    with torch.no_grad():
        resumed_loss = engine(**first).loss.item()
    return dict(losses=losses, grads=grads, partitioned=partitioned, saved=saved_loss, moved=moved_loss,
                resumed=resumed_loss)


@pytest.mark.multirank
def test_multimodal_zero3_two_ranks_with_media_on_some_ranks_equal_one_rank(tmp_path):
    from xoron_dist.train.build import parameter_groups
    from xoron_dist.train.consolidation import read_full_tensors

    cfg = tiny_cfg(*CFG)
    model, full_state = open_gated_model(cfg)
    results = run_ranks(_zero3_body, 2, full_state, str(tmp_path / "ckpt"))

    tc = cfg.train
    opt = torch.optim.AdamW(parameter_groups(model, 0.0), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    for step, parts in enumerate(_rank_batches()):
        opt.zero_grad()
        out = model(**_global(parts))
        out.loss.backward()
        assert sum(r["losses"][step] for r in results) / out.num_tokens == pytest.approx(out.loss.item(), rel=1e-5)
        for rank, result in enumerate(results):
            for name, param in model.named_parameters():
                torch.testing.assert_close(result["grads"][step][name], param.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"step {step + 1}, rank {rank}: gradient of {name}")
        opt.step()
    assert float(model.video.patch_embed.weight.grad.abs().sum()) > 0  # step 2: rank 0's video
    assert float(model.fusion.layers[0].attn.q_proj.weight.grad.abs().sum()) > 0

    for prefix in ("vision.", "video.", "image_projector.", "video_projector.", "fusion.", "llm."):
        held = [split for name, split in results[0]["partitioned"].items() if name.startswith(prefix)]
        assert held and all(held), prefix  # each rank holds half of every weight

    saved = dict(read_full_tensors(tmp_path / "ckpt" / "two_steps", cfg, world_size=2))
    for name, param in model.named_parameters():
        torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=1e-5, msg=f"checkpoint: {name}")
    for rank, result in enumerate(results):
        assert result["moved"] != pytest.approx(result["saved"], rel=1e-6), rank
        assert result["resumed"] == pytest.approx(result["saved"], rel=1e-6), rank


EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."


def split_meta(model) -> dict[str, tuple]:
    """name -> (TP-split, partition dim, stride, first expert or None, rows along the partition dim) of every
    parameter of a parallelized model (read before ``deepspeed.initialize``: ZeRO-3 empties the parameters)."""
    firsts = {name: module.first_expert for name, module in model.named_modules() if hasattr(module, "first_expert")}
    return {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1), firsts.get(n.split(EXPERTS)[0]) if EXPERTS in n else None,
                p.shape[getattr(p, "partition_dim", 0)] if p.ndim else 1)
            for n, p in model.named_parameters()}


def rank_part(name: str, meta: tuple, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    """What a tensor/expert-parallel rank's parameter ``name`` holds of the single-rank tensors ``full``:
    an expert-parallel expert (``...experts.deepspeed_moe.experts.deepspeed_experts.<i>.<w>``) is row
    ``first + i`` of the stacked ``...experts.<w>``; a TP-split tensor is this rank's slice (the vocabulary
    padded to a multiple of tp first)."""
    split, dim, stride, first, local_rows = meta
    if first is not None:
        prefix, rest = name.split(EXPERTS)
        local, weight = rest.split(".")
        tensor = full[f"{prefix}.{weight}"][first + int(local)]
    else:
        tensor = full[name]
    if not split:
        return tensor
    rows = local_rows * tp
    if tensor.shape[dim] < rows:  # the vocabulary padded for TP
        pad = list(tensor.shape)
        pad[dim] = rows - tensor.shape[dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)
    return tp_slice(tensor, dim, stride, tp_rank, tp)


def _tp_ep_body(full_state: dict, extra: tuple[str, ...]) -> dict:
    """Two ZeRO-3 steps (all weights partitioned, small buckets) of the layout ``extra``: per step the
    summed token loss of this rank's rows, every full gradient, and DeepSpeed's gradient norm."""
    from deepspeed.utils import safe_get_full_grad
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = tiny_cfg(*CFG, *extra)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    parallelize(model, cfg)
    meta = split_meta(model)
    engine = zero3_engine(model, cfg, ctx, reduce_bucket_size=20_000, stage3_prefetch_bucket_size=20_000)
    divisor = ctx.dp_size * cfg.parallel.sp  # what ZeRO-3 divides the gradients summed over data x sequence by
    losses, grads, norms = [], [], []
    for parts in _rank_batches():
        batch = parts[ctx.dp_rank] if ctx.dp_size == len(parts) else _global(parts)
        total = float(sum((p["labels"] != IGNORE_INDEX).sum() for p in parts))
        out = engine(**batch)
        token_sum = out.loss * out.num_tokens
        engine.backward(token_sum * divisor / total)
        losses.append(token_sum.item())
        grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return dict(losses=losses, grads=grads, norms=norms, meta=meta, dp=(ctx.dp_rank, ctx.dp_size),
                sp=ps.get_context_parallel_rank(),
                tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()))


@pytest.mark.multirank
def test_multimodal_zero3_with_tensor_and_expert_parallel_equals_one_rank():
    """dp 2 x tp 2 with the LLM's experts spread over the 2 data ranks (EP = 2, whole experts), ZeRO-3
    over 4 ranks; the data ranks hold different media (the batches above), the encoders, projectors,
    fusion and generator-free LLM are TP-split and every weight partitioned over its data-parallel
    group (experts over their replicas): the loss, every gradient (this rank's TP slice, its experts)
    and DeepSpeed's gradient norm of two steps equal the single-rank model's."""
    from xoron_dist.train.build import parameter_groups

    layout = ("parallel.tp=2", "parallel.ep=2", "parallel.tp_experts=false")
    cfg = tiny_cfg(*CFG)
    model, full_state = open_gated_model(cfg)
    results = run_ranks(_tp_ep_body, 4, full_state, layout)

    tc = cfg.train
    opt = torch.optim.AdamW(parameter_groups(model, 0.0), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    assert {r["dp"] for r in results} == {(0, 2), (1, 2)} and {r["tp"] for r in results} == {(0, 2), (1, 2)}
    for step, parts in enumerate(_rank_batches()):
        opt.zero_grad()
        out = model(**_global(parts))
        out.loss.backward()
        norm = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()) ** 0.5
        full = {n: p.grad for n, p in model.named_parameters()}
        by_dp = {r["dp"][0]: r["losses"][step] for r in results}
        assert sum(by_dp.values()) / out.num_tokens == pytest.approx(out.loss.item(), rel=1e-5)
        for rank, result in enumerate(results):
            assert result["norms"][step] == pytest.approx(norm, rel=1e-5), (step, rank)
            assert any(m[0] for n, m in result["meta"].items() if n.startswith("video."))
            assert any(m[3] is not None for m in result["meta"].values())
            for name, grad in result["grads"][step].items():
                expected = rank_part(name, result["meta"][name], full, *result["tp"])
                torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6,
                                           msg=f"step {step + 1}, rank {rank}: gradient of {name}")
        opt.step()


def _layout_cfg(*extra):
    return tiny_cfg("data.source=arrow", "data.path=x", "parallel.zero_stage=3", *extra)


def test_layout_accepts_every_encoder_and_generator_under_zero3_and_refuses_the_rest_with_the_fix():
    from xoron_dist.parallel.layout import LayoutError, validate_layout

    assert validate_layout(_layout_cfg(), 2).zero_stage == 3
    assert validate_layout(_layout_cfg("parallel.tp=2"), 2).tp == 2
    assert validate_layout(_layout_cfg("parallel.ep=2"), 2).ep == 2
    assert validate_layout(_layout_cfg("parallel.tp=2", "parallel.ep=2", "parallel.tp_experts=false"), 4).ep == 2
    assert validate_layout(_layout_cfg("model.image_gen.enabled=true", "model.video_gen.enabled=true"), 2).dp == 2
    assert validate_layout(_layout_cfg("model.audio.enabled=true", "model.speech.enabled=true"), 2).dp == 2
    assert validate_layout(_layout_cfg("model.image_gen.enabled=true", "parallel.ep=2"), 2).ep == 2
    assert validate_layout(_layout_cfg("model.image_gen.enabled=true", "parallel.tp=2"), 4).tp == 2
    refused = [
        (("parallel.tp=2", "parallel.ep=2"), 4, "parallel.tp_experts = true with parallel.ep=2, parallel.tp=2 and "
                                                "parallel.zero_stage=3: .* set parallel.tp_experts=false"),
    ]
    for extra, world, message in refused:
        with pytest.raises(LayoutError, match=message) as err:
            validate_layout(_layout_cfg(*extra), world)
        assert "parallel.zero_stage<=2" in str(err.value)
    assert validate_layout(_layout_cfg("model.image_gen.enabled=true", "parallel.zero_stage=2"), 2).zero_stage == 2
