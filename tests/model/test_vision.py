"""Vision tower: HF SigLIP oracle, native-resolution padding, 2D-RoPE, the seed's path after the tower
(dual-stream layers, TiTok-style compressor, reconstruction loss), TP=2 parity."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from tests.parallel.harness import run_ranks
from xoron_dist.config import ConfigError, VisionConfig, load_config
from xoron_dist.model.vision import SiglipImportError, VisionTower, load_siglip_vision, prepare_images
from xoron_dist.model.vision.tower import patch_grid
from xoron_dist.parallel.tensor import tp_slice

# image_size 30 with patch 7: a 4x4 grid and a 2-pixel remainder SigLIP's conv drops (like 384/14).
HF_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                patch_size=7)
SIGLIP_MODE = VisionConfig(rope=False, absolute_positions=True)
TINY = VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=32, patch_size=4,
                    max_patches=24, rope_theta=100.0)
# The seed's path at toy size: 1 dual-stream layer, 5 compressed tokens, TiTok's decoder at 16 px.
TINY_TITOK = dict(titok_image_size=16, titok_patch_size=4, titok_hidden_size=16, titok_layers=1, titok_heads=2,
                  titok_intermediate_size=32, titok_codebook_size=16, titok_code_dim=4)
SEED_PATH = dict(dual_stream_layers=1, compressor_tokens=5, compressor_layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _hf_model() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**HF_SIZES)).eval()


def _images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen) for h, w in sizes]


@pytest.mark.parametrize("source", ["module", "directory"])
def test_siglip_oracle(source, tmp_path) -> None:
    hf = _hf_model()
    if source == "directory":
        hf.save_pretrained(tmp_path)  # config.json + model.safetensors, as a local checkpoint
        tower = load_siglip_vision(str(tmp_path), SIGLIP_MODE)
    else:
        tower = load_siglip_vision(hf, SIGLIP_MODE)
    tower.eval()
    assert (tower.cfg.hidden_size, tower.cfg.num_layers, tower.num_tokens) == (32, 2, 16)
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
        out = tower(pixels)
    assert out.features.shape == ref.shape and bool(out.mask.all())
    assert (out.features - ref).abs().max() <= 1e-4


def test_siglip_interpolated_positions_non_square() -> None:
    """A 21x35 image (3x5 patches): positions resized bicubically, as HF's interpolate_pos_encoding."""
    hf = _hf_model()
    tower = load_siglip_vision(hf, SIGLIP_MODE).eval()
    pixels = torch.randn(1, 3, 21, 35, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        out = tower(pixels)
    assert out.grids.tolist() == [[3, 5]]
    assert (out.features - ref).abs().max() <= 1e-4
    # The same checkpoint with 2D-RoPE on top, native-resolution uint8 images of two shapes.
    roped = load_siglip_vision(hf, replace(SIGLIP_MODE, rope=True, max_patches=20)).eval()
    images = _images((40, 90), (60, 30))
    with torch.no_grad():
        batched = roped(images)
        alone = roped(images[1:])
    assert torch.isfinite(batched.features).all()
    assert batched.grids.tolist() == [[3, 6], [6, 3]]
    torch.testing.assert_close(batched.per_image()[1], alone.per_image()[0], atol=1e-5, rtol=1e-5)


def test_siglip_import_errors() -> None:
    hf = _hf_model()
    state = hf.state_dict()
    cfg = replace(SIGLIP_MODE, **{k: v for k, v in dict(hidden_size=32, num_layers=2, num_heads=4,
                                                         intermediate_size=64, image_size=30, patch_size=7).items()})
    load_siglip_vision(state, cfg)  # the bare state dict with the right sizes loads
    broken = {k: v for k, v in state.items() if not k.startswith("encoder.layers.1.mlp.")}
    broken["encoder.layers.9.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(SiglipImportError) as err:
        load_siglip_vision(broken, cfg)
    message = str(err.value)
    assert "encoder.layers.1.patch.mlp.fc1.weight" in message
    assert "encoder.layers.9.self_attn.q_proj.weight" in message
    with pytest.raises(SiglipImportError, match="cfg"):
        load_siglip_vision(state)
    with pytest.raises(SiglipImportError, match="config.json"):
        load_siglip_vision("/nonexistent/siglip")


def test_native_resize_policy() -> None:
    assert patch_grid(384, 384, 14, 729) == (27, 27)
    rows, cols = patch_grid(100, 200, 4, 24)
    assert (rows, cols) == (3, 7)  # 21 of 24 patches, aspect 2.33 for 2
    assert patch_grid(10, 1000, 4, 24) == (1, 24)
    pixels = prepare_images(_images((40, 90)), TINY)
    assert pixels[0].shape == (3, 12, 28) and pixels[0].min() >= -1 and pixels[0].max() <= 1
    square = prepare_images(_images((40, 90)), replace(TINY, resize="square"))
    assert square[0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        prepare_images([torch.zeros(8, 8, 3)], TINY)


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="rope+abs"),
    pytest.param({"absolute_positions": False}, id="rope-only"),
    pytest.param({"latent_tokens": 3, "dual_stream": True}, id="dual-stream"),
    pytest.param({"latent_tokens": 3}, id="shared-latents"),
])
def test_padding_never_leaks(variant) -> None:
    """An image's features are the same batched alone or padded next to larger images."""
    torch.manual_seed(0)
    tower = VisionTower(replace(TINY, **variant)).eval()
    images = _images((16, 40), (48, 48), (8, 12))
    with torch.no_grad():
        batched = tower(images)
        alone = [tower([image]) for image in images]
    assert batched.mask.sum(1).tolist() == [int(r * c) for r, c in batched.grids.tolist()]
    assert batched.features[~batched.mask].abs().max() == 0  # padded rows zeroed
    for i, single in enumerate(alone):
        torch.testing.assert_close(batched.per_image()[i], single.per_image()[0], atol=1e-5, rtol=1e-5)
        if single.latents is not None:
            torch.testing.assert_close(batched.latents[i], single.latents[0], atol=1e-5, rtol=1e-5)
    # Garbage in the padding rows' pixels cannot matter either: only real patches exist as keys.
    assert batched.features.shape == (3, 24, 32)


