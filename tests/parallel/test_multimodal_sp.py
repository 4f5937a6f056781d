"""The multimodal model under sequence parallelism (ring attention) on 2 ranks equals one rank.

Rows of 32 tokens cut into 4 zig-zag chunks of 8: SP rank 0 holds positions 0-7 and 24-31, rank 1
positions 8-23. Image 0 sits at row 0, 6-9 (across the boundary of rank 0's and rank 1's chunks),
and the text of its document that reads it through the fusion layers lives on rank 1; image 1 sits
at row 1, 21-24 (rank 1 -> rank 0); the one video at row 0, 25-28. Round-robin sharing gives rank 0
image 0 and the video, rank 1 image 1 and the blank video, so each medium is encoded once. The
fusion gates are opened so the fusion layers' output and gradients are not zero. Both ranks' summed
loss and gradients (DeepSpeed's sum over the sequence ranks) must equal the single-rank ones.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.test_xoron_multimodal import open_gated_model, packed_batch, tiny_cfg
from tests.parallel.harness import run_ranks, zero3_engine
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.model.xoron import XoronMultimodalModel


def _batch() -> dict:
    """Two rows of 32 tokens (test_xoron_multimodal's documents, other spans)::

        row 0: doc 0 = text <img 6-9> text | doc 1 = text only (15-23) | doc 2 = text <video 25-28> text
        row 1: doc 0 = text only (0-9) | doc 1 = text <img 21-24> text (10-25) | padding
    """
    return packed_batch(5, image_spans=((0, 6, 4), (1, 21, 4)), video_spans=((0, 25, 4),))


def _text_only() -> dict:
    """The batch with its media dropped (their placeholders stay as unlabelled tokens)."""
    batch = _batch()
    for medium in ("image", "video"):
        batch[f"{medium}s"], batch[f"{medium}_spans"] = [], torch.zeros((0, 3), dtype=torch.long)
    return batch


def _loss_and_grads(model, group=None, batch=None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (token mean over both ranks) and every gradient, summed over ``group`` when given."""
    import torch.distributed as dist

    model.zero_grad()
    out = model(**(batch or _batch()))
    total = torch.tensor([float(out.num_tokens)])
    local_sum = out.loss * out.num_tokens
    if group is not None:
        dist.all_reduce(total, group=group)
    (local_sum / total).backward()
    loss = local_sum.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if group is not None:
        dist.all_reduce(loss, group=group)
        for grad in grads.values():
            dist.all_reduce(grad, group=group)
    return (loss / total).item(), grads


def _sp_body(full_state: dict, extra: tuple[str, ...] = ()) -> dict:
    from megatron.core import parallel_state as ps

    from tests.parallel.test_multimodal_zero3 import split_meta
    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = tiny_cfg("parallel.sp=2", *extra)
    state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    parallelize(model, cfg)
    encoded = []  # the media this rank's encoders were given
    for name in ("vision", "video"):
        getattr(model, name).register_forward_pre_hook(
            lambda mod, args, name=name: encoded.append((name, [tuple(m.shape) for m in args[0]])))
    loss, grads = _loss_and_grads(model, ps.get_context_parallel_group())
    text_loss, _ = _loss_and_grads(model, ps.get_context_parallel_group(), _text_only())
    return {"loss": loss, "grads": grads, "encoded": encoded, "layout": type(model.row_layout).__name__,
            "text_loss": text_loss, "meta": split_meta(model), "sp": ps.get_context_parallel_rank(),
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())}


