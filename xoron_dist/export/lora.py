"""LoRA adapters out of a checkpoint: in PEFT's format beside the HF export, or merged into the base.

    <out>/lora/adapter_config.json        PEFT 0.21's LoraConfig for transformers' DeepseekV3ForCausalLM
    <out>/lora/adapter_model.safetensors  base_model.model.<HF module path>.lora_{A,B}.weight
    <out>/lora/xoron_lora_extra.safetensors   adapters PEFT cannot place on the HF model (the multimodal
                                          projectors'), under our names, with the scale in the metadata

``PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(out), out / "lora")`` gives our
model's logits. How each adapter is expressed (checked against peft 0.21.2 + transformers 5.24):

* attention projections: ``target_modules`` (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).
* dense and shared-expert SwiGLUs: ``target_parameters`` naming their weights (``mlp.gate_proj.weight``,
  ``mlp.shared_experts.gate_proj.weight``, ...). Not ``target_modules``: for deepseek_v3, PEFT rewrites
  the targets gate_proj/up_proj/down_proj into the fused routed experts (its transformers v4 -> v5
  conversion), and the dense layers would lose their adapters.
* routed experts: ``target_parameters`` ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` (PEFT's
  ``ParamWrapper``): A (experts·rank, in) holds expert e's rows at e·rank..; B (out, rank·experts) holds
  expert e's rank-k column at k·experts + e. Two parameters of one module nest: gate_up's wrapper is
  the inner one, so its keys sit under ``experts.base_layer``.

``target_parameters`` adapters have no dropout in PEFT, so the exported config says 0: dropout is a
training-time setting, and the adapter computes the same without it.

``merge_lora(state, cfg)`` folds every adapter into its base weight, W + scale · B @ A (per expert for
the stacked weights), and drops the adapter entries: the merged model is the plain model with no
adapters, and ``xoron export --merge-lora`` writes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from xoron_dist.config import XoronConfig
from xoron_dist.config.lora import LoRAConfig
from xoron_dist.model.llm.hf import to_hf_name
from xoron_dist.model.lora import adapter_base, is_adapter

ADAPTER_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXTRA_WEIGHTS = "xoron_lora_extra.safetensors"


class LoRAExportError(ValueError):
    """The adapters cannot be exported as asked; the message says what to change."""


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``state`` -> (base tensors, adapter tensors), both under the plain model's names."""
    base = {n: t for n, t in state.items() if not is_adapter(n)}
    return base, {n: t for n, t in state.items() if is_adapter(n)}


def _pairs(adapters: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """base weight name -> {"A": ..., "B": ...}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        base, factor = adapter_base(name)
        pairs.setdefault(base, {})[factor] = tensor
    return pairs


def merge_lora(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The base weights with every adapter of ``state`` folded in (W + scale · B @ A, in fp32, cast back to
    W's dtype); adapter entries dropped, order of the base entries kept."""
    base, adapters = split_adapters(state)
    merged = dict(base)
    for name, ab in _pairs(adapters).items():
        if name not in base:
            raise LoRAExportError(f"adapter of '{name}' found, but the state has no such base weight")
        weight = base[name]
        a, b = ab["A"].float(), ab["B"].float()
        delta = torch.bmm(b, a) if weight.ndim == 3 else b @ a
        merged[name] = (weight.float() + cfg.scale * delta).to(weight.dtype)
    return merged


def without_lora(cfg: XoronConfig) -> XoronConfig:
    """``cfg`` with ``model.lora`` off: the config of the base (or merged) model."""
    data = cfg.to_dict()
    data["model"]["lora"]["enabled"] = False
    return XoronConfig.from_dict(data)


def _peft_module(hf_param: str) -> str:
    """PEFT's key prefix of the adapter on HF parameter ``hf_param`` (the module path, or the
    parameter path for stacked experts)."""
    return f"base_model.model.{hf_param.removesuffix('.weight')}"


def peft_adapter(adapters: dict[str, torch.Tensor], cfg: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LLM's adapters (``XoronLLM`` names) as PEFT's (state dict, adapter_config) for
    ``DeepseekV3ForCausalLM`` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    modules, parameters = set(), set()
    pairs = _pairs(adapters)
    for name, ab in pairs.items():
        hf = to_hf_name(name)  # model.layers.<i>.self_attn.q_b_proj.weight / model.layers.<i>.mlp.experts.gate_up_proj
        a, b = ab["A"], ab["B"]
        if a.ndim == 3:  # routed experts
            experts, rank, _ = a.shape
            a = a.reshape(experts * rank, -1)
            b = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)
            container, _, param = hf.rpartition(".")
            twin = f"{container}.{'down_proj' if param == 'gate_up_proj' else 'gate_up_proj'}"
            nested = param == "gate_up_proj" and from_hf_pairs(twin, pairs)
            prefix = f"base_model.model.{container}" + (".base_layer" if nested else "")
            parameters.add(f"mlp.experts.{param}")
        elif ".self_attn." in hf:
            prefix = _peft_module(hf)
            modules.add(hf.removesuffix(".weight").rpartition(".")[2])
        else:  # dense / shared-expert SwiGLU: its weight as a parameter target
            prefix = _peft_module(hf)
            parameters.add("mlp." + hf.split(".mlp.", 1)[1])
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
        "lora_dropout": 0.0 if parameters else cfg.dropout,
        "target_modules": sorted(modules), "target_parameters": sorted(parameters) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
    }
    return tensors, config