def test_rope_makes_features_translation_equivariant() -> None:
    """With rope only (no absolute table), an image tiled from identical patches gives identical features
    for every patch whose neighbourhood offsets are the same: here all patches of a constant image."""
    torch.manual_seed(0)
    tower = VisionTower(replace(TINY, absolute_positions=False)).eval()
    constant = [torch.full((16, 24, 3), 77, dtype=torch.uint8)]
    with torch.no_grad():
        feats = tower(constant).per_image()[0]
    torch.testing.assert_close(feats, feats[:1].expand_as(feats), atol=1e-5, rtol=1e-5)
    with_table = VisionTower(TINY).eval()
    with torch.no_grad():
        feats = with_table(constant).per_image()[0]
    assert (feats - feats[:1]).abs().max() > 1e-3  # the absolute table breaks the symmetry


def test_activation_checkpointing_same_gradients() -> None:
    from xoron_dist.model.vision.blocks import VisionBlock
    from xoron_dist.parallel.checkpointing import apply_activation_checkpointing, is_checkpointed

    torch.manual_seed(0)
    tower = VisionTower(replace(TINY, latent_tokens=2, dual_stream=True))
    images = _images((16, 40), (32, 28))
    grads = []
    for on in (False, True):
        tower.zero_grad()
        if on:
            assert apply_activation_checkpointing(tower, (VisionBlock,)) == TINY.num_layers
        out = tower(images)
        (out.features.sum() + out.latents.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    assert all(is_checkpointed(block) for block in tower.encoder.layers)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# --------------------------------------------------------------------------- the seed's path after the tower


def test_seed_path_off_is_the_tower_alone() -> None:
    """All switches off: no new modules, the same weights from the same seed, and the output is the tower's
    blocks over the embedded patches, bit for bit (``compressor_layers`` alone changes nothing)."""
    images = _images((16, 40), (32, 28))
    torch.manual_seed(0)
    tower = VisionTower(replace(TINY, compressor_layers=3)).eval()
    torch.manual_seed(0)
    plain = VisionTower(TINY).eval()
    assert (tower.dual_stream, tower.compressor, tower.reconstruction) == (None, None, None)
    assert list(tower.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in tower.state_dict().items())
    with torch.no_grad():
        out = tower(images)
        tokens, coords, mask, grids = tower.embed(prepare_images(images, TINY))
        features, _ = tower.encoder(tokens, coords, mask)
    assert torch.equal(out.features, features * mask[..., None]) and torch.equal(out.mask, mask)
    assert out.aux_loss is None and torch.equal(out.grids, grids)


def test_seed_path_shapes_padding_and_gradients() -> None:
    """On: k tokens per image whatever its size, the same alone or padded next to a larger image, and
    the gradient reaches the tower, both dual streams and the compressor's queries."""
    torch.manual_seed(0)
    tower = VisionTower(replace(TINY, **SEED_PATH))
    images = _images((16, 40), (48, 48), (8, 12))
    out = tower(images)
    assert out.features.shape == (3, 5, 32) and bool(out.mask.all()) and out.aux_loss is None
    with torch.no_grad():
        alone = tower(images[2:]).features[0]
    torch.testing.assert_close(out.features[2], alone, atol=1e-5, rtol=1e-5)
    weights = torch.randn(out.features.shape, generator=torch.Generator().manual_seed(5))
    (out.features * weights).sum().backward()
    for name in ("patch_embed.weight", "encoder.layers.0.patch.self_attn.q_proj.weight",
                 "dual_stream.layers.0.patch.mlp.fc1.weight", "dual_stream.layers.0.latent.mlp.fc1.weight",
                 "compressor.queries", "compressor.encoder.layers.0.patch.self_attn.k_proj.weight"):
        assert tower.get_parameter(name).grad.abs().sum() > 0, name
    # The patch grid stays reachable (video frames): the tower's blocks alone, as the path-off tower gives them.
    plain = VisionTower(TINY).eval()
    missing, unexpected = tower.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("dual_stream.", "compressor.")) for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_patches(images).features, plain(images).features, rtol=0, atol=0)


