"""``from_pretrained(dir)``: an HF export (``export/hf.py``) back into our modules, whole.

The LLM's shards are read under HF names and mapped back (``from_hf_state_dict``); a multimodal
export adds ``xoron_multimodal.safetensors`` under its own names; ``xoron_config.yaml`` says what to
build (BigVGAN's source and harmonic branch sized by their tensors, ``vocoder.saved_vocoder_sizes``: exports
written before those became defaults do not name them). Loading is strict: a tensor missing or left over is an
error.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from xoron_dist.config import load_config
from xoron_dist.export.hf import INDEX_FILE, MULTIMODAL_FILE, XORON_CONFIG, ExportError
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.hf import from_hf_state_dict
from xoron_dist.model.speech.vocoder import saved_vocoder_sizes
from xoron_dist.model.xoron import XoronMultimodalModel


def from_pretrained(path: str | Path) -> XoronLLM | XoronMultimodalModel:
    """The model an export at ``path`` holds (eval mode): ``XoronMultimodalModel`` when the export has
    multimodal parts, else ``XoronLLM``."""
    path = Path(path)
    for name in (INDEX_FILE, XORON_CONFIG):
        if not (path / name).is_file():
            raise ExportError(f"{path} is not a xoron export: {name} is missing (write one with xoron export)")
    cfg = load_config(path / XORON_CONFIG)
    index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    hf = {}
    for shard in sorted(set(index["weight_map"].values())):
        hf.update(load_file(path / shard))
    state = from_hf_state_dict(hf)
    if cfg.llm.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model: nn.Module
    if (path / MULTIMODAL_FILE).is_file():
        extra = load_file(path / MULTIMODAL_FILE)
        # BigVGAN options sized as its tensors have them: an export written before an option's default changed
        # does not name it in its config
        for option, size in saved_vocoder_sizes(extra).items():
            setattr(cfg.model.speech.vocoder, option, size)
        model = XoronMultimodalModel(cfg)
        state = {f"llm.{name}": t for name, t in state.items()} | extra
    else:
        model = XoronLLM(cfg.llm)
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["from_pretrained"]