def from_hf_pairs(hf_name: str, pairs: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether ``pairs`` (keyed by our base names) adapts the HF parameter ``hf_name``."""
    return any(to_hf_name(name) == hf_name for name in pairs)


def export_adapters(state: dict[str, torch.Tensor], cfg: XoronConfig, out: str | Path) -> Path:
    """Write the adapters of a consolidated ``state`` (plain model names) under ``out/lora`` (see the
    module docstring); returns that directory."""
    _, adapters = split_adapters(state)
    if not adapters:
        raise LoRAExportError("the checkpoint holds no LoRA adapters (model.lora.enabled is false in its run)")
    llm = {n.removeprefix("llm."): t for n, t in adapters.items() if n.startswith(("llm.", "layers."))}
    extra = {n: t.contiguous() for n, t in adapters.items() if not n.startswith(("llm.", "layers."))}
    tensors, config = peft_adapter(llm, cfg.model.lora)
    folder = Path(out) / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if extra:
        save_file(extra, folder / EXTRA_WEIGHTS, metadata={"format": "pt", "scale": str(cfg.model.lora.scale)})
    return folder


def base_and_adapters(ckpt, merge: bool):
    """A ``ConsolidatedCheckpoint`` of a LoRA run -> (the checkpoint to export as the HF model, the adapter
    state or None): with ``merge`` the adapters folded in, else the base alone beside its adapters.
    Both carry the config with ``model.lora`` off (the model they hold has no adapters)."""
    lora = ckpt.cfg.model.lora
    if not lora.enabled:
        if merge:
            raise LoRAExportError("--merge-lora: this checkpoint's run has no LoRA adapters (model.lora.enabled is "
                                  "false); export without --merge-lora")
        return ckpt, None
    base, adapters = split_adapters(ckpt.state)
    state = merge_lora(ckpt.state, lora) if merge else base
    return dataclasses.replace(ckpt, cfg=without_lora(ckpt.cfg), state=state), (None if merge else adapters)


def export_hf_with_lora(ckpt, out: str | Path, *, merge: bool = False, **hf_options) -> Path:
    """``export_hf`` of a checkpoint that may hold adapters: merged into the weights (``merge``), or the
    base model with the adapters beside it in ``out/lora`` (PEFT's format). Returns ``out``."""
    from xoron_dist.export.hf import export_hf

    model_ckpt, adapters = base_and_adapters(ckpt, merge)
    out = export_hf(model_ckpt, out, **hf_options)
    write_or_clear_adapters(adapters, ckpt.cfg, out)
    return out


def write_or_clear_adapters(adapters: dict[str, torch.Tensor] | None, cfg: XoronConfig, out: Path) -> None:
    """After an HF export to ``out``: its adapters in ``out/lora``, or (a merged or adapter-free export
    that replaced an older one) the older export's adapter files removed, so none is left stale."""
    if adapters is not None:
        export_adapters(adapters, cfg, out)
        return
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRA_WEIGHTS):
        (Path(out) / ADAPTER_DIR / name).unlink(missing_ok=True)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_DIR", "ADAPTER_WEIGHTS", "EXTRA_WEIGHTS", "LoRAExportError",
           "base_and_adapters", "export_adapters", "export_hf_with_lora", "merge_lora", "peft_adapter",
           "split_adapters", "without_lora", "write_or_clear_adapters"]