def test_reconstruction_loss_is_the_unweighted_sum_over_the_images() -> None:
    """TiTok's reconstruction as an auxiliary loss: off at 0 (no decoder), the sum of each image's own
    loss whatever the weight (the training step weighs it: ``train/objectives.py``), and its gradient
    reaches the compressor and the tower through the straight-through VQ."""
    images = _images((16, 40), (32, 28))
    losses = {}
    for weight in (0.5, 2.0):
        torch.manual_seed(0)
        tower = VisionTower(replace(TINY, **SEED_PATH, **TINY_TITOK, reconstruction_weight=weight))
        losses[weight] = tower(images).aux_loss
    assert losses[0.5] > 0
    torch.testing.assert_close(losses[2.0], losses[0.5])
    torch.testing.assert_close(losses[2.0], tower(images[:1]).aux_loss + tower(images[1:]).aux_loss)
    losses[2.0].backward()
    assert tower.compressor.queries.grad.abs().sum() > 0 and tower.patch_embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert tower.eval()(images).aux_loss is None  # a training objective: inference skips the decoder
    with pytest.raises(ConfigError, match="compressor_tokens"):
        replace(TINY, reconstruction_weight=1.0).validate("model.vision")


def test_seed_path_fields_leave_existing_checkpoint_hashes_alone() -> None:
    """Off, the new fields are not hashed (the model config hashes as before they existed); on, they are."""
    from xoron_dist.train.checkpoint import _hashed_model, config_hash

    off = load_config(None, ["preset=tiny"])
    new_fields = {"dual_stream_layers", "compressor_tokens", "compressor_layers", "reconstruction_weight"}
    assert not new_fields & set(_hashed_model(off)["vision"])
    for change in ("dual_stream_layers=2", "compressor_tokens=8", "compressor_layers=3"):
        assert config_hash(load_config(None, ["preset=tiny", f"model.vision.{change}"])) != config_hash(off), change


def test_siglip_import_with_the_seed_path() -> None:
    """An HF checkpoint still loads with the new blocks on: the tower's weights are HF's, the rest new."""
    hf = _hf_model()
    tower = load_siglip_vision(hf, replace(SIGLIP_MODE, **SEED_PATH))
    pure = load_siglip_vision(hf, SIGLIP_MODE)
    for name, value in pure.state_dict().items():
        assert torch.equal(tower.state_dict()[name], value), name
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 30, 30)).features.shape == (1, 5, 32)


