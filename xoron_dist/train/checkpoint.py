"""Checkpoints: DeepSpeed's engine state plus ours (step, tokens, stage, data position, RNG).

Layout of ``ckpt_root`` (one run):

    latest                         the tag of the newest complete checkpoint (DeepSpeed's format)
    step00000020/                  one tag = one checkpoint
        mp_rank_00_model_states.pt           DeepSpeed: module (+ lr scheduler) state, ZeRO-0/1/2
        zero_pp_rank_{d}_mp_rank_00_model_states.pt   DeepSpeed ZeRO-3: per DP rank
        *_optim_states.pt                    DeepSpeed: ZeRO optimizer partitions, per DP rank
        rng_rank{r}.pt                       ours, every rank: its RNG states and data position (tensors,
                                             plain containers: loads with ``weights_only=True``)
        trainer_state.json                   ours, rank 0, written last: TrainerState + file manifest
                                             (every file's size and sha256)
    zero_to_fp32.py, zero_to_torch.py        DeepSpeed's recovery scripts

Why a per-rank file: DeepSpeed stores ``client_state`` only inside the model-states file,
which under ZeRO-0/1/2 only DP rank 0 (of each model-parallel rank) writes, so the other
ranks' RNG states would be lost. Every rank writes ``rng_rank{r}.pt`` itself.

Crash safety. DeepSpeed writes straight into ``<root>/<tag>/`` and rank 0 writes
``latest`` before the final barrier, i.e. possibly while other ranks are still writing
their optimizer partitions. So we save under the tag ``<tag>.partial`` with
``save_latest=False``; every rank flushes what it wrote to disk; after a barrier (every rank
done) the ranks hash the files (sha256, round-robin), rank 0 records the manifest (every file,
its size and digest) in ``trainer_state.json``, fsyncs it and the directory, renames
``<tag>.partial`` to ``<tag>`` (atomic on POSIX), then replaces ``latest`` atomically (write +
fsync + ``os.replace`` + fsync of the root). A crash at any point, of a process or of a node,
leaves ``latest`` on the previous complete checkpoint; a stale ``.partial`` directory is removed
by the next save. Loading checks the manifest (missing or truncated files, then every digest)
before DeepSpeed reads anything, and unpickles only tensors and allow-listed types
(``checkpoint_integrity.py``). ``ckpt_root`` must be a filesystem shared by all ranks
(DeepSpeed's default, not ``use_node_local_storage``).

Never a non-finite state: ``save_checkpoint`` refuses (``NonFiniteStateError``, on every rank)
when any rank's weights hold a NaN or an infinity, so the checkpoints it publishes, and so the
ones pruning keeps, are finite.

Pruning (rank 0, after the new checkpoint is complete): keep the one just written and the
``keep - 1`` newest complete tags before it. Tags with a higher step (left by a run that
was resumed from an earlier checkpoint) are not pruned: saving that step again replaces
them, and until then they are still there if the resume was a mistake.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import numpy as np
import torch

from xoron_dist.config import XoronConfig
from xoron_dist.train.checkpoint_integrity import (
    UnsafePickleError,
    broadcast_from_rank0,
    flush_filesystem,
    fsync_dir,
    hash_files,
    tensors_only_unpickling,
    verify_hashes,
)
from xoron_dist.train.schedule import WarmupCosineSchedule

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: sha256 per file; RNG files without numpy arrays
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
_TAG_RE = re.compile(r"^step(\d{8})$")

# What DeepSpeed or torch.load raise on a damaged file; re-raised as CheckpointError.
_LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names the path and what is wrong."""


class NonFiniteStateError(CheckpointError):
    """The weights to save hold NaN or infinity: the save is refused on every rank."""


@dataclass
class TrainerState:
    """What the trainer needs besides DeepSpeed's state to continue a run exactly.

    step: optimizer updates done. tokens_seen: tokens consumed, all ranks. stage_index /
    stage_name: the curriculum stage. data_position: the loader's opaque resume state of
    THIS rank (saved per rank). wall_time_s: training seconds so far, over all resumes.
    config_hash: ``config_hash(cfg)`` of the run that saved it. skipped_steps / rollbacks: what
    the numerics guard did so far.
    """

    step: int
    tokens_seen: int = 0
    stage_index: int = 0
    stage_name: str = ""
    data_position: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    config_hash: str = ""
    skipped_steps: int = 0  # steps whose update was not applied (non-finite loss or gradients)
    rollbacks: int = 0  # reloads of an earlier checkpoint after the run diverged (train/guard.py)


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def config_hash(cfg: XoronConfig) -> str:
    """sha256 (16 hex) of the model and parallel config: what a checkpoint's tensors depend on.

    Training settings (steps, lr, logging) may change between resumes and are left out.
    """
    return _hash({"model": _hashed_model(cfg), "parallel": cfg.to_dict()["parallel"]})


