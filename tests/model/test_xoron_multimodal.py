"""XoronMultimodalModel: span filling, text-only loss, freezing, DP=2 parity through DeepSpeed, and a
captioning run that must use the image."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.parallel.harness import run_ranks
from xoron_dist.config import load_config
from xoron_dist.model.llm import IGNORE_INDEX, XoronLLM
from xoron_dist.model.xoron import XoronMultimodalModel, build_model
from xoron_dist.synth.scenes import PALETTE, draw_shape
from xoron_dist.train.stages import freeze_parameters, plan_stages

# Tiny towers beside the tiny LLM (hidden 64, 2 layers); 4 tokens per image and per video.
TINY = [
    "preset=tiny", "data.image_tokens=4", "data.video_tokens=4",
    "model.vision.enabled=true", "model.vision.hidden_size=32", "model.vision.num_layers=1",
    "model.vision.num_heads=2", "model.vision.intermediate_size=64", "model.vision.image_size=16",
    "model.vision.patch_size=4", "model.vision.max_patches=16",
    "model.video.enabled=true", "model.video.hidden_size=24", "model.video.num_layers=1", "model.video.num_heads=2",
    "model.video.patch_size=4", "model.video.min_resolution=8", "model.video.max_resolution=16",
    "model.video.expert_intermediate_size=32", "model.video.motion_dim=8", "model.video.min_frames=1",
    "model.video.max_frames=8",
    "model.projector.num_layers=1", "model.projector.num_heads=4", "model.projector.intermediate_size=64",
    "model.fusion.layers=[0,0,1,1]", "model.fusion.num_heads=4", "model.fusion.intermediate_size=64",
]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def packed_batch(seed=0, image_spans=((0, 1, 4), (1, 13, 4)), video_spans=((0, 24, 4),)):
    """Two packed rows of 32 tokens, several documents, media in some of them (spans: row, start, length;
    by default)::

        row 0: doc 0 = <img> text | doc 1 = text only | doc 2 = <video> text
        row 1: doc 0 = text only | doc 1 = text <img> text | padding
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (2, 32), generator=gen)
    docs = torch.tensor([[0] * 15 + [1] * 9 + [2] * 8, [0] * 10 + [1] * 16 + [-1] * 6])
    image_spans, video_spans = torch.tensor(image_spans), torch.tensor(video_spans)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row in range(2):
        for t in range(31):
            if docs[row, t] >= 0 and docs[row, t + 1] == docs[row, t]:
                labels[row, t] = ids[row, t + 1]
    for spans in (image_spans, video_spans):
        for row, start, length in spans.tolist():
            ids[row, start : start + length] = 3  # the placeholder id
            labels[row, start - 1 : start + length] = IGNORE_INDEX  # placeholders are never targets
    positions = torch.zeros_like(ids)
    for row in range(2):
        for doc in docs[row].unique().tolist():
            where = docs[row] == doc
            positions[row, where] = torch.arange(int(where.sum())) if doc >= 0 else 0
    images = [torch.randint(0, 256, (16, 12, 3), dtype=torch.uint8, generator=gen),
              torch.randint(0, 256, (12, 16, 3), dtype=torch.uint8, generator=gen)]
    videos = [torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=gen)]
    return dict(input_ids=ids, labels=labels, position_ids=positions, document_ids=docs, images=images,
                image_spans=image_spans, videos=videos, video_spans=video_spans)


def test_build_model_picks_the_text_model_without_encoders():
    text_cfg = load_config(None, ["preset=tiny"])
    assert type(build_model(text_cfg)) is XoronLLM
    assert type(build_model(tiny_cfg())) is XoronMultimodalModel
    assert type(build_model(tiny_cfg("model.video.enabled=false"))) is XoronMultimodalModel


