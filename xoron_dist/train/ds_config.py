"""The DeepSpeed config of a run: a JSON from ``ds_configs/`` plus the values our config owns.

The JSON (``train.ds_config``) holds what is DeepSpeed's concern: ZeRO bucket sizes,
overlap, stage-3 prefetch and persistence thresholds, offload, fp16 loss scaling.
``build_ds_config`` fills what ``XoronConfig`` owns and DeepSpeed must agree with:

    train_micro_batch_size_per_gpu = train.micro_batch_size
    gradient_accumulation_steps    = train.grad_accum_steps
    train_batch_size               = micro_batch_size * grad_accum_steps * dp_size
    gradient_clipping              = train.grad_clip
    zero_optimization.stage        = parallel.zero_stage
    bf16.enabled / fp16.enabled    from the compute dtype
    optimizer                      from train.optimizer, lr / betas / eps / weight_decay
    data_types.grad_accum_dtype    from train.grad_accum_dtype (bf16 runs)

A JSON value of ``"auto"`` means "filled here". A JSON value that differs from ours is
overridden, with a warning. There is no ``scheduler`` section: the trainer passes its
own ``WarmupCosineSchedule`` to ``deepspeed.initialize``.

Optimizer choice (``train.optimizer``), as DeepSpeed 0.19.8 builds it
(``DeepSpeedEngine.get_optimizer_configuration``):

    "adamw"      ``{"type": "AdamW", "params": {"torch_adam": true}}`` -> ``torch.optim.AdamW``;
                 no DeepSpeed op is compiled.
    "fused_adam" ``{"type": "AdamW"}`` -> ``deepspeed.ops.adam.FusedAdam`` (adam_w_mode). On a CPU
                 accelerator this JIT-compiles the ``fused_adam`` op (~1.5 min the first time); on CUDA it
                 loads the op prebuilt at install (``DS_BUILD_FUSED_ADAM=1``) or JIT-compiles it with nvcc,
                 so without either it is refused here, before any rank starts.
    "cpu_adam"   ``{"type": "AdamW"}`` with ``zero_optimization.offload_optimizer.device = "cpu"``
                 -> ``DeepSpeedCPUAdam`` (JIT-compiles ``cpu_adam`` unless prebuilt). DeepSpeed picks
                 CPU Adam only when the optimizer is offloaded, so this needs an offload JSON
                 such as ``ds_configs/zero3_offload.json``.
    "auto"       device_kind "cpu": as "adamw" (nothing to compile). "cuda" with the optimizer offloaded:
                 as "fused_adam", which DeepSpeed turns into CPU Adam. "cuda" otherwise: DeepSpeed's
                 FusedAdam when its CUDA op was prebuilt at install, else torch's own fused AdamW
                 (``{"torch_adam": true, "fused": true}`` -> ``torch.optim.AdamW(fused=True)``, one
                 kernel over all parameters, shipped in the torch wheel). Auto never JIT-compiles
                 FusedAdam, even where nvcc exists: the torch wheel ships no nvcc, a build takes
                 minutes on every fresh node and fails on a CUDA_HOME whose version differs from
                 torch's, and torch's fused AdamW does the same update without a build.

Gradient accumulation dtype (``train.grad_accum_dtype``, DeepSpeed ``data_types.grad_accum_dtype``):
with bf16 compute, ``auto`` accumulates the micro-batches' gradients in fp32 whenever
``train.grad_accum_steps`` > 1 and ZeRO is on (stage 1: DeepSpeed's BF16_Optimizer; stages 2/3: the
ZeRO optimizer's fp32 accumulation buffers); bf16 sums of many micro-batches lose the small ones.
At stage 1 this also sets ``bf16.immediate_grad_update`` (why: at the line that sets it).
DeepSpeed refuses bf16 weights with fp32 accumulation without ZeRO (stage 0), so ``auto`` keeps bf16
there and ``fp32`` is refused. fp32 and fp16 runs are not affected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from xoron_dist.config import XoronConfig
from xoron_dist.utils.typed_config import ConfigError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

_PRECISION_SECTIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_ds_config_path(name: str | os.PathLike[str]) -> Path:
    """Find a DeepSpeed JSON: as given (absolute, or relative to the working directory), else
    relative to the repository root (the parent of the ``xoron_dist`` package)."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json"))
    raise ConfigError(
        f"train.ds_config='{name}': file not found (looked at {', '.join(str(c) for c in candidates)}); "
        f"shipped configs: {', '.join('ds_configs/' + s for s in shipped) or 'none'}"
    )


