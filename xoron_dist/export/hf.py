"""Export to the HuggingFace layout: the LLM as transformers' ``DeepseekV3ForCausalLM``, the rest beside it.

    <out>/config.json                          DeepseekV3Config (``model.llm.hf.hf_config_kwargs``)
    <out>/model-0000i-of-0000n.safetensors     the LLM's weights under HF names (``to_hf_state_dict``)
    <out>/model.safetensors.index.json         name -> shard, total size
    <out>/generation_config.json               eos / pad ids
    <out>/tokenizer.json, tokenizer_config.json, xoron_tokenizer.json     the run's tokenizer
    <out>/xoron_config.yaml                    the run's config: what ``export.pretrained.from_pretrained`` rebuilds
    <out>/xoron_multimodal.safetensors         multimodal runs: every tensor not under ``llm.`` (our names)
    <out>/README.md                            the model card (``export/model_card.py``)

``transformers`` is not needed to write an export (the config is plain JSON), only to load one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from xoron_dist.export.model_card import model_card
from xoron_dist.model.llm.hf import hf_config_kwargs, to_hf_state_dict
from xoron_dist.train.consolidation import ConsolidatedCheckpoint

INDEX_FILE = "model.safetensors.index.json"
MULTIMODAL_FILE = "xoron_multimodal.safetensors"
XORON_CONFIG = "xoron_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "xoron_tokenizer.json")
# Every file an export writes (shards match ``model-*.safetensors``): what ``--force`` replaces.
EXPORT_FILES = ("config.json", INDEX_FILE, "generation_config.json", "tokenizer_config.json", XORON_CONFIG,
                MULTIMODAL_FILE, "README.md", *TOKENIZER_FILES)
DEFAULT_SHARD_BYTES = 2 << 30


class ExportError(ValueError):
    """The export cannot be written; the message names the path and the fix."""


def prepare_out_dir(out: Path, force: bool) -> None:
    """Create ``out``; one that already holds an export is refused unless ``force`` (then its export
    files, and only those, are removed first)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    previous = [p for p in out.glob("*") if p.name in EXPORT_FILES or _is_shard(p.name)] if out.is_dir() else []
    if any(p.name in (INDEX_FILE, XORON_CONFIG) for p in previous) and not force:
        raise ExportError(f"{out} already holds an export; pass --force to replace it, or choose another --out")
    for path in previous:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _is_shard(name: str) -> bool:
    return name.startswith("model-") and name.endswith(".safetensors")


def llm_state(ckpt: ConsolidatedCheckpoint) -> dict[str, torch.Tensor]:
    """The LLM's tensors under ``XoronLLM`` names."""
    if not ckpt.multimodal:
        return ckpt.state
    return {name[len("llm."):]: t for name, t in ckpt.state.items() if name.startswith("llm.")}


def hf_config(ckpt: ConsolidatedCheckpoint, ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` of ``DeepseekV3ForCausalLM`` (raises ``ExportError`` for an LLM it cannot express)."""
    try:
        kwargs = hf_config_kwargs(ckpt.cfg.llm)
    except ValueError as err:
        raise ExportError(f"format hf: {err}") from None
    dtype = str(next(iter(ckpt.state.values())).dtype).removeprefix("torch.")
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **kwargs,
            "torch_dtype": dtype, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
            "pad_token_id": ids.get("pad")}


def write_shards(out: Path, state: dict[str, torch.Tensor], max_bytes: int) -> dict[str, str]:
    """``state`` in safetensors shards of at most ``max_bytes`` (a larger tensor gets its own), plus
    the index transformers reads; returns name -> shard file."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: state[name].contiguous() for name in names}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def tokenizer_ids(tokenizer_dir: Path | None) -> dict[str, int]:
    """bos / eos / pad ids of the run's tokenizer (``xoron_tokenizer.json``); empty without one."""
    meta = tokenizer_dir / "xoron_tokenizer.json" if tokenizer_dir else None
    if meta is None or not meta.is_file():
        return {}
    special = json.loads(meta.read_text(encoding="utf-8"))["special_tokens"]
    return {"bos": special["endoftext"], "eos": special["endoftext"], "pad": special["pad"]}


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The run's tokenizer files, and the ``tokenizer_config.json`` that lets ``AutoTokenizer`` load them."""
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
    })


def export_hf(ckpt: ConsolidatedCheckpoint, out: str | Path, *, force: bool = False,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``ckpt`` as an HF directory at ``out`` (see the module docstring); returns ``out``.
    ``tokenizer_dir``: default the run's ``tokenizer/`` (none: no tokenizer files)."""
    out = Path(out)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (ckpt.run_dir / "tokenizer" if ckpt.run_dir else None)
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_dir} holds no tokenizer.json: give the run's tokenizer directory")
    ids = tokenizer_ids(tokenizer_dir)
    config = hf_config(ckpt, ids)
    prepare_out_dir(out, force)
    llm = to_hf_state_dict(llm_state(ckpt))
    if ckpt.cfg.llm.tie_word_embeddings:
        llm.pop("lm_head.weight")  # transformers ties it to the embedding (safetensors refuses shared storage)
    write_shards(out, llm, max_shard_bytes)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
        "do_sample": False})
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    if ckpt.multimodal:
        rest = {name: t.contiguous() for name, t in ckpt.state.items() if not name.startswith("llm.")}
        save_file(rest, out / MULTIMODAL_FILE, metadata={"format": "pt"})
    (out / XORON_CONFIG).write_text(ckpt.cfg.to_yaml(), encoding="utf-8")
    (out / "README.md").write_text(model_card(ckpt), encoding="utf-8")
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


__all__ = ["EXPORT_FILES", "ExportError", "INDEX_FILE", "MULTIMODAL_FILE", "XORON_CONFIG", "export_hf",
           "prepare_out_dir", "write_shards"]