def test_placeholders_hold_the_projector_outputs_and_text_keeps_its_embeddings():
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg()).eval()
    batch = packed_batch()
    seen = {}
    model.llm.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    out = model(**batch)
    embeds = seen["inputs_embeds"]
    images, videos = model.encode("image", batch["images"]), model.encode("video", batch["videos"])
    assert images.shape == (2, 4, 64) and videos.shape == (1, 4, 64)  # data.*_tokens, in the LLM's width
    for tokens, spans in ((images, batch["image_spans"]), (videos, batch["video_spans"])):
        for i, (row, start, length) in enumerate(spans.tolist()):
            assert torch.equal(embeds[row, start : start + length], tokens[i])
    text = torch.ones(2, 32, dtype=torch.bool)
    for row, start, length in torch.cat((batch["image_spans"], batch["video_spans"])).tolist():
        text[row, start : start + length] = False
    assert torch.equal(embeds[text], model.llm.embed_tokens(batch["input_ids"])[text])
    # the loss is the LLM's over the labelled (text) positions only
    assert out.num_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    for row, start, length in batch["image_spans"].tolist():
        assert bool((batch["labels"][row, start - 1 : start + length] == IGNORE_INDEX).all())


def test_generation_targets_are_skipped_and_mismatched_spans_refused():
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg()).eval()
    batch = packed_batch()
    seen = {}
    model.llm.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model(**batch, image_is_target=torch.tensor([False, True]))
    embeds = seen["inputs_embeds"]
    assert torch.equal(embeds[1, 13:17], model.llm.embed_tokens(batch["input_ids"])[1, 13:17])  # left as placeholders
    assert torch.equal(embeds[0, 1:5], model.encode("image", batch["images"][:1])[0])
    bad = dict(batch, image_spans=torch.tensor([[0, 1, 5], [1, 13, 4]]))
    with pytest.raises(ValueError, match="data.image_tokens"):
        model(**bad)
    with pytest.raises(ValueError, match="image_spans"):
        model(batch["input_ids"], images=batch["images"])
    text_only = XoronMultimodalModel(tiny_cfg("model.video.enabled=false"))
    with pytest.raises(ValueError, match="model.video.enabled"):
        text_only(**batch)


def test_every_parameter_gets_a_gradient_even_without_media():
    from xoron_dist.train.expert_balance import ExpertBalancer

    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg())
    balancer = ExpertBalancer(model)
    batch = packed_batch()
    model(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"]).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(float(p.grad.abs().sum()) == 0 for n, p in model.named_parameters() if n.startswith(("vision", "video")))
    video = balancer.of_family("video")
    assert video and all(float(balancer.load[i].sum()) == 0 for i in video)  # the dummy's routing is not load
    assert all(float(balancer.load[i].sum()) > 0 for i in balancer.of_family("llm"))
    with torch.no_grad():  # nothing to keep in a graph: no dummies, and the output is the LLM's
        text = model(batch["input_ids"], document_ids=batch["document_ids"]).logits
    assert torch.equal(text, model.llm(batch["input_ids"], document_ids=batch["document_ids"]).logits)


def test_stage_freeze_prefixes_reach_the_wrapped_llm_and_the_new_parts():
    cfg = tiny_cfg("train.steps=2", "stages=[{name: align, steps: 2, freeze: [llm, vision, layers.0]}]")
    model = XoronMultimodalModel(cfg)
    frozen = freeze_parameters(model, plan_stages(cfg)[0])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("llm.", "vision.")))
    assert trainable and all(n.startswith(("video", "image_projector", "video_projector", "fusion")) for n in trainable)


# --------------------------------------------------------------------------- DP=2 parity


DP_CFG = ["parallel.zero_stage=0", "train.micro_batch_size=2", "train.grad_clip=0"]


def _dp_batch():
    """Four rows; rows 0-1 (rank 0 under DP=2) hold images and a video, rows 2-3 an image only."""
    a, b = packed_batch(0), packed_batch(1)
    batch = {k: torch.cat((a[k], b[k])) for k in ("input_ids", "labels", "position_ids", "document_ids")}
    batch["images"] = a["images"] + b["images"][1:]
    batch["image_spans"] = torch.cat((a["image_spans"], torch.tensor([[3, 13, 4]])))
    batch["videos"], batch["video_spans"] = a["videos"], a["video_spans"]
    return batch


