"""Resharding: continue from a checkpoint saved with another world size, parallel layout or ZeRO stage.

``xoron train --resume --reshard`` (config ``train.reshard: true``) reads the checkpoint whatever its
layout and loads it into this run's freshly built engine:

    the saving run's config  <run>/configs/<config hash>.yaml (kept by ``archive_config`` at every start)
      ─► consolidate: every full tensor of the checkpoint (``train.consolidation.read_full_tensors``:
         ZeRO-0..3 shards with their fp32 masters, TP slices, PP stages, EP experts, any world size)
      ─► the plain model, on the meta device, takes the full tensors (``assign``: no copy, no init)
      ─► ``parallelize`` (the trainer's own split code) cuts this rank's TP slices, EP experts and
         pipeline stage out of it, exactly as a fresh build would
      ─► into the engine: parameters and buffers (expert biases) copied; under ZeRO-3 this rank's
         flat partition written straight into ``ds_tensor``; then the optimizer's fp32 masters
         refreshed from them (DeepSpeed's own ``refresh_fp32_params``)
      ─► Adam's moments (``train.reshard_optimizer``): the same three steps for ``exp_avg`` and
         ``exp_avg_sq`` (``consolidation.read_full_moments``: joined like the masters, from the same
         ZeRO files, ``train/moment_shards.py``; cut by the same ``parallelize``), written where this
         rank's optimizer keeps them (``load_into_optimizer``), with Adam's step count

Consolidate-and-reslice, not DeepSpeed's universal checkpoint. The universal checkpoint
(``ds_to_universal`` + ``load_universal``) converts the ZeRO files to per-parameter fp32 folders,
but it knows DeepSpeed's own TP/PP layouts (Megatron-DeepSpeed's pattern files), not ours: our
Megatron-core TP slices with strides, vocabulary padding, our EP container and our pipeline stages
would each need a pattern description, it needs an offline conversion step and a second copy of
the checkpoint on disk, and its loading path for MoE under ZeRO-3 is tied to DeepSpeed's MoE
classes. Consolidation already reads every layout we write (tested against the single-rank weights
in tests/export/), and slicing through ``parallelize`` means a resharded rank holds exactly what a
fresh build of the new layout holds, by construction; the moments take the same path, so they land
beside their weights by the same construction. What it costs: each rank holds one full fp32 copy of
the model on the host while it slices (the same peak a fresh build has: ``build_stage`` builds the
whole plain model on every rank before it parallelizes it), three with the moments (weights,
``exp_avg``, ``exp_avg_sq``). Every rank reads the (shared, memory-mapped) files itself instead of
rank 0 reading and broadcasting: no collective moves a full tensor, and the host memory per rank is
the same either way.

Adam's moments (``train.reshard_optimizer``; default null = carried when the checkpoint's layout holds
them readably, which is what a resume means: the run continues as if it had not stopped):
ZeRO 1, 2 and 3 checkpoints (with TP, PP, EP, bf16) are read. ZeRO-0 is not: DeepSpeed saves torch's own
optimizer ``state_dict()``, keyed by position in parameter groups no file names. ``true`` then refuses
the resume naming that reason; null warns and starts the moments at zero; ``false`` always starts them
at zero. Any target layout takes them (ZeRO 0-3, bf16), except an optimizer swapped to NVMe and fp16
without ZeRO (refused naming it).

What else carries over:

* step, stage, tokens seen, wall time, the guard's counts: the checkpoint's ``TrainerState``.
* the LR schedule and DeepSpeed's step counters: read from the saved model-states file.
* RNG: rank r restores the python / numpy / torch states of saved rank ``r % saved_world``;
  Megatron-core's tensor-parallel tracker states only when tp is unchanged (otherwise the tracker
  keeps the seeds the new build gave it: its states are per TP rank).
* data position (``map_data_position``): the synthetic text source's position is global (step,
  micro-step), so every rank continues exactly where the run stopped, whatever the data-parallel
  size. The Arrow loader's position belongs to a (dp_size, workers) split of the sample stream:
  with the same data-parallel size each dp rank takes the saved position of its own dp rank
  (exact); with another size the stage's data order starts again from its beginning (a warning
  says so; mapping the slots' cursors onto a new split is not built).

Without ``--reshard`` a changed layout is refused, with the differences named. A changed model config
is always refused: there is nothing to reslice into.

The same path carries the weights across a curriculum stage boundary where the next stage sets its own
layout (``stages[i].parallel``; ``train/trainer.py``): no flag is needed for that planned change. A
checkpoint saved inside such a stage carries the config hash of that stage's layout
(``checkpoint.layout_configs``), so a resume compares it with the stage's layout, not the run's. A new
stage's optimizer starts afresh (its own LR schedule, often other frozen parts) unless the stage sets
``carry_optimizer: true``: then the moments and step count come through this path too, whether or not
the layout changes (parameters the previous stage froze start at zero moments), and a layout whose
moments cannot be read is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xoron_dist.config import ConfigError, XoronConfig, load_config
from xoron_dist.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainerState,
    config_for_hash,
    config_hash,
    restore_rng_state,
)
from xoron_dist.train.checkpoint_integrity import UnsafePickleError, tensors_only_unpickling

logger = logging.getLogger(__name__)

CONFIGS_DIR = "configs"  # <run>/configs/<config hash>.yaml: every config the run was started with


@dataclass(frozen=True)
class SavedLayout:
    """What a checkpoint was saved with: the run's config and the world size."""

    cfg: XoronConfig
    world_size: int