@pytest.mark.multirank
@pytest.mark.parametrize("tp", [1, 2], ids=["sp2", "sp2xtp2"])
def test_multimodal_sp2_with_a_span_across_the_chunk_boundary_equals_one_rank(tp):
    """SP = 2, and SP = 2 x TP = 2 (TP-split encoders, projectors and fusion; each TP rank exchanges the
    media within its own SP group, the TP peers encode the same share): loss and gradients (TP slices)."""
    from tests.parallel.test_multimodal_zero3 import rank_part

    cfg = tiny_cfg()
    model, full_state = open_gated_model(cfg)  # fusion gates open: the fusion layers' output and gradients not zero
    ref_loss, ref_grads = _loss_and_grads(model)
    assert float(model.fusion.layers[0].attn.q_proj.weight.grad.abs().sum()) > 0
    assert float(model.vision.patch_embed.weight.grad.abs().sum()) > 0
    ref_text_loss, _ = _loss_and_grads(model, batch=_text_only())
    results = run_ranks(_sp_body, 2 * tp, full_state, (f"parallel.tp={tp}",))
    blank_image, blank_video = (16, 16, 3), (1, 8, 8, 3)
    text_only = [("vision", [blank_image]), ("video", [blank_video])]  # then every rank encodes the blanks
    encoded = [[("vision", [(16, 12, 3)]), ("video", [(3, 16, 16, 3)]), *text_only],
               [("vision", [(12, 16, 3)]), ("video", [blank_video]), *text_only]]
    assert sorted((out["sp"], out["tp"][0]) for out in results) == [(s, t) for s in range(2) for t in range(tp)]
    for rank, out in enumerate(results):
        assert out["encoded"] == encoded[out["sp"]], rank
        assert out["layout"] == "ZigzagMediaRows"
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-5), (rank, out["loss"], ref_loss)
        assert out["text_loss"] == pytest.approx(ref_text_loss, rel=1e-5), (rank, out["text_loss"], ref_text_loss)
        assert (tp > 1) == any(out["meta"][n][0] for n in out["grads"] if n.startswith("video."))
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, rank_part(name, out["meta"][name], ref_grads, *out["tp"]),
                                       rtol=1e-4, atol=2e-6, msg=f"rank {rank}: {name}")


Z3 = ["parallel.zero_stage=3", "train.ds_config=ds_configs/zero3.json", "train.micro_batch_size=2", "train.grad_clip=0",
      "train.weight_decay=0"]


def _zero3_body(full_state: dict) -> dict:
    """One step of the trainer's ``StepRunner`` through a ZeRO-3 engine over dp 1 x sp 2 (every weight
    partitioned over the two SP ranks); the full gradients are read just before the optimizer step."""
    from types import SimpleNamespace

    from deepspeed.utils import safe_get_full_grad

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.train.build import BuiltStage
    from xoron_dist.train.objectives import TokenGroups
    from xoron_dist.train.step import StepRunner

    cfg = tiny_cfg("parallel.sp=2", *Z3)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    parallelize(model, cfg)
    engine = zero3_engine(model, cfg, ctx)  # every weight gathered per call
    grads = {}
    real_step = engine.step

    def step():
        grads.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        real_step()

    engine.step = step
    built = BuiltStage(engine, None, engine.module, None, None, None, 0)
    result = StepRunner(cfg, ctx, built, TokenGroups(cfg, lambda token: None)).run(
        [SimpleNamespace(**_batch(), image_is_target=None, video_is_target=None)]).read()
    return {"loss": result.losses["lm"], "count": result.counts["lm"], "grads": grads}


@pytest.mark.multirank
def test_trainer_step_under_zero3_and_sp2_equals_one_rank():
    """The trainer keeps the multimodal rows whole (the model cuts them), counts the tokens once per
    replica, and ZeRO-3's weight gathers follow the same calls on both SP ranks although rank 1 encodes
    the blank video where rank 0 encodes the real one."""
    model, full_state = open_gated_model(tiny_cfg(*Z3))
    ref_loss, ref_grads = _loss_and_grads(model)
    count = int((_batch()["labels"] != IGNORE_INDEX).sum())
    for rank, out in enumerate(run_ranks(_zero3_body, 2, full_state)):
        assert out["count"] == count, rank
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-5), (rank, out["loss"], ref_loss)
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=2e-6, msg=f"rank {rank}: {name}")