# Sections added after the image/video generators that leave the model as it was while off: hashed
# only when enabled, so every checkpoint written without them keeps its hash.
_HASHED_WHEN_ENABLED = ("lora",)
# Fields added since then, with the value that builds the model every earlier checkpoint holds: hashed
# only when set to something else, so those checkpoints keep their hash.
_HASHED_WHEN_CHANGED: dict[tuple[str, str], Any] = {("audio", "understand_from"): "codes",
                                                     ("video", "frame_encoder"): "own",
                                                     ("video", "tokens_per_frame"): 64,
                                                     ("vision", "dual_stream_layers"): 0,
                                                     ("vision", "compressor_tokens"): 0,
                                                     ("vision", "compressor_layers"): 2,
                                                     ("vision", "reconstruction_weight"): 0.0}
# Fields added since whose default builds a different model than earlier checkpoints hold (the value
# those hold beside it): hashed only while their section is enabled and they differ from it, so an
# earlier checkpoint resumes with the field set to that value, and a config without the section keeps
# its hash whatever the field says.
_NEW_DEFAULTS: dict[tuple[str, ...], Any] = {("speech", "vocoder", "speaker_conditioned"): False,
                                             ("speech", "vocoder", "speaker_weight"): 0.0,
                                             # the pitch source (none before it existed) and its settings
                                             ("speech", "vocoder", "source_harmonics"): 0,
                                             ("speech", "vocoder", "pitch_weight"): 20.0,
                                             ("speech", "vocoder", "f0_min"): 60.0,
                                             ("speech", "vocoder", "f0_max"): 1000.0,
                                             ("speech", "vocoder", "envelope_harmonics"): 0,
                                             ("speech", "vocoder", "envelope_weight"): 5.0,
                                             ("speech", "vocoder", "pitch_levels"): 0,
                                             ("speech", "pitch_code_gain"): 1.0,
                                             ("speech", "pitch_code_relative"): False,
                                             ("speech", "pitch_code_from"): "flow"}


def _hashed_model(cfg: XoronConfig) -> dict[str, Any]:
    """The model config as the hash sees it (``_HASHED_WHEN_ENABLED`` sections dropped while off,
    ``_HASHED_WHEN_CHANGED`` fields dropped at their old value, ``_NEW_DEFAULTS`` fields at their old
    value or while their section is off)."""
    model = cfg.to_dict()["model"]
    for (section, name), old in _HASHED_WHEN_CHANGED.items():
        if model[section].get(name) == old:
            del model[section][name]
    for (section, *parents, name), old in _NEW_DEFAULTS.items():
        node = model[section]
        for key in parents:
            node = node[key]
        if not model[section]["enabled"] or node.get(name) == old:
            node.pop(name, None)
    return {key: value for key, value in model.items()
            if key not in _HASHED_WHEN_ENABLED or value["enabled"]}


def _hash(sections: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]


# The model config as checkpoints written before the model/ restructuring hashed it: fields added
# since then, with the value that builds the model those checkpoints hold, and the (empty) config
# sections of components that had no code yet and were dropped.
_V1_ADDED: dict[tuple[str, ...], Any] = {
    ("llm", "moe_layer_freq"): 1, ("llm", "moe", "router_score"): "sigmoid", ("llm", "moe", "router_norm"): False,
}
_V1_DROPPED: dict[str, dict[str, Any]] = {
    "audio": {"enabled": False, "sample_rate": 16000, "hidden_size": 512, "num_layers": 12},
    "image_gen": {"enabled": False, "num_experts": 4, "min_resolution": 256, "max_resolution": 512},
    "video_gen": {"enabled": False, "num_experts": 4, "min_resolution": 128, "max_resolution": 384},
}


