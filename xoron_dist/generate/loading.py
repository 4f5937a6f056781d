"""The model and tokenizer ``xoron generate`` runs: from an export or from a trainer checkpoint.

    an export (``xoron export --format hf``: xoron_config.yaml + shards)  ─► ``from_pretrained``
    a checkpoint (a tag, its checkpoints folder or the run directory)     ─► ``consolidate`` (any layout)

Either way the plain single-process model comes back, in eval mode, with the tokenizer it was
trained with (the export's copy, or the run's ``tokenizer/``) and the run config (sizes and
generation defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xoron_dist.config import XoronConfig, load_config
from xoron_dist.tokenizer import XoronTokenizer


class LoadError(ValueError):
    """The path given to ``xoron generate`` holds no model it can run."""


@dataclass
class Loaded:
    model: nn.Module  # XoronLLM or XoronMultimodalModel, eval mode
    tokenizer: XoronTokenizer
    cfg: XoronConfig
    source: str  # what was loaded, for the log line


def is_export(path: Path) -> bool:
    from xoron_dist.export.hf import INDEX_FILE, XORON_CONFIG

    return (path / XORON_CONFIG).is_file() and (path / INDEX_FILE).is_file()


def load(path: str | Path, device: str | torch.device = "cpu", tokenizer_dir: str | Path | None = None) -> Loaded:
    """The model at ``path`` (an export directory, or a checkpoint of any layout) on ``device``."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--model {path} does not exist: give an export directory (xoron export) or a run's "
                        "checkpoint (runs/<name>, its checkpoints/ folder or a stepNNNNNNNN tag)")
    if is_export(path):
        from xoron_dist.export.hf import XORON_CONFIG
        from xoron_dist.export.pretrained import from_pretrained

        model, cfg = from_pretrained(path), load_config(path / XORON_CONFIG)
        default_tok, source = path, f"export {path}"
    else:
        from xoron_dist.train.consolidation import ConsolidationError, consolidate

        try:
            ckpt = consolidate(path)
        except ConsolidationError as err:
            raise LoadError(str(err)) from None
        model, cfg = ckpt.build_model(), ckpt.cfg
        default_tok = ckpt.run_dir / "tokenizer" if ckpt.run_dir else None
        source = f"step {ckpt.step} of {ckpt.checkpoint} ({ckpt.source})"
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tok
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise LoadError(f"no tokenizer.json in {tok_dir}: pass --tokenizer DIR (the run's tokenizer/ folder)")
    return Loaded(model.to(device).eval(), XoronTokenizer.load(tok_dir), cfg, source)


__all__ = ["LoadError", "Loaded", "is_export", "load"]
