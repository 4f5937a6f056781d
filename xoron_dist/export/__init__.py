"""Trained weights out of the trainer: consolidation of any checkpoint layout, and the HF export.

    consolidate(checkpoint)  -> ConsolidatedCheckpoint   full single-rank weights (train/consolidation.py:
                                                         the checkpoint format's reader, shared with --reshard)
    export_hf(ckpt, out)                                 DeepseekV3ForCausalLM directory + the rest (hf.py)
    from_pretrained(out)     -> XoronLLM | XoronMultimodalModel   an export back into our modules
"""

import importlib

# Imported on first use: ``xoron export --help`` (and every other ``xoron`` verb, which imports this
# package's cli) must not load torch and DeepSpeed first.
_HOMES = {"ConsolidatedCheckpoint": "xoron_dist.train.consolidation",
          "ConsolidationError": "xoron_dist.train.consolidation", "consolidate": "xoron_dist.train.consolidation",
          "ExportError": "xoron_dist.export.hf", "export_hf": "xoron_dist.export.hf",
          "from_pretrained": "xoron_dist.export.pretrained"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'xoron_dist.export' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOMES[name]), name)


__all__ = ["ConsolidatedCheckpoint", "ConsolidationError", "ExportError", "consolidate", "export_hf",
           "from_pretrained"]