def archive_config(run_root: Path, cfg: XoronConfig) -> None:
    """Rank 0, before ``config.yaml`` is rewritten: keep the previous and the new config under their
    hashes, so a checkpoint of any earlier layout can still be read after a reshard."""
    store = run_root / CONFIGS_DIR
    store.mkdir(parents=True, exist_ok=True)
    previous = run_root / "config.yaml"
    if previous.is_file():
        try:
            old = load_config(previous)
        except ConfigError as err:
            logger.warning("%s is not a valid config any more (%s); not archived", previous, err)
        else:
            target = store / f"{config_hash(old)}.yaml"
            if not target.exists():
                target.write_text(previous.read_text())
    (store / f"{config_hash(cfg)}.yaml").write_text(cfg.to_yaml())


def saved_layout(run_root: Path, ckpt_dir: Path, cfg: XoronConfig) -> SavedLayout:
    """The config and world size ``ckpt_dir`` was saved with. ``cfg`` (this run's) or one of its stages'
    layouts serves when the hash matches it; else ``<run>/configs/`` must hold the config of that hash
    (or of the run whose stage it was)."""
    meta = json.loads((ckpt_dir / STATE_FILE).read_text())
    saved_hash, world = meta["state"].get("config_hash", ""), int(meta["world_size"])
    if not saved_hash:
        return SavedLayout(cfg, world)
    found = config_for_hash(saved_hash, cfg)
    if found is not None:
        return SavedLayout(found, world)
    store = run_root / CONFIGS_DIR
    candidates = [store / f"{saved_hash}.yaml"] + sorted(store.glob("*.yaml")) if store.is_dir() else []
    for path in candidates:
        if path.is_file():
            try:
                found = config_for_hash(saved_hash, load_config(path))
            except ConfigError:
                continue
            if found is not None:
                return SavedLayout(found, world)
    raise ConfigError(
        f"checkpoint {ckpt_dir} was saved with config hash {saved_hash}, and no config of that hash is kept in "
        f"{store} (runs started before configs/ existed keep only their last config.yaml): resume with the "
        f"config that run used, or start a new train.name"
    )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _differences(section: str, old: XoronConfig, new: XoronConfig) -> list[str]:
    before, after = _flat(old.to_dict()[section], f"{section}."), _flat(new.to_dict()[section], f"{section}.")
    return [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def layout_changes(saved: SavedLayout, cfg: XoronConfig, world_size: int) -> list[str]:
    """What differs between the saved layout and this run's ("parallel.tp 1 -> 2", "world size 2 -> 1");
    empty when none does. ``ConfigError`` when the model config differs (never resharded)."""
    # the same model: the saved config with this run's layout hashes like this run's config
    if saved.cfg is not cfg and config_hash(dataclasses.replace(saved.cfg, parallel=cfg.parallel)) != config_hash(cfg):
        model = _differences("model", saved.cfg, cfg) or ["a section the config hash covers"]
        shown = "; ".join(model[:4]) + (f" and {len(model) - 4} more" if len(model) > 4 else "")
        raise ConfigError(f"the checkpoint holds another model: {shown}. A resume (with or without --reshard) "
                          "needs the same model config; start a new train.name to train this one")
    changes = _differences("parallel", saved.cfg, cfg) if saved.cfg is not cfg else []
    if saved.world_size != world_size:
        changes.append(f"world size {saved.world_size} -> {world_size}")
    return changes


def check_layout(saved: SavedLayout, cfg: XoronConfig, world_size: int, ckpt_dir: Path) -> bool:
    """Whether resuming from ``ckpt_dir`` needs a reshard; ``ConfigError`` naming the differences when it
    does and ``train.reshard`` (``--reshard``) is off, or when the model config differs."""
    changes = layout_changes(saved, cfg, world_size)
    if changes and not cfg.train.reshard:
        raise ConfigError(f"checkpoint {ckpt_dir} was saved with another layout ({'; '.join(changes)}); pass "
                          "--reshard (train.reshard=true) to reslice it into this layout, or resume with the run's "
                          "own layout")
    return bool(changes)


# --------------------------------------------------------------------------- weights


def local_state(full: dict[str, torch.Tensor], cfg: XoronConfig, multimodal: bool) -> dict[str, torch.Tensor]:
    """This rank's share of the full single-rank ``full`` state in ``cfg``'s layout: the plain model on the
    meta device takes the full tensors, and ``parallelize`` (every rank must call this: a pipeline
    split agrees its costs over all ranks) cuts it as it cuts a fresh build."""
    from xoron_dist.model.llm import XoronLLM
    from xoron_dist.model.xoron import build_model
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.train.lora import add_adapters

    with torch.device("meta"):
        model = build_model(cfg) if multimodal else XoronLLM(cfg.llm)
        add_adapters(model, cfg)  # model.lora's adapters, as build_stage adds them before it parallelizes
    model.load_state_dict(full, strict=True, assign=True)
    # Only the cut matters: no activation checkpointing wrappers, no ZeRO-3 marks on this throwaway copy.
    slicing = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=False),
                                  parallel=dataclasses.replace(cfg.parallel, zero_stage=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sliced = parallelize(model, slicing).model
    state = sliced.state_dict()
    on_meta = [name for name, tensor in state.items() if tensor.is_meta]
    if on_meta:
        raise CheckpointError(f"reshard: the consolidated checkpoint gave no value for {on_meta[:3]}")
    return state


def load_into_engine(engine: Any, local: dict[str, torch.Tensor]) -> None:
    """Copy this rank's ``local`` tensors into the engine's module (ZeRO-3: into this rank's partition of
    each parameter) and refresh the optimizer's fp32 master weights from them."""
    module: nn.Module = engine.module
    names = set()
    with torch.no_grad():
        for name, param in module.named_parameters():
            names.add(name)
            value = _value(local, name)
            if hasattr(param, "ds_tensor"):
                _write_partition(param, value, name)
            else:
                param.copy_(value.to(param.dtype).view_as(param))
        for name, buffer in module.named_buffers():
            if name in local:
                names.add(name)
                buffer.copy_(local[name].to(buffer.dtype))
    unused = sorted(set(local) - names - _tied_aliases(module))
    if unused:
        raise CheckpointError(f"reshard: {len(unused)} resliced tensor(s) have no place in this rank's model, e.g. "
                              f"'{unused[0]}'")
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def _value(local: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in local:
        raise CheckpointError(f"reshard: this rank's model has '{name}', which the resliced checkpoint lacks")
    return local[name]


def _tied_aliases(module: nn.Module) -> set[str]:
    """The second and later names of tied parameters (``named_parameters`` gives each parameter once)."""
    first = {id(p) for _, p in module.named_parameters()}
    seen, aliases = set(), set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first and id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def _write_partition(param: torch.nn.Parameter, value: torch.Tensor, name: str) -> None:
    """ZeRO-3: this rank's slice of the flattened parameter, as DeepSpeed's ``_partition_param`` cuts it
    (``partition_size`` elements from ``partition_size * rank`` in the parameter's partition group,
    the tail beyond the parameter's elements zero)."""
    if value.numel() != param.ds_numel:
        raise CheckpointError(f"reshard: '{name}' has {value.numel()} elements, this rank's model {param.ds_numel}")
    part = param.ds_tensor
    size = part.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    flat = value.reshape(-1).to(part.dtype)
    count = max(0, min(size, flat.numel() - start))
    part.data.zero_()
    if count:
        part.data[:count].copy_(flat[start:start + count])


def load_full_weights(engine: Any, ckpt_dir: Path, saved: SavedLayout, cfg: XoronConfig, *,
                      moments: bool | None = False) -> bool:
    """Consolidate ``ckpt_dir`` (saved in ``saved``'s layout) and load this rank's share into ``engine``;
    with ``moments`` also Adam's moments and step count into its optimizer (True: or ``CheckpointError``
    naming why they cannot be read; None: when they can be read, else a warning). Returns whether the
    moments were carried."""
    from xoron_dist.train.consolidation import ConsolidationError, read_full_moments, read_full_tensors

    try:
        full = dict(read_full_tensors(ckpt_dir, saved.cfg, saved.world_size))
    except ConsolidationError as err:
        raise CheckpointError(f"reshard: {err}") from None
    multimodal = any(name.startswith("llm.") for name in full)
    load_into_engine(engine, local_state(full, cfg, multimodal))
    if moments is False:
        return False
    try:
        found = read_full_moments(ckpt_dir, saved.cfg, saved.world_size)
    except ConsolidationError as err:
        if moments:
            raise CheckpointError(f"reshard: Adam's moments cannot be carried: {err}") from None
        logger.warning("reshard: Adam's moments start at zero: %s", err)
        return False
    local = {}
    for key, by_name in found.moments.items():
        # buffers and weights the saving optimizer did not train have no moments: zero, as a fresh start has
        whole = {name: by_name[name] if name in by_name else torch.zeros_like(tensor) for name, tensor in full.items()}
        local[key] = local_state(whole, cfg, multimodal)
    del full
    load_into_optimizer(engine, local, found.step)
    return True


# --------------------------------------------------------------------------- optimizer moments


def load_into_optimizer(engine: Any, moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Write this rank's resliced Adam ``moments`` (key -> this rank's model names -> tensor, shaped like the
    parameters) into the engine's optimizer, where it keeps them, and set Adam's ``step`` count:

        ZeRO-3           the parameter's partition of its flat fp32 group (``grad_position``), cut as
                         ``_write_partition`` cuts the weights
        ZeRO-1/2, bf16   the parameter's fragment in this rank's flat fp32 partition (``_hp_mapping``:
                         where DeepSpeed itself links the fragment)
        no ZeRO (fp32)   torch's per-parameter state

    The states are created here (torch's Adam creates them lazily at the first step, which then finds and
    continues them)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside DeepSpeed's wrappers
    params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    if getattr(optimizer, "swap_optimizer", False):
        raise CheckpointError("reshard: Adam's moments cannot be carried into an optimizer swapped to NVMe "
                              "(offload_optimizer.device=nvme); set train.reshard_optimizer=false")
    if any(hasattr(p, "ds_id") for _, p in params):
        flats = list(optimizer.fp32_partitioned_groups_flat)
    elif any(hasattr(p, "_hp_mapping") for _, p in params):
        flats = [group["params"][0] for group in base.param_groups]
    elif isinstance(base, torch.optim.Optimizer) and base is optimizer:
        flats = [p for group in base.param_groups for p in group["params"]]
    else:
        raise CheckpointError(f"reshard: Adam's moments cannot be carried into {type(optimizer).__name__} (fp16 "
                              "without ZeRO); set train.reshard_optimizer=false")
    for flat in flats:
        state = base.state[flat]
        for key in moments:
            state[key] = torch.zeros_like(flat, dtype=torch.float32)
        state["step"] = _step_value(base, flat, step)
    for group in base.param_groups:
        if "step" in group:  # DeepSpeed's FusedAdam also keeps a group step
            group["step"] = step
    with torch.no_grad():
        for name, param in params:
            values = {key: _value(local, name) for key, local in moments.items()}
            if hasattr(param, "ds_id"):
                _write_zero3_moments(optimizer, param, values)
            elif hasattr(param, "_hp_mapping"):
                _write_fragment_moments(base, param, values)
            else:
                for key, value in values.items():
                    base.state[param][key].copy_(value.view_as(param))


def _step_value(base: Any, flat: torch.Tensor, step: int) -> Any:
    """Adam's step in the form the optimizer keeps it: torch's Adam(W) a float32 tensor (on the device when
    fused or capturable), DeepSpeed's FusedAdam and CPU Adam an int."""
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        return int(step)
    on_device = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
    return torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu")


def _write_fragment_moments(base: Any, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
    """ZeRO-1/2 (and bf16): the part of the parameter this rank's flat partition holds, if any."""
    mapping = param._hp_mapping
    if mapping is None:
        return
    flat = base.param_groups[mapping.param_group_index]["params"][0]
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    for key, value in values.items():
        base.state[flat][key].narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))


def _write_zero3_moments(optimizer: Any, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: this rank's partition (``partition_numel`` elements from ``partition_numel * rank`` in the
    parameter's partition group, the tail beyond its elements zero) at its offset in its flat group."""
    group, offset, size = optimizer.grad_position[optimizer.get_param_id(param)]
    flat = optimizer.fp32_partitioned_groups_flat[group]
    start = size * dist.get_rank(group=param.ds_process_group)
    for key, value in values.items():
        count = max(0, min(size, value.numel() - start))
        if count:
            optimizer.optimizer.state[flat][key].narrow(0, offset, count).copy_(value.reshape(-1)[start:start + count])


# --------------------------------------------------------------------------- the rest of the state


def _rank_file(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    try:
        with tensors_only_unpickling():
            return torch.load(ckpt_dir / f"rng_rank{rank}.pt", map_location="cpu")
    except UnsafePickleError as err:
        raise CheckpointError(str(err)) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{ckpt_dir / f'rng_rank{rank}.pt'}: unreadable ({type(err).__name__}: {err})") from err


def map_data_position(positions: list[dict[str, Any]], dp_rank: int, dp_size: int) -> dict[str, Any] | None:
    """This dp rank's data position from the saved ranks' ``positions`` (index = saved rank), or None when
    the stage's data must start afresh (see the module docstring for the rule)."""
    sources = [p.get("source") for p in positions if p.get("source")]
    if not sources:
        return None
    first = sources[0]
    if "dp_rank" not in first:  # a global position (synthetic text): the same on every rank
        return first
    if first.get("dp_size") != dp_size:
        logger.warning("reshard: the data order was split over %s data-parallel ranks, this run has %d; the "
                       "stage's data starts again from its beginning", first.get("dp_size"), dp_size)
        return None
    return next(s for s in sources if s["dp_rank"] == dp_rank)


def _scheduler_state(ckpt_dir: Path, saved: SavedLayout) -> dict[str, Any]:
    from xoron_dist.train.deepspeed_shards import load_file, model_file, zero_file

    name = zero_file(0, 0, "model") if saved.cfg.parallel.zero_stage == 3 else model_file(0)
    return load_file(ckpt_dir / name)


def load_resharded(engine: Any, ckpt_dir: Path, saved: SavedLayout, cfg: XoronConfig, ctx, *,
                   module_only: bool, moments: bool | None = False) -> TrainerState:
    """Restore a run from ``ckpt_dir`` (any layout) into this layout's ``engine``; every rank calls it.
    ``module_only``: weights and expert biases only (a new curriculum stage); else also the LR schedule,
    DeepSpeed's step counters, RNG and this rank's data position (in ``state.data_position``, or empty
    when the data starts afresh). ``moments``: Adam's moments and step count too (True: or refused;
    None: when readable, else they start at zero with a warning; False: they start at zero)."""
    meta = json.loads((ckpt_dir / STATE_FILE).read_text())
    carried = load_full_weights(engine, ckpt_dir, saved, cfg, moments=moments)
    state = TrainerState(**{k: v for k, v in meta["state"].items() if k in {f.name for f in
                                                                           dataclasses.fields(TrainerState)}})
    state.config_hash = config_hash(cfg)
    rank_file = _rank_file(ckpt_dir, ctx.rank % saved.world_size)
    rng = dict(rank_file["rng"])
    if saved.cfg.parallel.tp != cfg.parallel.tp:
        rng.pop("megatron_tracker", None)
    restore_rng_state(rng)
    if module_only:
        state.data_position = {}
    else:
        saved_file = _scheduler_state(ckpt_dir, saved)
        if engine.lr_scheduler is not None and saved_file.get("lr_scheduler") is not None:
            engine.lr_scheduler.load_state_dict(saved_file["lr_scheduler"])
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if key in saved_file:
                setattr(engine, key, int(saved_file[key]))
        positions = [_rank_file(ckpt_dir, r).get("data_position", {}) for r in range(saved.world_size)]
        mapped = map_data_position(positions, ctx.dp_rank, ctx.dp_size)
        state.data_position = {} if mapped is None else {"source": mapped}
    if moments is False and not module_only:  # a new stage's fresh optimizer is its plan, not news
        logger.warning("reshard: optimizer moments start at zero (train.reshard_optimizer=false: the fp32 master "
                       "weights are carried, Adam's moments are not)")
    logger.info("reshard: Adam's moments and step count %s", "carried" if carried else "start afresh")
    logger.info("resharded %s (step %d) into this layout", ckpt_dir, state.step)
    return state


__all__ = ["SavedLayout", "archive_config", "check_layout", "layout_changes", "load_full_weights", "load_resharded",
           "local_state", "map_data_position", "saved_layout"]