def _rows(batch, rows):
    """The rows ``rows`` of a batch, with their media and re-numbered spans (what one DP rank reads)."""
    out = {k: batch[k][rows] for k in ("input_ids", "labels", "position_ids", "document_ids")}
    for medium in ("image", "video"):
        spans = batch[f"{medium}_spans"]
        keep = [i for i, row in enumerate(spans[:, 0].tolist()) if row in rows]
        out[f"{medium}s"] = [batch[f"{medium}s"][i] for i in keep]
        out[f"{medium}_spans"] = spans[keep] - torch.tensor([rows[0], 0, 0])
    return out


def _engine_step(model, cfg, batch, dp_size, dp_group):
    """The trainer's arithmetic: loss = sum over the step's labelled tokens / their global count."""
    import deepspeed

    from xoron_dist.parallel import state
    from xoron_dist.train.build import parameter_groups
    from xoron_dist.train.ds_config import build_ds_config

    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.0),
                                      config=build_ds_config(cfg, dp_size, torch.float32, "cpu"),
                                      mpu=state.mpu() if dp_size > 1 else None)
    total = torch.tensor([float((batch["labels"] != IGNORE_INDEX).sum())])
    if dp_size > 1:
        torch.distributed.all_reduce(total, group=dp_group)
    out = engine(**batch)
    micro_sum = out.loss * out.num_tokens
    engine.backward(micro_sum * dp_size / total.item())  # DeepSpeed averages over the DP ranks
    loss = micro_sum.detach().clone()
    if dp_size > 1:
        torch.distributed.all_reduce(loss, group=dp_group)
    return (loss / total).item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _dp_body(full_state):
    from xoron_dist.parallel import state

    cfg = tiny_cfg(*DP_CFG)
    ctx = state.initialize(cfg)
    model = XoronMultimodalModel(cfg)
    model.load_state_dict(full_state)
    per_rank = 4 // ctx.dp_size
    rows = list(range(per_rank * ctx.dp_rank, per_rank * (ctx.dp_rank + 1)))
    return _engine_step(model, cfg, _rows(_dp_batch(), rows), ctx.dp_size, ctx.dp_group)


def open_gated_model(cfg) -> tuple[XoronMultimodalModel, dict[str, torch.Tensor]]:
    """The model of seed 0 with its fusion gates opened to 0.5 (so the fusion layers' gradients are not all
    zero), and a copy of its state for the ranks to load."""
    torch.manual_seed(0)
    model = XoronMultimodalModel(cfg)
    with torch.no_grad():
        for layer in model.fusion.layers:
            layer.attn_gate.fill_(0.5)
            layer.ffn_gate.fill_(0.5)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.multirank
def test_two_rank_data_parallel_step_equals_single_rank():
    """Rank 1 holds no video: its video encoder must still reduce (zero) gradients with rank 0's."""
    cfg = tiny_cfg(*DP_CFG, "train.micro_batch_size=4")
    model, full_state = open_gated_model(cfg)
    (ref_loss, ref_grads), = run_ranks(_dp_body, 1, full_state)  # in its own process: DeepSpeed's groups
    results = run_ranks(_dp_body, 2, full_state)
    for rank, (loss, grads) in enumerate(results):
        assert loss == pytest.approx(ref_loss, rel=1e-6), rank
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
    assert float(ref_grads["video.patch_embed.weight"].abs().sum()) > 0
    assert float(ref_grads["fusion.layers.0.attn.q_proj.weight"].abs().sum()) > 0


# --------------------------------------------------------------------------- the model uses the image

COLORS = ("red", "blue", "green", "yellow", "orange", "purple")  # distinct first letters
SIZES = {"small": 3, "large": 7}  # shape radius in pixels
START, MARK, EOS, PAD = 1, 2, 0, 3


