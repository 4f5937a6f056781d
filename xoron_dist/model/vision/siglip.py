"""Import an HF SigLIP (or SigLIP-2) vision checkpoint into Xoron's ``VisionTower``.

``load_siglip_vision(dir | HF module | state dict)`` builds the single-rank tower with the
checkpoint's sizes and weights (tensor parallelism then slices it like any other weight). HF's
names map one to one onto ours (``_hf_key_to_ours``); SigLIP's attention-pool head is not used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xoron_dist.config import VisionConfig
from xoron_dist.model.vision.tower import VisionTower

log = logging.getLogger(__name__)


class SiglipImportError(ValueError):
    """An HF SigLIP checkpoint that does not map onto the tower: lists missing/unexpected keys."""


_IGNORED_PREFIXES = ("head.",)  # SigLIP's attention-pool head: the tower returns patch features


def vision_config_from_hf(hf_config: Any, base: VisionConfig | None = None) -> VisionConfig:
    """``base`` with the sizes of an HF ``SiglipVisionConfig`` (object or dict; a full SigLIP config's
    ``vision_config`` is used). Position/resize/latent choices stay ``base``'s."""
    data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    data = data.get("vision_config", data) or data
    act = data.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_fast", "gelu_new"):
        raise SiglipImportError(f"hidden_act = {act!r}: the tower uses GELU-tanh (gelu_pytorch_tanh)")
    if data.get("num_channels", 3) != 3:
        raise SiglipImportError(f"num_channels = {data['num_channels']}: the tower reads RGB images (3)")
    return replace(base or VisionConfig(), hidden_size=data["hidden_size"], num_layers=data["num_hidden_layers"],
                   num_heads=data["num_attention_heads"], intermediate_size=data["intermediate_size"],
                   image_size=data["image_size"], patch_size=data["patch_size"],
                   layer_norm_eps=data.get("layer_norm_eps", 1e-6))


def _hf_key_to_ours(key: str) -> str | None:
    """Our parameter name for an HF ``SiglipVisionModel`` key (None: not ours)."""
    if key.startswith("embeddings.patch_embedding."):
        return "patch_embed." + key.rsplit(".", 1)[1]
    if key == "embeddings.position_embedding.weight":
        return "position_embedding"
    if key.startswith("post_layernorm."):
        return "encoder." + key
    if key.startswith("encoder.layers."):
        _, _, index, rest = key.split(".", 3)
        return f"encoder.layers.{index}.patch.{rest}"
    return None


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SiglipImportError(f"{path}: no config.json (expected an HF SiglipVisionModel/SiglipModel directory)")
    config = json.loads(config_file.read_text())
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state, config
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise SiglipImportError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for shard in bins:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state, config


def load_siglip_vision(source: str | Path | nn.Module | dict[str, torch.Tensor],
                       cfg: VisionConfig | None = None) -> VisionTower:
    """A ``VisionTower`` holding an HF SigLIP vision checkpoint.

    ``source``: a local directory (config.json + safetensors or .bin; a full ``SiglipModel``
    works too, its text tower is skipped), an in-memory HF ``SiglipVisionModel``/``SiglipModel``,
    or a state dict (then ``cfg`` must carry the sizes). Sizes come from the checkpoint; the
    position, resize, latent and compressor choices from ``cfg``. Latent-stream, dual-stream,
    compressor and reconstruction weights are new (kept at their initialisation). Raises
    ``SiglipImportError`` listing every missing/unexpected key.
    """
    if isinstance(source, (str, Path)):
        state, hf_config = _read_checkpoint(Path(source))
        cfg = vision_config_from_hf(hf_config, cfg)
    elif isinstance(source, nn.Module):
        state, cfg = source.state_dict(), vision_config_from_hf(source.config, cfg)
    else:
        if cfg is None:
            raise SiglipImportError("importing a bare state dict needs cfg (a VisionConfig with its sizes)")
        state = source
    tower = VisionTower(cfg)
    own = tower.state_dict()
    loaded, unexpected, ignored = {}, [], []
    for key, value in state.items():
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            continue  # the text half of a full SiglipModel
        key = key.removeprefix("vision_model.")
        if key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        ours = _hf_key_to_ours(key)
        if ours == "position_embedding" and not cfg.absolute_positions:
            ignored.append(key)
            continue
        if ours is None or ours not in own:
            unexpected.append(key)
            continue
        if ours == "patch_embed.weight":
            value = value.reshape(value.shape[0], -1)  # conv (hidden, 3, p, p) -> linear (hidden, 3*p*p)
        loaded[ours] = value
    new = {k for k in own if ".latent." in k or k.startswith(("latent_embedding", "encoder.latent_post_layernorm",
                                                               "dual_stream.", "compressor.", "reconstruction."))}
    missing = sorted(set(own) - set(loaded) - new)
    if missing or unexpected:
        raise SiglipImportError(f"HF SigLIP checkpoint does not match the tower ({cfg.num_layers} layers): "
                                f"missing {missing or 'none'}; unexpected {sorted(unexpected) or 'none'}")
    params = dict(tower.named_parameters())
    for key, value in loaded.items():
        param = params[key]
        if value.shape != param.shape:
            raise SiglipImportError(f"{key}: checkpoint shape {tuple(value.shape)} != tower {tuple(param.shape)}")
        own[key] = value.to(param.dtype)
    tower.load_state_dict(own)
    if ignored:
        log.info("SigLIP import: ignored %d keys not used by the tower (%s ...)", len(ignored), ignored[0])
    return tower
