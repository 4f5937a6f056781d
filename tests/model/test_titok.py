"""TiTok: encode/decode shapes at 256 tokens, quantiser behaviour, reconstruction loss falls on synth images."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from xoron_dist.config import VisionConfig
from xoron_dist.model.vision.decoder import unpatchify
from xoron_dist.model.vision.titok import TiTok
from xoron_dist.model.vision.tower import patchify
from xoron_dist.synth.scenes import render_scene, sample_scene
from xoron_dist.train.codebooks import CodebookKeeper

# init_std 0.1 ~ 1/sqrt(width) at width 48: the full model's 0.02 is 1/sqrt(2500) and leaves a tiny ViT's
# attention uniform for many steps (it then plateaus at the mean image).
TINY = VisionConfig(titok_image_size=32, titok_patch_size=4, titok_hidden_size=48, titok_layers=2, titok_heads=4,
                    titok_intermediate_size=96, titok_tokens=16, titok_codebook_size=64, titok_code_dim=8,
                    init_std=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _scenes(n: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [torch.from_numpy(np.array(render_scene(sample_scene(rng, size, size)))) for _ in range(n)]


@pytest.mark.parametrize("dual_stream", [False, True])
def test_encode_decode_shapes_256_tokens(dual_stream) -> None:
    cfg = VisionConfig(**{**TINY.__dict__, "titok_tokens": 256, "dual_stream": dual_stream, "latent_tokens": 0})
    torch.manual_seed(0)
    model = TiTok(cfg)
    images = _scenes(2, size=40)  # resized to 32x32
    ids = model.encode(images)
    assert ids.shape == (2, 256) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < cfg.titok_codebook_size
    decoded = model.decode(ids)
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == torch.uint8
    out = model(images)
    assert out.ids.shape == (2, 256) and out.reconstruction.shape == (2, 3, 32, 32)
    assert torch.equal(out.ids, ids)
    assert all(torch.isfinite(x) for x in (out.loss, out.codebook_loss, out.commitment_loss))
    out.loss.backward()
    # Straight-through: the reconstruction loss reaches the encoder; the codebook loss the codebook.
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ids"):
        model.decode(ids[:, :10])


def test_unpatchify_inverts_patchify() -> None:
    image = torch.randn(3, 12, 20)
    patches, (rows, cols) = patchify(image, 4)
    assert torch.equal(unpatchify(patches[None], rows, cols, 4)[0], image)


def test_quantiser_picks_the_nearest_code() -> None:
    torch.manual_seed(0)
    model = TiTok(TINY)
    codes = torch.nn.functional.normalize(model.quantizer.codebook.weight, dim=-1)
    latents = torch.nn.functional.normalize(codes[[3, 17, 40]] + 0.01 * torch.randn(3, TINY.titok_code_dim), dim=-1)
    ids, picked = model.quantize(latents[None])
    assert ids.tolist() == [[3, 17, 40]]
    torch.testing.assert_close(picked[0], codes[[3, 17, 40]])


def test_reconstruction_loss_falls_on_synth_images() -> None:
    """The ids carry each image: after 40 steps the loss is well below both its start (the grey image)
    and the best any image-independent decoder can do (the mean image of the set)."""
    torch.manual_seed(0)
    model = TiTok(TINY)
    images = _scenes(16)
    target = model.pixels(images)
    mean_image_loss = float((target - target.mean(0)).square().mean())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(images)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.reconstruction_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert losses[-1] < 0.6 * mean_image_loss, (losses[-1], mean_image_loss)
    assert len(out.ids.unique()) > 2  # the codebook did not collapse to one or two codes


def test_dead_code_restarts_keep_more_of_the_codebook_in_use() -> None:
    """With restarts off the codebook shrinks to the few codes that won early (9 of 64 after 80 steps);
    with them, codes whose usage share fell below 3% of uniform are re-seeded from the batch's
    latents, and more than twice as many codes carry the images."""
    images = _scenes(16)
    used = {}
    for share in (0.0, 0.03):
        torch.manual_seed(0)
        model = TiTok(dataclasses.replace(TINY, titok_dead_code_share=share))
        keeper = CodebookKeeper(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(80):
            out = model(images)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            keeper.update()
        used[share] = len(out.ids.unique())
    assert used[0.03] >= 2 * used[0.0], used


def _restart_body(steps: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same weights everywhere
    model = TiTok(TINY)
    keeper = CodebookKeeper(model)
    images = _scenes(8, seed=dist.get_rank())  # different images per rank
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        torch.manual_seed(100 + dist.get_rank())  # the ranks' own random choices must not matter
        out = model(images)
        opt.zero_grad()
        out.loss.backward()
        for p in model.parameters():  # data-parallel gradient average
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
        keeper.update(dist.group.WORLD)
    dist.destroy_process_group()
    q = model.quantizer
    return q.codebook.weight.detach().clone(), q.code_usage.clone(), q.restarts


@pytest.mark.multirank
def test_dead_code_restarts_keep_data_parallel_codebooks_identical() -> None:
    """2 ranks on different images: usage summed over the ranks, rank 0's latents re-seed the dead
    codes, so after 50 steps (restarts begin after ~33) both ranks hold the same codebook bit for bit."""
    from tests.parallel.harness import run_ranks

    (book0, usage0, restarted), (book1, usage1, _) = run_ranks(_restart_body, 2, 50)
    assert restarted > 0
    assert torch.equal(book0, book1) and torch.equal(usage0, usage1)


def test_usage_and_dead_codes_are_made_on_the_device_and_a_skipped_step_moves_nothing() -> None:
    """The keeper's two halves, as the trainer's step calls them around its one read: ``usage`` reads
    nothing; with the step's ``applied`` flag at 0 (a skipped step) no average moves and no code is dead;
    at 1 the dead codes are ``apply_usage``'s, and ``restart`` re-seeds exactly those."""
    from xoron_dist.model.common.quantize import CosineQuantizer
    from xoron_dist.utils.host_syncs import HostSyncCounter

    torch.manual_seed(0)
    quantizer = CosineQuantizer(16, 4, dead_code_share=0.9, usage_decay=0.5)
    twin = CosineQuantizer(16, 4, dead_code_share=0.9, usage_decay=0.5)
    twin.load_state_dict(quantizer.state_dict())
    latents = torch.nn.functional.normalize(quantizer.codebook.weight[:3].detach() + 0.01, dim=-1)  # codes 0-2
    keeper = CodebookKeeper(quantizer)
    quantizer(latents), twin(latents)
    before = quantizer.code_usage.clone()
    with HostSyncCounter() as syncs:
        [dead] = keeper.usage(None, torch.tensor(0.0))
    assert syncs.total == 0, syncs.calls
    assert not dead.any() and torch.equal(quantizer.code_usage, before)
    with HostSyncCounter() as syncs:
        [dead] = keeper.usage(None, torch.tensor(1.0))
    assert syncs.total == 0, syncs.calls
    rows = dead.nonzero().flatten().tolist()
    assert rows == list(range(3, 16))  # the codes nobody picked fell below 0.9 of the uniform share
    torch.manual_seed(1)
    assert keeper.restart([rows]) == 13 == quantizer.restarts and quantizer.pending is None
    torch.manual_seed(1)
    assert twin.apply_usage(twin.counts(), twin.pick_latents) == 13  # the one-read path: the same restart
    assert torch.equal(quantizer.codebook.weight, twin.codebook.weight)
    assert torch.equal(quantizer.code_usage, twin.code_usage)