def _gather_body() -> dict:
    """gather_shares and ZigzagMediaRows.gather_media against the unsplit computation (3 media, 2 ranks)."""
    import torch.distributed as dist

    from xoron_dist.parallel import state
    from xoron_dist.parallel.media_exchange import ZigzagMediaRows, gather_shares
    from xoron_dist.parallel.sequence import SequenceSplit

    state.initialize(tiny_cfg("parallel.sp=2"))
    rank, group = dist.get_rank(), dist.group.WORLD
    gen = torch.Generator().manual_seed(3)
    media = torch.randn(3, 5, 4, generator=gen)  # 3 media of up to 5 tokens, width 4
    lengths = torch.tensor([5, 2, 3])
    weights = torch.randn(2, 3, 5, 4, generator=gen)  # what each rank's loss puts on every medium
    for i, length in enumerate(lengths.tolist()):
        weights[:, i, length:] = 0  # a medium's padding tokens are never read

    # the reference: one rank holds every medium and both ranks' losses
    ref_media = media.clone().requires_grad_()
    (ref_media * weights.sum(0)).sum().backward()

    # gather_shares: rank r's share is media r::2 padded to 2 slots
    owned = list(range(rank, 3, 2))
    mine = media[owned].clone().requires_grad_()
    every = ZigzagMediaRows(SequenceSplit(group, rank, 2, True)).gather_media(mine[:, : int(lengths[owned].max())],
                                                                             lengths)
    (every * weights[rank]).sum().backward()
    plain = torch.arange(6.0).reshape(1, 2, 3) + 10 * rank
    plain.requires_grad_()
    stacked = gather_shares(plain, group, rank)
    (stacked * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1) * (rank + 1)).sum().backward()
    # one medium of 2 tokens: rank 1 owns none and sends an empty share cut from a longer blank
    layout = ZigzagMediaRows(SequenceSplit(group, rank, 2, True))
    blank = torch.ones(1, 5, 4, requires_grad=True)
    alone = media[:1, :2].clone().requires_grad_() if rank == 0 else blank[:0] + 0.0 * blank.sum()
    single = layout.gather_media(alone, torch.tensor([2]))
    (single * (rank + 1)).sum().backward()
    return {"every": every.detach(), "grad": mine.grad, "ref_grad": ref_media.grad[owned], "owned": owned,
            "stacked": stacked.detach(), "plain_grad": plain.grad, "single": single.detach(),
            "alone_grad": alone.grad if rank == 0 else blank.grad}


@pytest.mark.multirank
def test_media_all_gather_forward_and_backward_equal_the_unsplit_computation():
    gen = torch.Generator().manual_seed(3)
    media = torch.randn(3, 5, 4, generator=gen)
    lengths = [5, 2, 3]
    for rank, out in enumerate(run_ranks(_gather_body, 2)):
        assert out["owned"] == [[0, 2], [1]][rank]
        for i, length in enumerate(lengths):  # every medium, in index order, its own tokens
            torch.testing.assert_close(out["every"][i, :length], media[i, :length], rtol=0, atol=0)
        torch.testing.assert_close(out["grad"], out["ref_grad"], rtol=1e-6, atol=1e-6)
        assert out["stacked"][:, 0, 0, 0].tolist() == [0.0, 10.0]
        # d/d(share r) of Σ_ranks (rank+1) · (r+1) · Σ share r = 3 · (r+1)
        assert torch.equal(out["plain_grad"], torch.full((1, 2, 3), 3.0 * (rank + 1)))
        torch.testing.assert_close(out["single"], media[:1, :2], rtol=0, atol=0)
        assert torch.equal(out["alone_grad"], torch.full((1, 2, 4), 3.0) if rank == 0 else torch.zeros(1, 5, 4))


def _layout_cfg(*extra):
    return tiny_cfg("data.source=arrow", "data.path=x", "train.seq_len=32", *extra)


def test_layout_accepts_sp2_multimodal_with_tp_pp_and_refuses_generators():
    from xoron_dist.parallel.layout import LayoutError, validate_layout

    assert validate_layout(_layout_cfg("parallel.sp=2"), 2).sp == 2
    assert validate_layout(_layout_cfg("parallel.pp=2", "parallel.zero_stage=1"), 2).pp == 2  # test_multimodal_pp.py
    assert validate_layout(_layout_cfg("parallel.pp=2", "parallel.sp=2", "parallel.zero_stage=1"), 4).sp == 2
    assert validate_layout(_layout_cfg("parallel.sp=2", "parallel.tp=2"), 4).tp == 2
    with pytest.raises(LayoutError, match="model.image_gen enabled with parallel.sp=2") as err:
        validate_layout(_layout_cfg("parallel.sp=2", "model.image_gen.enabled=true"), 2)
    assert "parallel.sp=1" in str(err.value)
    assert validate_layout(_layout_cfg("parallel.sp=2", "parallel.zero_stage=3"), 4).dp == 2