# Config sections added since (each with ``enabled``; absent from those checkpoints' hash when off).
_V1_ABSENT = ("speech",)
# Sections added after the speech generator (its checkpoints hashed a model config without them).
_V2_ABSENT = ("image_gen", "video_gen")


def hash_matches(saved: str, cfg: XoronConfig) -> bool:
    """Whether a checkpoint whose config hash is ``saved`` holds ``cfg``'s model and layout: today's
    hash, or that of checkpoints written before the config restructuring (same model)."""
    if saved == config_hash(cfg):
        return True
    model = copy.deepcopy(_hashed_model(cfg))
    if not any(model[name]["enabled"] for name in _V2_ABSENT):  # written before the image/video generators
        v2 = {key: value for key, value in model.items() if key not in _V2_ABSENT}
        if saved == _hash({"model": v2, "parallel": cfg.to_dict()["parallel"]}):
            return True
    if any(model[name]["enabled"] for name in (*_V1_DROPPED, *_V1_ABSENT) if name in model):
        return False  # a part those checkpoints could not hold
    for name in _V1_ABSENT:
        model.pop(name, None)
    for path, value in _V1_ADDED.items():
        *parents, leaf = path
        node = model
        for key in parents:
            node = node[key]
        if node.pop(leaf) != value:
            return False
    model.update(copy.deepcopy(_V1_DROPPED))
    return saved == _hash({"model": model, "parallel": cfg.to_dict()["parallel"]})


# Parameter names that changed: (pattern, replacement) applied to a checkpoint's module state on load.
_RENAMED = ((re.compile(r"(\.self_attn\.(?:q|k|v|out)_proj|\.mlp\.fc[12])\.layer\.weight$"), r"\1.weight"),)


def layout_configs(cfg: XoronConfig) -> list[XoronConfig]:
    """``cfg`` and, for each curriculum stage with its own ``parallel`` section, the config that stage runs
    with (``layout.stage_layout_config``): a checkpoint saved in such a stage carries that config's hash."""
    from xoron_dist.parallel.layout import stage_layout_config

    return [cfg, *(stage_layout_config(cfg, i) for i, stage in enumerate(cfg.stages) if stage.parallel)]