def load_ds_json(path: Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON file; a ``ConfigError`` names the file and the position of a syntax error."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"train.ds_config: {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err
    except OSError as err:
        raise ConfigError(f"train.ds_config: cannot read {path} ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"train.ds_config: {path} must hold a JSON object at the top level, "
                          f"got {type(data).__name__}")
    return data


def build_ds_config(cfg: XoronConfig, dp_size: int, dtype: torch.dtype, device_kind: str) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    dp_size: data-parallel world size (the ranks that split the global batch).
    dtype: compute dtype of the model (torch.float32 / bfloat16 / float16).
    device_kind: accelerator kind, ``"cuda"`` or ``"cpu"`` (``torch.device(...).type``).
    """
    if dp_size <= 0:
        raise ValueError(f"dp_size must be > 0, got {dp_size}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    train = cfg.train
    path = resolve_ds_config_path(train.ds_config)
    ds = load_ds_json(path)
    where = str(path)

    _own(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size", where)
    _own(ds, "gradient_accumulation_steps", train.grad_accum_steps, "train.grad_accum_steps", where)
    _own(ds, "train_batch_size", train.micro_batch_size * train.grad_accum_steps * dp_size,
         f"train.micro_batch_size * train.grad_accum_steps * dp_size ({dp_size})", where)
    _own(ds, "gradient_clipping", train.grad_clip, "train.grad_clip", where)

    zero = _section(ds, "zero_optimization", where)
    if zero.get("stage", cfg.parallel.zero_stage) not in ("auto", cfg.parallel.zero_stage) and "_comment" in ds:
        # the template's comment describes its own stage, not the one this run uses
        ds["_comment"] = (f"Built by xoron_dist from {path.name} with zero_optimization.stage="
                          f"{cfg.parallel.zero_stage} (parallel.zero_stage); see README.md.")
    _own(zero, "stage", cfg.parallel.zero_stage, "parallel.zero_stage", where, prefix="zero_optimization.")
    if cfg.parallel.zero_stage == 3 and cfg.parallel.sp > 1:
        # ZeRO-3 then averages gradients over data x sequence ranks on its reduce-scatter path, which
        # the trainer's loss scale cancels (parallel/engine.py); its all-reduce path divides differently.
        _own(zero, "reduce_scatter", True, "parallel.sp > 1 with ZeRO-3", where, prefix="zero_optimization.")

    for section_dtype, name in _PRECISION_SECTIONS.items():
        section = _section(ds, name, where)
        _own(section, "enabled", dtype == section_dtype, f"the compute dtype ({dtype})", where, prefix=f"{name}.")

    if "scheduler" in ds:
        logger.warning("%s: dropping its 'scheduler' section; the trainer steps its own WarmupCosineSchedule "
                       "(train.lr / warmup_steps / min_lr_ratio)", where)
        del ds["scheduler"]
    if "optimizer" in ds:
        logger.warning("%s: replacing its 'optimizer' section with the one train.optimizer=%s selects",
                       where, train.optimizer)
    ds["optimizer"] = _optimizer_section(cfg, zero, device_kind, where)
    accum = grad_accum_dtype(cfg, dtype)
    if accum is not None:
        _own(_section(ds, "data_types", where), "grad_accum_dtype", accum, "train.grad_accum_dtype", where,
             prefix="data_types.")
    if accum == "fp32" and cfg.parallel.zero_stage == 1:
        # BF16_Optimizer's deferred path adds the bf16 grads to its fp32 ones after each backward and
        # clears them in a backward prologue that DeepSpeed's forward hooks only onto outputs it finds in
        # tuples, lists and dicts; ours are dataclasses, so every micro-batch was added again at each later
        # one (grad norm 1.5x at accumulation 2, 2.5x at 4). The immediate path moves each grad into fp32
        # as it lands and frees it, which needs no prologue (and holds no second copy).
        _own(_section(ds, "bf16", where), "immediate_grad_update", True,
             "train.grad_accum_dtype=fp32 at ZeRO-1", where, prefix="bf16.")

    for key in _leftover_auto(ds):
        logger.warning("%s: '%s' is \"auto\" but xoron_dist does not fill it; DeepSpeed will use its default",
                       where, key)
    return ds


def write_ds_config(path: str | os.PathLike[str], ds_config: dict[str, Any]) -> Path:
    """Write the resolved config next to the run (``<run>/ds_config.json``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ds_config, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def grad_accum_dtype(cfg: XoronConfig, dtype: torch.dtype) -> str | None:
    """DeepSpeed's ``data_types.grad_accum_dtype`` for this run, or None to leave DeepSpeed's default
    (the compute dtype). Only bf16 runs are affected; see the module docstring."""
    choice, zero_stage = cfg.train.grad_accum_dtype, cfg.parallel.zero_stage
    if dtype != torch.bfloat16:
        return None
    if choice == "auto":
        return "fp32" if cfg.train.grad_accum_steps > 1 and zero_stage >= 1 else None
    if choice == "fp32" and zero_stage == 0:
        raise ConfigError(
            "train.grad_accum_dtype='fp32' with bf16 compute needs ZeRO: DeepSpeed accumulates bf16 weights' "
            "gradients in fp32 only in its ZeRO optimizers (stage 1: BF16_Optimizer); set parallel.zero_stage "
            "to 1, 2 or 3, or train.grad_accum_dtype=auto (bf16 accumulation at stage 0)"
        )
    return choice


def fused_adam_prebuilt() -> bool:
    """True when DeepSpeed was installed with its CUDA FusedAdam op compiled (``DS_BUILD_FUSED_ADAM=1``)."""
    from deepspeed import git_version_info

    return bool(git_version_info.installed_ops.get("fused_adam")) and \
        getattr(git_version_info, "accelerator_name", "") == "cuda"


def find_nvcc() -> str | None:
    """nvcc where torch's extension builder (and DeepSpeed's JIT) looks: ``$CUDA_HOME``/``$CUDA_PATH``,
    else on ``PATH``, else under ``CUDA_HOME_FALLBACK``; None when there is none (a plain pip install)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            return str(nvcc) if nvcc.is_file() else None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    fallback = Path(CUDA_HOME_FALLBACK) / "bin" / "nvcc"
    return str(fallback) if fallback.is_file() else None


CUDA_HOME_FALLBACK = "/usr/local/cuda"  # torch.utils.cpp_extension's last guess


def _optimizer_section(cfg: XoronConfig, zero: dict[str, Any], device_kind: str, where: str) -> dict[str, Any]:
    train = cfg.train
    params: dict[str, Any] = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": train.eps,
        "weight_decay": train.weight_decay,
    }
    offloaded = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    choice = train.optimizer
    if choice == "auto":
        if device_kind == "cpu":
            choice = "adamw"
        elif offloaded or fused_adam_prebuilt():
            choice = "deepspeed"  # CPU Adam when offloaded, else the prebuilt FusedAdam
        else:
            params["fused"] = True  # torch.optim.AdamW(fused=True): nothing to build
            choice = "adamw"
    if choice == "adamw":
        params["torch_adam"] = True
    elif choice == "fused_adam":
        _check_fused_adam(zero, offloaded, device_kind, where)
    elif choice == "cpu_adam" and not offloaded:
        raise ConfigError(
            f"train.optimizer='cpu_adam' needs zero_optimization.offload_optimizer.device='cpu' in the ds_config "
            f"({where} has none): DeepSpeed builds CPU Adam only for an offloaded optimizer; "
            "use train.ds_config=ds_configs/zero3_offload.json, or train.optimizer=adamw"
        )
    # "AdamW" makes the decoupled weight decay explicit for every backend (torch AdamW,
    # FusedAdam(adam_w_mode=True), DeepSpeedCPUAdam(adamw_mode=True)).
    return {"type": "AdamW", "params": params}


def _check_fused_adam(zero: dict[str, Any], offloaded: bool, device_kind: str, where: str) -> None:
    """Refuse ``train.optimizer=fused_adam`` where DeepSpeed would not run it or could not build it."""
    if offloaded:
        raise ConfigError(
            f"train.optimizer='fused_adam' but {where} offloads the optimizer to "
            f"{zero['offload_optimizer']['device']}, where DeepSpeed runs CPU Adam instead; "
            "use train.optimizer=cpu_adam (or auto), or a ds_config without offload_optimizer"
        )
    if device_kind == "cuda" and not fused_adam_prebuilt() and find_nvcc() is None:
        raise ConfigError(
            "train.optimizer='fused_adam' on CUDA: DeepSpeed's FusedAdam op was not prebuilt at install and "
            f"there is no nvcc to JIT-compile it (CUDA_HOME={os.environ.get('CUDA_HOME', '<unset>')}, none on "
            "PATH; the torch wheel ships none); use train.optimizer=auto (torch's fused AdamW), reinstall "
            "deepspeed with DS_BUILD_FUSED_ADAM=1, or set CUDA_HOME to a CUDA toolkit of torch's CUDA version"
        )


def _section(ds: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    section = ds.setdefault(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: '{name}' must be a JSON object, got {section!r}")
    return section


def _own(section: dict[str, Any], key: str, value: Any, owner: str, where: str, prefix: str = "") -> None:
    """Set a value our config owns; warn when the JSON said something else (not "auto")."""
    if key in section and section[key] != "auto" and section[key] != value:
        logger.warning("%s sets %s%s=%r; using %r from %s", where, prefix, key, section[key], value, owner)
    section[key] = value


def _leftover_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _leftover_auto(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def ds_config_path_for(cfg: XoronConfig) -> str:
    """The run's own DeepSpeed JSON when its ZeRO stage is ``cfg.parallel.zero_stage``, else the shipped one."""
    own = resolve_ds_config_path(cfg.train.ds_config)
    stage = load_ds_json(own).get("zero_optimization", {}).get("stage", "auto")
    if stage in ("auto", cfg.parallel.zero_stage):
        return cfg.train.ds_config
    shipped = f"ds_configs/zero{cfg.parallel.zero_stage}.json"
    if not (REPO_ROOT / shipped).is_file():
        return cfg.train.ds_config  # no shipped JSON for this stage: build_ds_config overrides the stage
    return shipped
