"""TiTok's reconstruction as a training objective of the multimodal model (``objective_sums['reconstruction']``).

The tower sums each understood image's own reconstruction loss; the model adds the sum to its
``objective_sums`` (a blank image's times 0 when a micro-batch has none); the step weighs and averages
it (``xoron_dist.train.objectives``, ``tests/train/test_reconstruction_objective.py``). Tiny model:
``tests/model/test_xoron_multimodal``'s, video off, a 4-token compressor and an 8 px TiTok decoder.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.test_xoron_multimodal import packed_batch, tiny_cfg
from xoron_dist.model.xoron import XoronMultimodalModel
from xoron_dist.train.objectives import active_objectives

RECONSTRUCTION = ["model.video.enabled=false", "model.vision.compressor_tokens=4", "model.vision.compressor_layers=1",
                  "model.vision.reconstruction_weight=0.5", "model.vision.titok_image_size=8",
                  "model.vision.titok_patch_size=4", "model.vision.titok_hidden_size=16", "model.vision.titok_layers=1",
                  "model.vision.titok_heads=2", "model.vision.titok_intermediate_size=32",
                  "model.vision.titok_codebook_size=16", "model.vision.titok_code_dim=4"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def image_batch(seed: int = 0, images: bool = True) -> dict:
    """``packed_batch`` without its video (and, ``images=False``, without its images: text only)."""
    batch = packed_batch(seed)
    for medium in ("video",) if images else ("video", "image"):
        batch[f"{medium}s"], batch[f"{medium}_spans"] = [], torch.zeros((0, 3), dtype=torch.long)
    return batch


def _model(*extra: str) -> XoronMultimodalModel:
    torch.manual_seed(0)
    return XoronMultimodalModel(tiny_cfg(*RECONSTRUCTION, *extra)).train()


def test_reconstruction_objective_trains_the_decoder_and_the_compressor():
    """A few AdamW steps on the LM loss plus the weighted reconstruction halve the reconstruction loss;
    its gradient reaches TiTok's decoder, the compressor and the tower (straight-through VQ)."""
    model = _model()
    batch = image_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        opt.zero_grad()
        out = model(**batch)
        reconstruction = out.objective_sums["reconstruction"]
        (out.loss + 0.5 * reconstruction / len(batch["images"])).backward()
        if step == 0:
            for name in ("vision.reconstruction.pixel_out.weight", "vision.reconstruction.quant_proj.weight",
                         "vision.compressor.queries", "vision.patch_embed.weight"):
                assert model.get_parameter(name).grad.abs().sum() > 0, name
        opt.step()
        losses.append(reconstruction.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_sum_is_over_images_and_a_micro_batch_without_images_adds_zero():
    """Two images in one micro-batch add the same as each alone (a sum of per-image losses, whatever the
    batch); without images the blank image's loss enters times 0, the decoder in the graph with zero
    gradients (ZeRO-3 and the DP gradient reduction need every rank to reach the same parameters)."""
    model = _model()
    batch = image_batch()
    both = model(**batch).objective_sums["reconstruction"]
    alone = []
    for i in range(2):
        one = dict(batch, images=batch["images"][i : i + 1], image_spans=batch["image_spans"][i : i + 1])
        alone.append(model(**one).objective_sums["reconstruction"])
    torch.testing.assert_close(both, alone[0] + alone[1], rtol=1e-5, atol=1e-6)

    model.zero_grad(set_to_none=True)
    out = model(**image_batch(1, images=False))
    empty = out.objective_sums["reconstruction"]
    assert empty.item() == 0 and empty.requires_grad
    (out.loss + empty).backward()
    decoder = model.vision.reconstruction
    assert all(p.grad is not None and not p.grad.any() for p in decoder.parameters())


def test_weight_zero_is_todays_model_and_the_objective_leaves_the_lm_alone():
    """At weight 0 there is no decoder and no objective (today's model and objectives); at 0.5 the
    same weights give the same LM loss and logits, bit for bit, and only add the objective. In eval
    the decoder does not run."""
    on, off = _model(), _model("model.vision.reconstruction_weight=0")
    assert off.vision.reconstruction is None
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and all(k.startswith("vision.reconstruction.") for k in unexpected)
    batch = image_batch()
    got, expected = on(**batch), off(**batch)
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.logits, expected.logits)
    assert set(got.objective_sums) == {"reconstruction"} and not expected.objective_sums
    with torch.no_grad():
        assert not on.eval()(**batch).objective_sums

    def objectives(*extra: str) -> dict[str, float]:
        cfg = tiny_cfg(*RECONSTRUCTION, "data.source=arrow", "data.path=x", *extra)
        return {objective.name: weight for objective, weight in active_objectives(cfg)}

    assert objectives() == {"lm": 1.0, "reconstruction": 0.5}
    assert objectives("train.objectives={reconstruction: 0.2}")["reconstruction"] == 0.2
    assert objectives("model.vision.reconstruction_weight=0") == {"lm": 1.0}
