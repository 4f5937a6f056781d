"""Checkpoints written before the model restructuring (config package, plain model + ``parallelize``)
resume after it: the config hash they recorded is recognised, and the vision tower's renamed weights
load. (Checked once by hand as well: the smoke run's step-120 checkpoint written by the old code,
resumed by the new code to step 130, gave the old code's losses and grad norms bit for bit.)"""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config import load_config
from xoron_dist.model.vision import VisionTower
from xoron_dist.model.xoron import build_model
from xoron_dist.train.checkpoint import _rename_legacy_keys, config_hash, hash_matches, model_mismatch_hint

# The smoke config had the tiny preset's 64 special-token slots until the seed's chat and capability
# tokens needed 256: its earlier checkpoints hold the 64-slot model.
SMOKE_THEN = "model.llm.special_token_slots=64"

# config_hash of these configs as the code before the restructuring computed it (recorded from it)
OLD_HASHES = [
    # the smoke run before audio
    ("pipelines/smoke.yaml", [SMOKE_THEN, "model.audio.enabled=false", "model.speech.enabled=false",
                              "model.image_gen.enabled=false", "model.video_gen.enabled=false"], "33243ef576af1a6e"),
    (None, ["preset=tiny", "parallel.tp=2"], "ad476292ef6ba7a3"),
    (None, ["preset=tiny", "model.llm.moe.num_experts=4", "parallel.ep=2"], "9e9dcec0d934c213"),
]


@pytest.mark.parametrize("path, overrides, old", OLD_HASHES, ids=["smoke", "tiny-tp2", "tiny-ep2"])
def test_hashes_of_earlier_checkpoints_still_match(path, overrides, old):
    cfg = load_config(path, overrides)
    assert config_hash(cfg) != old  # the config tree changed shape ...
    assert hash_matches(old, cfg) and hash_matches(config_hash(cfg), cfg)  # ... both are accepted


# config_hash as the code with the speech generator and before the image/video generators computed it
# Their BigVGAN read no voice vector and had no pitch source nor harmonic branch: they resume with the
# conditioning, the source and the branch off, and only then.
UNCONDITIONED = "model.speech.vocoder.speaker_conditioned=false"
NO_SOURCE = "model.speech.vocoder.source_harmonics=0"
NO_ENVELOPE = "model.speech.vocoder.envelope_harmonics=0"
V2_HASHES = [("pipelines/smoke.yaml", [SMOKE_THEN, UNCONDITIONED, NO_SOURCE, NO_ENVELOPE], "ba9915ba2d63697a"),
             (None, ["preset=tiny", "parallel.tp=2"], "383413a7ac7695dd")]


@pytest.mark.parametrize("path, overrides, old", V2_HASHES, ids=["smoke", "tiny-tp2"])
def test_checkpoints_from_before_the_image_and_video_generators_resume(path, overrides, old):
    off = ["model.image_gen.enabled=false", "model.video_gen.enabled=false"]
    assert hash_matches(old, load_config(path, [*overrides, *off]))
    if path:  # today's smoke run trains the generators: a model those checkpoints do not hold
        assert not hash_matches(old, load_config(path, overrides))
        conditioned = [o for o in overrides if o != UNCONDITIONED]  # a vocoder those checkpoints do not hold
        assert not hash_matches(old, load_config(path, [*conditioned, *off]))
        pitched = [o for o in overrides if o != NO_SOURCE]  # BigVGAN with the pitch source
        assert not hash_matches(old, load_config(path, [*pitched, *off]))
        branched = [o for o in overrides if o not in (NO_SOURCE, NO_ENVELOPE)]  # today's default: and the branch
        assert not hash_matches(old, load_config(path, [*branched, *off]))
        coded = [*branched, *off, "model.speech.vocoder.pitch_levels=64"]  # a pitch code: frames 2 channels wider
        assert config_hash(load_config(path, coded)) != config_hash(load_config(path, [*branched, *off]))


def test_a_different_model_is_still_refused():
    assert not hash_matches(OLD_HASHES[0][2], load_config("pipelines/smoke.yaml"))  # the smoke run with audio
    path, overrides, old = OLD_HASHES[1]
    assert not hash_matches(old, load_config(path, [*overrides, "model.llm.hidden_size=128"]))
    # a field added since, set away from the value the old checkpoints were built with
    assert not hash_matches(old, load_config(path, [*overrides, "model.llm.moe_layer_freq=2"]))


def test_the_vision_towers_old_weight_names_load():
    """The tower's projections were ``<proj>.layer.weight`` (a bias wrapper around the layer); they are
    plain ``<proj>.weight`` now. The load hook renames them, so the old state equals the new."""
    cfg = load_config("pipelines/smoke.yaml").model.vision
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    state = tower.state_dict()
    old = {k.replace("_proj.weight", "_proj.layer.weight").replace(".fc1.weight", ".fc1.layer.weight")
           .replace(".fc2.weight", ".fc2.layer.weight"): v for k, v in state.items()}
    assert sum(".layer.weight" in k for k in old) == 6 * cfg.num_layers
    fresh = VisionTower(cfg)
    hook = fresh.register_load_state_dict_pre_hook(_rename_legacy_keys)
    fresh.load_state_dict(old)
    hook.remove()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("older, newer", [
    ("model.speech.vocoder.speaker_conditioned=false model.speech.vocoder.speaker_weight=0", ""),
    ("model.speech.vocoder.source_harmonics=0 model.speech.vocoder.envelope_harmonics=0", ""),
    ("model.speech.vocoder.envelope_harmonics=0", ""),
    ("model.speech.vocoder.speaker_conditioned=false model.speech.vocoder.speaker_weight=0 "
     "model.speech.vocoder.source_harmonics=0 model.speech.vocoder.envelope_harmonics=0", ""),  # all: one hint
])
def test_loading_a_vocoder_without_an_option_names_the_fix(older, newer):
    """The error load_state_dict raises for a checkpoint saved without an option's parameters (an unconditioned
    BigVGAN, one without the pitch source or the harmonic branch; taken from a real load) maps to the overrides
    that build the old model; other errors get no hint."""
    old = build_model(load_config("pipelines/smoke.yaml", older.split()))
    new = build_model(load_config("pipelines/smoke.yaml", newer.split()))
    with pytest.raises(RuntimeError) as caught:
        new.load_state_dict(old.state_dict())
    hint = model_mismatch_hint(str(caught.value))
    assert hint and older in hint
    assert model_mismatch_hint("Missing key(s) in state_dict: \"llm.layers.0.attn.q_proj.weight\"") is None
    assert model_mismatch_hint("unexpected EOF") is None