def config_for_hash(saved_hash: str, cfg: XoronConfig) -> XoronConfig | None:
    """The one of ``layout_configs(cfg)`` that a checkpoint of config hash ``saved_hash`` was saved with."""
    return next((found for found in layout_configs(cfg) if hash_matches(saved_hash, found)), None)


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: the vision tower's ``<proj>.layer.weight`` is ``<proj>.weight`` now."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = key
        for pattern, replacement in _RENAMED:
            new = pattern.sub(replacement, new)
        if new != key:
            state_dict[new] = state_dict.pop(key)


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy, torch CPU, the current CUDA device, and
    Megatron-core's tensor-parallel RNG tracker when the model uses it. Tensors and plain containers
    only (numpy's key as a tensor), so the file loads with ``weights_only=True``."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _megatron_rng_tracker()
    if tracker is not None and tracker.get_states():
        state["megatron_tracker"] = tracker.get_states()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    key = key.numpy() if torch.is_tensor(key) else key  # format 1 saved numpy's own array
    np.random.set_state((name, key.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _megatron_rng_tracker()
        if tracker is None:
            raise CheckpointError("the checkpoint holds Megatron-core tensor-parallel RNG states, but "
                                  "megatron.core.tensor_parallel is not in use in this run")
        tracker.set_states(state["megatron_tracker"])


def _megatron_rng_tracker() -> Any:
    """Megatron-core's model-parallel CUDA RNG tracker (TP dropout), if the model has imported it."""
    module = sys.modules.get("megatron.core.tensor_parallel.random")
    return None if module is None else module.get_cuda_rng_tracker()


# --------------------------------------------------------------------------- save


def save_checkpoint(engine: Any, ckpt_root: str | os.PathLike[str], state: TrainerState, *, keep: int) -> Path:
    """Save a checkpoint tagged ``step{state.step:08d}``; every rank must call it. Returns the tag directory.

    engine: the ``deepspeed.DeepSpeedEngine``. keep: complete checkpoints to keep (>= 1).
    Raises ``NonFiniteStateError`` (every rank, nothing written) when any rank's weights are not finite.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(ckpt_root)
    tag = tag_for_step(state.step)
    partial = root / (tag + PARTIAL_SUFFIX)
    rank, world = dist.get_rank(), dist.get_world_size()
    _refuse_non_finite(engine, tag)

    if rank == 0 and partial.exists():
        logger.warning("removing %s, left by an interrupted save", partial)
        shutil.rmtree(partial)
    dist.barrier()

    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    partial.mkdir(parents=True, exist_ok=True)  # DeepSpeed makes it on every rank today; don't depend on it
    torch.save({"rng": capture_rng_state(), "data_position": state.data_position}, partial / f"rng_rank{rank}.pt")
    flush_filesystem(partial)  # what this node wrote is on disk before the checkpoint can be published
    dist.barrier()

    names = broadcast_from_rank0(sorted(p.name for p in partial.iterdir() if p.is_file()) if rank == 0 else None)
    digests = hash_files(partial, names)
    final = root / tag
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "tag": tag,
            "world_size": world,
            "saved_unix_time": time.time(),
            "state": asdict(state),
            "files": {name: {"bytes": (partial / name).stat().st_size, "sha256": digests[name]} for name in names},
        }
        _write_atomic(partial / STATE_FILE, json.dumps(meta, indent=2, default=str) + "\n")
        fsync_dir(partial)
        _publish(root, partial, final)
        _prune(root, keep=keep, current=tag)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _publish(root: Path, partial: Path, final: Path) -> None:
    """Rank 0: rename the finished ``partial`` to its tag and point ``latest`` at it, durably."""
    replaced = root / (final.name + REPLACED_SUFFIX)
    if final.exists():
        # Same step saved before, on a timeline abandoned by resuming from an earlier tag.
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    partial.rename(final)
    fsync_dir(root)
    _write_atomic(root / LATEST_FILE, final.name)
    fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)


def _refuse_non_finite(engine: Any, tag: str) -> None:
    """Raise ``NonFiniteStateError`` on every rank when any rank holds a non-finite weight; collective."""
    bad = []
    for name, param in engine.module.named_parameters():
        local = getattr(param, "ds_tensor", param)  # ZeRO-3: this rank's partition
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    count = torch.tensor([float(len(bad))], device=next(engine.module.parameters()).device)
    dist.all_reduce(count)
    if count.item() > 0:
        where = f"rank {dist.get_rank()}: {', '.join(bad[:3])}" if bad else "another rank"
        raise NonFiniteStateError(
            f"not saving {tag}: {int(count.item())} weight tensor(s) hold NaN or infinity ({where}); the "
            "checkpoints already saved are left as they are"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_root: str | os.PathLike[str]) -> list[str]:
    """Tags under ``ckpt_root`` that finished saving (have ``trainer_state.json``), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags, key=_step_of)


def _step_of(tag: str) -> int:
    return int(tag[len("step"):])


def _prune(root: Path, *, keep: int, current: str) -> None:
    step = _step_of(current)
    older = [t for t in complete_tags(root) if _step_of(t) < step]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for leftover in root.iterdir():
        if leftover.is_dir() and leftover.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX)):
            doomed.append(leftover.name)
    for name in doomed:
        logger.info("pruning checkpoint %s", root / name)
        shutil.rmtree(root / name)


# --------------------------------------------------------------------------- load


def latest_tag(ckpt_root: str | os.PathLike[str]) -> str | None:
    """The tag ``latest`` names, or None when there is no ``latest`` file."""
    path = Path(ckpt_root) / LATEST_FILE
    if not path.is_file():
        return None
    return path.read_text().strip()


def resolve_tag(ckpt_root: str | os.PathLike[str]) -> str | None:
    """The tag to resume from: the one ``latest`` names, else the newest complete tag, else None."""
    root = Path(ckpt_root)
    tag = latest_tag(root)
    if tag is not None:
        return tag
    tags = complete_tags(root)
    if not tags:
        if root.is_dir() and any(root.iterdir()):
            logger.warning("%s holds no complete checkpoint (no '%s' file, no tag with %s); starting fresh",
                           root, LATEST_FILE, STATE_FILE)
        return None
    logger.warning("%s has no '%s' file; resuming from the newest complete checkpoint %s", root, LATEST_FILE, tags[-1])
    return tags[-1]


