"""The image and video generators inside Xoron: objectives per micro-batch, gradients, generation API.

As for speech (``test_speech_head.py``): data parallelism needs each objective to be a sum of
per-item terms, so a batch split over ranks must give the same sums as the whole batch on one
rank, on the same weights and data.
"""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.xoron import build_model
from xoron_dist.parallel.layout import LayoutError, validate_layout

SMOKE = "pipelines/smoke.yaml"
GEN = ["model.image_gen.enabled=true", "model.video_gen.enabled=true"]
NAMES = ("image_vae", "text_to_image", "video_vae", "text_to_video")


def _cfg(*overrides):
    return load_config(SMOKE, [*GEN, *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg()).train()


def _media(seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8) for _ in range(4)]
    videos = [torch.randint(0, 256, (8, 32, 32, 3), generator=gen, dtype=torch.uint8) for _ in range(2)]
    return images, videos


def _rows(cfg, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (rows, 96), generator=gen)
    documents = torch.zeros(rows, 96, dtype=torch.long)
    documents[:, 48:] = 1
    return dict(input_ids=ids, labels=ids.clone(), document_ids=documents)


def test_objective_sums_split_like_data_parallel_ranks(model, one_thread):
    images, videos = _media(1)
    n = model.cfg.data.image_tokens
    # row r holds images 2r (understood) and 2r + 1 (a target), and video r (a target)
    image_spans = [[r, start, n] for r in range(2) for start in (2, 60)]
    video_spans = [[r, 30, model.cfg.data.video_tokens] for r in range(2)]
    image_targets, video_targets = [False, True, False, True], [True, True]
    whole = model(**_rows(model.cfg, 2), images=images, image_spans=torch.tensor(image_spans),
                  image_is_target=torch.tensor(image_targets), videos=videos, video_spans=torch.tensor(video_spans),
                  video_is_target=torch.tensor(video_targets)).objective_sums
    rows = _rows(model.cfg, 2)
    parts = []
    for r in range(2):
        mine = [i for i, span in enumerate(image_spans) if span[0] == r]
        out = model(**{k: v[r: r + 1] for k, v in rows.items()}, images=[images[i] for i in mine],
                    image_spans=torch.tensor([[0, *image_spans[i][1:]] for i in mine]),
                    image_is_target=torch.tensor([image_targets[i] for i in mine]), videos=[videos[r]],
                    video_spans=torch.tensor([[0, *video_spans[r][1:]]]), video_is_target=torch.tensor([True]))
        parts.append(out.objective_sums)
    for name in NAMES:
        assert torch.isfinite(whole[name]) and whole[name] > 0, name
        assert (parts[0][name] + parts[1][name]).item() == pytest.approx(whole[name].item(), rel=2e-5), name


def test_every_parameter_gets_a_gradient_with_and_without_media(model, one_thread):
    images, videos = _media(2)
    batch = _rows(model.cfg, 1)
    with_media = dict(batch, images=images[:1], image_spans=torch.tensor([[0, 60, model.cfg.data.image_tokens]]),
                      image_is_target=torch.tensor([True]), videos=videos[:1],
                      video_spans=torch.tensor([[0, 10, model.cfg.data.video_tokens]]),
                      video_is_target=torch.tensor([False]))
    for inputs in (with_media, batch):
        model.zero_grad()
        out = model(**inputs)
        (out.loss + sum(out.objective_sums.values())).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
    assert all(out.objective_sums[name].item() == 0 for name in NAMES)
    generator_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("image_gen.", "video_gen."))]
    assert all(g.abs().sum() == 0 for g in generator_grads)  # the blank paths add exact zeros


@pytest.mark.parametrize("height, width", [(256, 256), (512, 512), (64, 160)])
def test_generate_image_sizes_and_seeds(model, one_thread, height, width):
    model.eval()
    try:
        ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(3))
        first = model.generate_image(ids, height=height, width=width, steps=2, seed=7)
        again = model.generate_image(ids, height=height, width=width, steps=2, seed=7)
        assert first.shape == (2, height, width, 3) and first.dtype == torch.uint8
        assert torch.equal(first, again)
        assert not torch.equal(first, model.generate_image(ids, height=height, width=width, steps=2, seed=8))
    finally:
        model.train()


def test_generate_video_and_size_errors_are_one_line(model, one_thread):
    model.eval()
    try:
        states = torch.randn(1, 5, model.cfg.llm.hidden_size)
        video = model.generate_video(prompt_embeds=states, frames=9, height=32, width=48, steps=2, seed=1)
        assert video.shape == (1, 9, 32, 48, 3)
        assert torch.equal(video, model.generate_video(prompt_embeds=states, frames=9, height=32, width=48,
                                                       steps=2, seed=1))
        for call, message in ((lambda: model.generate_image(prompt_embeds=states, height=250, width=256),
                               "multiples of 16"),
                              (lambda: model.generate_video(prompt_embeds=states, frames=8, height=32, width=32),
                               "1 \\+ 4·k frames")):
            with pytest.raises(ValueError, match=message) as error:
                call()
            assert "\n" not in str(error.value)
    finally:
        model.train()


def test_generator_config_and_layout_errors_name_the_fix():
    with pytest.raises(ConfigError, match="must equal llm.hidden_size"):
        _cfg("model.image_gen.dit.cond_dim=32")
    with pytest.raises(ConfigError, match="latent space"):
        _cfg("model.video_gen.dit.latent_channels=8")
    with pytest.raises(ConfigError, match="without its PatchGAN"):
        _cfg("model.image_gen.vae.loss.discriminator=true")
    with pytest.raises(LayoutError, match="image_gen.dit.moe.num_experts = 4 is not divisible by parallel.ep = 8"):
        validate_layout(_cfg("parallel.ep=8", "model.llm.moe.num_experts=8"), 8)
    with pytest.raises(LayoutError, match="model.video_gen.dit.num_heads = 3"):
        validate_layout(_cfg("parallel.tp=2", "model.video_gen.dit.num_heads=3", "model.video_gen.dit.head_dim=8"), 2)