# --------------------------------------------------------------------------- TP=2

TP_VARIANTS = {"plain": {}, "dual": {"latent_tokens": 2, "dual_stream": True},
               "seed-path": {**SEED_PATH, **TINY_TITOK, "reconstruction_weight": 0.5}}


def _tp_step(tower: VisionTower, images, weights: torch.Tensor):
    out = tower(images)
    loss = (out.features * weights[:, : out.features.shape[1]]).sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    if out.latents is not None:
        # Random weights, not a sum of squares: that of a LayerNorm output is nearly constant (its
        # gradient would be pure rounding noise).
        loss = loss + (out.latents * weights[:, : out.latents.shape[1]]).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tower.named_parameters()}
    return out.features.detach(), grads


def _tensor_parallel(tower: VisionTower) -> VisionTower:
    """``tower`` split over TP=2 by the vision sharding plan (the groups are created here)."""
    from xoron_dist.model.vision.sharding import tensor_plan
    from xoron_dist.parallel import state
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    ctx = state.initialize(load_config(None, ["preset=tiny", "parallel.tp=2"]))
    apply_tensor_parallel(tower, tensor_plan(tower.cfg), ctx.rank, 2)
    return tower


def _tp_body(variant, full_state, images, weights):
    torch.manual_seed(0)
    tower = _tensor_parallel(VisionTower(replace(TINY, **TP_VARIANTS[variant])))
    rank = torch.distributed.get_rank()
    same_init = True
    for name, param in tower.named_parameters():
        full = full_state[name]
        if getattr(param, "tensor_model_parallel", False):
            full = tp_slice(full, param.partition_dim, param.partition_stride, rank, 2)
        same_init &= torch.equal(param.detach(), full)
    features, grads = _tp_step(tower, images, weights)
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in tower.named_parameters()}
    return {"features": features, "grads": grads, "meta": meta, "same_init": same_init}


@pytest.mark.multirank
@pytest.mark.parametrize("variant", sorted(TP_VARIANTS))
def test_tp2_equals_single_rank(variant) -> None:
    torch.manual_seed(0)
    single = VisionTower(replace(TINY, **TP_VARIANTS[variant]))
    full_state = {k: v.clone() for k, v in single.state_dict().items()}
    images = _images((16, 40), (32, 28))
    weights = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(3))
    ref_features, ref_grads = _tp_step(single, images, weights)
    for rank, out in enumerate(run_ranks(_tp_body, 2, variant, full_state, images, weights)):
        assert out["same_init"], rank  # the TP slices are drawn from the single-rank weights
        split_blocks = [n for n in out["meta"] if out["meta"][n][0] and n.endswith("q_proj.weight")]
        assert len(split_blocks) == len([n for n in ref_grads if n.endswith("q_proj.weight")])  # every block split
        torch.testing.assert_close(out["features"], ref_features, rtol=1e-5, atol=1e-5)
        assert set(out["grads"]) == set(ref_grads)
        for name, grad in out["grads"].items():
            split, dim, stride = out["meta"][name]
            ref = tp_slice(ref_grads[name], dim, stride, rank, 2) if split else ref_grads[name]
            # fp32 sums in another order: tolerance relative to the gradient's scale, floored at 1 for
            # gradients that are a cancellation of large terms (query biases under softmax)
            scale = max(float(ref.abs().max()), 1.0)
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank} grad of {name}: {m}")


def _tp_import_body(hf_state, pixels):
    cfg = replace(SIGLIP_MODE, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=30,
                  patch_size=7)
    tower = _tensor_parallel(load_siglip_vision(hf_state, cfg)).eval()
    with torch.no_grad():
        return tower(pixels).features


@pytest.mark.multirank
def test_siglip_import_into_tp2() -> None:
    """The importer slices q/k/v/fc1 (and their biases) by rows, out/fc2 by columns: TP=2 equals HF."""
    hf = _hf_model()
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
    for features in run_ranks(_tp_import_body, 2, hf.state_dict(), pixels):
        assert (features - ref).abs().max() <= 1e-4