def peek_state(ckpt_root: str | os.PathLike[str], tag: str | None = None) -> TrainerState | None:
    """The trainer state of a checkpoint (default: the one to resume from) without loading tensors.

    The trainer reads it before building an engine: the curriculum stage it names decides which
    engine (trainable parameters, data mix) the checkpoint is loaded into.
    """
    tag = tag or resolve_tag(ckpt_root)
    if tag is None:
        return None
    return _state_of(_read_verified_meta(Path(ckpt_root) / tag))


def load_checkpoint(
    engine: Any,
    ckpt_root: str | os.PathLike[str],
    tag: str | None = None,
    *,
    expected_config_hash: str | None = None,
    module_only: bool = False,
    verify: bool = True,
) -> TrainerState | None:
    """Restore the engine, this rank's RNG and the trainer state; every rank must call it.

    tag None: the one ``latest`` names (or, if ``latest`` is missing, the newest complete
    tag). Returns None when there is nothing to resume: no ``ckpt_root``, or no complete
    checkpoint in it. Raises ``CheckpointError`` (naming the path and what is missing or
    damaged, and the previous complete checkpoint) when a checkpoint was asked for or
    ``latest`` points at one that is unusable. ``verify``: check every file's sha256 first
    (False only for a tag that ``resume_tag`` has just verified). Only tensors and
    allow-listed types are unpickled (``checkpoint_integrity.tensors_only_unpickling``).
    Under ZeRO-3, load into a freshly built engine (DeepSpeed's requirement).
    ``module_only``: restore the weights (and buffers: expert biases) but not the optimizer or LR
    schedule: a new curriculum stage starts its own optimizer from the previous stage's weights.
    """
    root = Path(ckpt_root)
    tag = tag or resolve_tag(root)
    if tag is None:
        return None
    ckpt_dir = root / tag
    meta = _read_verified_meta(ckpt_dir)
    world = dist.get_world_size()
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{ckpt_dir} was saved by {meta['world_size']} ranks, this run has {world}: "
            "DeepSpeed ZeRO partitions and per-rank RNG states need the same world size"
        )
    if verify:
        _check_hashes(ckpt_dir, meta)
    rank_state = _load_files(engine, root, tag, module_only)
    if isinstance(engine.lr_scheduler, WarmupCosineSchedule) and not module_only:
        engine.lr_scheduler.apply()

    state = _state_of(meta)
    state.data_position = rank_state["data_position"]
    if expected_config_hash is not None and state.config_hash and state.config_hash != expected_config_hash:
        logger.warning("%s was saved with model/parallel config hash %s, this run has %s",
                       ckpt_dir, state.config_hash, expected_config_hash)
    restore_rng_state(rank_state["rng"])
    logger.info("resumed from %s (step %d)", ckpt_dir, state.step)
    return state


def _load_files(engine: Any, root: Path, tag: str, module_only: bool) -> dict[str, Any]:
    """This rank's RNG/data file, then DeepSpeed's files into ``engine``; tensors-only unpickling throughout."""
    ckpt_dir = root / tag
    renames = engine.module.register_load_state_dict_pre_hook(_rename_legacy_keys)
    try:
        with tensors_only_unpickling():
            rank_state = torch.load(ckpt_dir / f"rng_rank{dist.get_rank()}.pt", map_location="cpu")
            load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_only=module_only,
                                                  load_optimizer_states=not module_only,
                                                  load_lr_scheduler_states=not module_only)
    except UnsafePickleError as err:
        raise CheckpointError(str(err)) from None
    except _LOAD_ERRORS as err:
        hint = model_mismatch_hint(str(err))
        if hint:
            raise CheckpointError(f"{ckpt_dir} holds a different model than this config builds: {hint}") from err
        raise CheckpointError(f"{ckpt_dir}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    finally:
        renames.remove()
    if load_path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no model-states file to load")
    return rank_state


# Parameters that only an option builds (newer, or off by default), and the overrides that build the model a
# checkpoint without them holds.
_OPTION_PARAMETERS = {"speech.vocoder.generator.cond.": "model.speech.vocoder.speaker_conditioned=false "
                                                          "model.speech.vocoder.speaker_weight=0",
                      "speech.vocoder.generator.pitch.": "model.speech.vocoder.source_harmonics=0",  # with no envelope
                      "speech.vocoder.generator.envelope.": "model.speech.vocoder.envelope_harmonics=0"}


def model_mismatch_hint(message: str) -> str | None:
    """A load error's text -> what to change when it names parameters of an option the checkpoint predates
    (``_OPTION_PARAMETERS``), else None."""
    if "Missing key(s)" not in message:
        return None
    lacking = {name: overrides for name, overrides in _OPTION_PARAMETERS.items() if name in message}
    if not lacking:
        return None
    return (f"its parameters lack {', '.join(name + '*' for name in lacking)} (saved without those options, or before "
            f"they existed); resume with {' '.join(lacking.values())}, as the run it continues was built")


def _state_of(meta: dict[str, Any]) -> TrainerState:
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in meta["state"].items() if k in known})