def _caption_batch(rng: random.Random, n: int, blank: bool):
    """n samples ``<start> <img>*4 <mark> "<size> <colour>" <eos>`` (characters as ids), loss on the
    caption; the shape (circle, square or triangle) varies too but is not named."""
    seqs, images = [], []
    for _ in range(n):
        color, size, shape = rng.choice(COLORS), rng.choice(tuple(SIZES)), rng.choice(("circle", "square", "triangle"))
        image = Image.new("RGB", (16, 16), (128, 128, 128))
        draw_shape(ImageDraw.Draw(image), shape, 8 + rng.uniform(-1, 1), 8 + rng.uniform(-1, 1), SIZES[size],
                   PALETTE[color])
        pixels = torch.from_numpy(np.asarray(image).copy())
        images.append(torch.zeros_like(pixels) if blank else pixels)
        seqs.append([START] + [PAD] * 4 + [MARK] + [ord(c) for c in f"{size} {color}"] + [EOS])
    length = max(map(len, seqs))
    ids = torch.full((n, length), PAD)
    labels = torch.full((n, length), IGNORE_INDEX)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, 5 : len(seq) - 1] = torch.tensor(seq[6:])  # <mark> predicts the first character
    spans = torch.tensor([[i, 1, 4] for i in range(n)])
    return dict(input_ids=ids, labels=labels, images=images, image_spans=spans)


def _caption_loss(blank: bool, steps: int = 300) -> float:
    """Held-out caption loss after ``steps`` AdamW steps of 16 samples (one thread: tiny matmuls run
    several times faster without OpenMP hand-offs on a busy CPU)."""
    cfg = tiny_cfg("model.video.enabled=false", "model.fusion.layers=[0,1]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = XoronMultimodalModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        rng = random.Random(0)
        for _ in range(steps):
            opt.zero_grad()
            model(**_caption_batch(rng, 16, blank)).loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model(**_caption_batch(random.Random(99), 96, blank)).loss.item()
    finally:
        torch.set_num_threads(threads)


def test_captioning_loss_falls_well_below_the_blank_image_baseline():
    """Same captions and steps; only the pixels differ. Without them the size and colour words
    (12 equally likely pairs) cannot be predicted: the image-conditioned loss must go far lower."""
    with_images, blanked = _caption_loss(blank=False), _caption_loss(blank=True)
    assert with_images < 0.5 * blanked, (with_images, blanked)


# --------------------------------------------------------------------------- TP=2 parity


def _tp_body(full_state):
    from tests.parallel.test_tensor_parallel import load_sharded
    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = tiny_cfg("parallel.tp=2")
    state.initialize(cfg)
    torch.manual_seed(0)
    model = parallelize(XoronMultimodalModel(cfg), cfg).model
    load_sharded(model, full_state)
    out = model(**packed_batch())
    out.loss.backward()
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}
    return out.loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, meta


@pytest.mark.multirank
def test_tensor_parallel_multimodal_step_equals_single_rank():
    """Every tower, projector and fusion layer split over TP=2 gives the single-rank loss and gradients."""
    from xoron_dist.parallel.tensor import tp_slice

    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg())
    with torch.no_grad():
        for layer in model.fusion.layers:
            layer.attn_gate.fill_(0.5)
            layer.ffn_gate.fill_(0.5)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(**packed_batch())
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    for rank, (loss, grads, meta) in enumerate(run_ranks(_tp_body, 2, full_state)):
        assert loss == pytest.approx(out.loss.item(), rel=1e-5), rank
        assert any(meta[n][0] for n in grads if n.startswith("video.")) and any(meta[n][0] for n in grads
                                                                            if n.startswith("fusion."))
        for name, grad in grads.items():
            split, dim, stride = meta[name]
            ref = ref_grads[name]
            if split:
                rows = grad.shape[dim] * 2
                if ref.shape[dim] < rows:  # vocabulary rows padded for TP
                    pad = list(ref.shape)
                    pad[dim] = rows - ref.shape[dim]
                    ref = torch.cat([ref, torch.zeros(pad)], dim=dim)
                ref = tp_slice(ref, dim, stride, rank, 2)
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} grad of {name}")