def _check_hashes(ckpt_dir: Path, meta: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` naming every file whose sha256 differs from the manifest's; collective."""
    expected = {name: entry["sha256"] for name, entry in meta["files"].items() if isinstance(entry, dict)}
    if not expected:
        logger.warning("%s predates per-file hashes (format %s): checked by file size only",
                       ckpt_dir, meta.get("format_version", 1))
        return
    damaged = verify_hashes(ckpt_dir, expected)
    if damaged:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(damaged)}.{_previous_hint(ckpt_dir)}")


def _previous_hint(ckpt_dir: Path) -> str:
    older = [t for t in complete_tags(ckpt_dir.parent) if _TAG_RE.match(ckpt_dir.name)
             and _step_of(t) < _step_of(ckpt_dir.name)]
    if not older:
        return " No earlier complete checkpoint is left."
    return (f" The previous complete checkpoint is {older[-1]}: --resume falls back to it by itself "
            f"(or write '{older[-1]}' into {ckpt_dir.parent / LATEST_FILE}).")


def resume_tag(ckpt_root: str | os.PathLike[str]) -> str | None:
    """The tag ``--resume`` continues from: the one ``resolve_tag`` names when it is complete and its
    files verify, else the newest earlier complete tag that does (each damaged one named in the log).
    None: nothing to resume. Raises ``CheckpointError`` when no checkpoint verifies. Collective."""
    root = Path(ckpt_root)
    first = resolve_tag(root)
    if first is None:
        return None
    older = [t for t in reversed(complete_tags(root))
             if t != first and (not _TAG_RE.match(first) or _step_of(t) < _step_of(first))]
    problems: list[str] = []
    tag = newest_verified(root, [first, *older], problems)
    if tag is None:
        raise CheckpointError(f"no checkpoint under {root} can be resumed: {' | '.join(problems)}")
    if tag != first:
        logger.warning("resuming from %s, the newest checkpoint whose files verify (not %s)", tag, first)
    return tag


def newest_verified(ckpt_root: Path, tags: list[str], problems: list[str] | None = None) -> str | None:
    """The first of ``tags`` (newest first) whose files are all there with their recorded sizes and
    sha256; each one that fails is logged (and appended to ``problems``). Collective."""
    for tag in tags:
        try:
            _check_hashes(ckpt_root / tag, _read_verified_meta(ckpt_root / tag))
        except CheckpointError as err:
            logger.error("%s", err)
            if problems is not None:
                problems.append(str(err))
            continue
        return tag
    return None


def verified_manifest(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint ``ckpt_dir`` once every file it lists is there with its
    recorded size and sha256; ``CheckpointError`` naming what is missing or damaged otherwise. Needs no
    process group: export (``xoron_dist/export/``) reads checkpoints offline, on one process."""
    ckpt_dir = Path(ckpt_dir)
    meta = _read_verified_meta(ckpt_dir)
    _check_hashes(ckpt_dir, meta)
    return meta


def _read_verified_meta(ckpt_dir: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a tag, after checking that every file it lists is there, whole."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    state_path = ckpt_dir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {STATE_FILE} is missing "
                              "(the save did not finish)")
    try:
        meta = json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_path} is damaged (not JSON: {err})") from err
    missing = [key for key in ("files", "world_size", "state") if key not in meta]
    if missing or "step" not in meta["state"]:
        raise CheckpointError(f"{state_path} is damaged: missing {', '.join(missing) or 'state.step'}")
    problems = []
    for name, entry in meta["files"].items():
        size = entry["bytes"] if isinstance(entry, dict) else entry  # format 1: the size alone
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or damaged: {'; '.join(problems)}")
    return meta
