"""Consolidation: a trainer checkpoint of any layout -> the full single-rank weights, on one CPU process.

    find the tag ─► verify it (every file of the manifest there, with its size and sha256)
      ─► the run's config.yaml (its hash must be the one the checkpoint was saved with)
      ─► per model-parallel rank: the saved module tensors, overridden by the fp32 master weights
         where ZeRO ≥ 1 keeps them (``deepspeed_shards.py``); expert-parallel experts stacked by id
      ─► pipeline stages: their names united (a stage is the pruned model, names unchanged)
      ─► tensor parallelism: the slices joined along their split dim (and stride), read off the
         parallel code itself: the plain model, built on the meta device, split by
         ``apply_tensor_parallel`` the way the trainer split it; the vocabulary padding cut
      ─► the plain model's ``state_dict()`` names (``XoronLLM``, or ``XoronMultimodalModel`` when the
         run trained one), one tensor at a time

``read_full_moments`` joins Adam's moments (``exp_avg``, ``exp_avg_sq``) the same way, from the same
optimizer files (``moment_shards.py``), for the trainer's reshard.

The world size of the run is never started: the files are memory-mapped and each full tensor is
built from its pieces alone, so the peak memory is the output (one fp32 copy of the model) plus
the largest tensor (README, Export, has the measured numbers).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xoron_dist.config import ConfigError, XoronConfig, load_config
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.lora import apply_lora
from xoron_dist.model.xoron import XoronMultimodalModel, build_model
from xoron_dist.train.checkpoint import (
    _TAG_RE,
    LATEST_FILE,
    STATE_FILE,
    CheckpointError,
    complete_tags,
    config_for_hash,
    config_hash,
    resolve_tag,
    verified_manifest,
)
from xoron_dist.train.deepspeed_shards import (
    ConsolidationError,
    RankGrid,
    RankState,
    load_file,
    model_file,
    module_state,
    require_files,
    stack_experts,
    zero3_masters,
    zero12_masters,
    zero_file,
)
from xoron_dist.train.moment_shards import MOMENTS, RankMoments, zero3_moments, zero12_moments

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"


@dataclass
class ConsolidatedCheckpoint:
    """The full weights of a checkpoint: ``state`` has the plain model's ``state_dict()`` names and
    shapes (``llm.*``, ``vision.*``, ... when ``multimodal``), fp32 (or the dtype the model builds in)."""

    cfg: XoronConfig
    state: dict[str, torch.Tensor]
    multimodal: bool
    step: int = 0
    source: str = ""  # the layout it was read from, and which weights
    checkpoint: Path | None = None
    run_dir: Path | None = None

    def build_model(self) -> nn.Module:
        """The plain model with these weights (eval mode)."""
        model = XoronMultimodalModel(self.cfg) if self.multimodal else XoronLLM(self.cfg.llm)
        if self.cfg.model.lora.enabled:
            apply_lora(model, self.cfg.model.lora)
        model.load_state_dict(self.state, strict=True)
        return model.eval()


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint tag directory ``path`` names: a tag (``.../checkpoints/step00000120``), a
    checkpoints folder (its ``latest``), or a run directory (its ``checkpoints/latest``)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path.is_dir() and _TAG_RE.match(path.name)):
        return path  # a tag; verification names what an unfinished one lacks
    for root in (path / "checkpoints", path):
        if root.is_dir() and ((root / LATEST_FILE).is_file() or complete_tags(root)):
            return root / resolve_tag(root)
    if not path.exists():
        raise ConsolidationError(f"checkpoint {path} does not exist")
    raise ConsolidationError(f"{path} holds no checkpoint: give a tag directory (runs/<name>/checkpoints/stepNNNNNNNN, "
                             f"with {STATE_FILE}), its checkpoints folder or the run directory")


def run_config(run_dir: Path, saved_hash: str, tag_dir: Path) -> XoronConfig:
    """The run's resolved config (``<run>/config.yaml``), checked against the checkpoint's config hash."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConsolidationError(f"{path} is missing: the run's resolved config, which xoron train writes beside "
                                 f"checkpoints/, tells how {tag_dir} is laid out")
    try:
        cfg = load_config(path)
    except ConfigError as err:
        raise ConsolidationError(f"{path}: {err}") from None
    if not saved_hash:
        return cfg
    found = config_for_hash(saved_hash, cfg)  # the run's layout, or that of a stage with its own
    if found is None:
        raise ConsolidationError(
            f"{tag_dir} holds another model config: it was saved with model/parallel config hash {saved_hash}, "
            f"{path} hashes to {config_hash(cfg)} (config.yaml edited, or the run directory reused)")
    return found


def consolidate(path: str | Path) -> ConsolidatedCheckpoint:
    """The full single-rank weights of the checkpoint at ``path`` (see ``find_checkpoint``), from any
    layout the trainer writes. Raises ``ConsolidationError`` (one line: the path and what is wrong) for
    a missing or damaged file, a checkpoint of another model config, or a layout it cannot read."""
    tag_dir = find_checkpoint(path)
    try:
        meta = verified_manifest(tag_dir)
    except CheckpointError as err:
        raise ConsolidationError(str(err)) from None
    cfg = run_config(tag_dir.parent.parent, meta["state"].get("config_hash", ""), tag_dir)
    reader = _LayoutReader(tag_dir, cfg, meta["world_size"])
    state = dict(reader.full_tensors())
    logger.info("consolidated %s: %d tensors from %s", tag_dir, len(state), reader.describe())
    return ConsolidatedCheckpoint(cfg, state, reader.multimodal, int(meta["state"]["step"]), reader.describe(),
                                  tag_dir, tag_dir.parent.parent)


def read_full_tensors(tag_dir: Path, cfg: XoronConfig, world_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of the checkpoint ``tag_dir``, saved by ``world_size`` ranks in ``cfg``'s layout,
    one tensor at a time; for callers that verified the files and know the saving run's config
    (the trainer's reshard, ``xoron_dist/train/reshard.py``)."""
    return _LayoutReader(Path(tag_dir), cfg, world_size).full_tensors()


@dataclass
class FullMoments:
    """Adam's moments of a checkpoint as full tensors: ``moments[key][name]`` (key ``exp_avg`` /
    ``exp_avg_sq``; the plain model's names and shapes, like the weights) and Adam's ``step`` count.
    Tensors the optimizer held no moments for (buffers, frozen weights) are absent."""

    moments: dict[str, dict[str, torch.Tensor]]
    step: int


def read_full_moments(tag_dir: Path, cfg: XoronConfig, world_size: int) -> FullMoments:
    """Adam's moments of the checkpoint ``tag_dir`` (saved by ``world_size`` ranks in ``cfg``'s layout),
    joined exactly as ``read_full_tensors`` joins the fp32 masters (``moment_shards.py`` says which
    layouts hold readable moments; the others raise ``ConsolidationError`` naming why)."""
    return _LayoutReader(Path(tag_dir), cfg, world_size).full_moments()


class _LayoutReader:
    """One checkpoint's files, read per model-parallel rank and joined into the plain model's tensors."""

    def __init__(self, tag_dir: Path, cfg: XoronConfig, world: int) -> None:
        p = cfg.parallel
        self.tag_dir, self.cfg, self.zero = tag_dir, cfg, p.zero_stage
        if world % (p.tp * p.pp * p.sp):
            raise ConsolidationError(f"{tag_dir} was saved by {world} ranks, which tp·pp·sp = {p.tp * p.pp * p.sp} "
                                     "of its config does not divide: the checkpoint holds another layout")
        if p.sp > 1 and self.zero > 0:
            raise ConsolidationError(f"{tag_dir}: consolidating a sequence-parallel run (parallel.sp = {p.sp}) under "
                                     f"ZeRO-{self.zero} is not built yet (its partitions span data x sequence ranks)")
        self.grid = RankGrid(p.tp, p.pp, p.sp, p.ep, world)
        self.bf16 = self.zero in (1, 2) and (tag_dir / zero_file(0, 0, "optim", bf16=True)).is_file()
        require_files(tag_dir, self._expected_files(), f"ZeRO-{self.zero} on {self._layout()}")
        first = load_file(tag_dir / (zero_file(0, 0, "model") if self.zero == 3 else model_file(0)))["module"]
        self.multimodal = any(name.startswith("llm.") for name in first)
        self.plain = _meta_model(cfg, self.multimodal)
        # the routed experts expert parallelism spreads (``parallel.experts.apply_expert_parallel``) -> count
        self.num_experts = {f"{name}.experts": m.experts.num_experts for name, m in self.plain.named_modules()
                            if isinstance(m, MoEFeedForward)}

    def _layout(self) -> str:
        g = self.grid
        return f"{g.world} ranks (dp {g.dp} x tp {g.tp} x pp {g.pp} x sp {g.sp}; ep {g.ep})"

    def describe(self) -> str:
        weights = "fp32 master weights" if self.zero > 0 else "module weights"
        return f"ZeRO-{self.zero} on {self._layout()}, {weights}"

    def _expected_files(self) -> list[str]:
        mps = range(self.grid.tp * self.grid.pp)
        if self.zero == 3:
            return [zero_file(d, m, kind) for m in mps for d in range(self.grid.dp) for kind in ("model", "optim")]
        names = [model_file(m) for m in mps]
        if self.zero > 0:
            names += [zero_file(d, m, "optim", self.bf16) for m in mps for d in range(self.grid.dp)]
        return names

    def rank_state(self, mp: int) -> RankState:
        """Model-parallel rank ``mp``'s tensors: module tensors, then the fp32 masters over them."""
        state = module_state(self.tag_dir, mp, self.zero)
        local = {moe: count // self.grid.ep for moe, count in self.num_experts.items()}
        if self.zero in (1, 2):
            shapes = {name: tuple(piece().shape) for name, piece in state.items()}
            state.update(zero12_masters(self.tag_dir, mp, self.grid, shapes, local, self.bf16))
        elif self.zero == 3:
            state.update(zero3_masters(self.tag_dir, mp, self.grid, local))
        return stack_experts(state, self.num_experts)

    def rank_moments(self, mp: int) -> RankMoments:
        """Model-parallel rank ``mp``'s Adam moments, experts stacked as the weights are."""
        local = {moe: count // self.grid.ep for moe, count in self.num_experts.items()}
        if self.zero in (1, 2):
            shapes = {name: tuple(piece().shape) for name, piece in module_state(self.tag_dir, mp, self.zero).items()}
            found = zero12_moments(self.tag_dir, mp, self.grid, shapes, local, self.bf16)
        elif self.zero == 3:
            found = zero3_moments(self.tag_dir, mp, self.grid, local)
        else:
            raise ConsolidationError(
                f"{self.tag_dir}: a ZeRO-0 checkpoint's optimizer state is torch's state_dict, keyed by position in "
                "parameter groups that no file names, so its moments cannot be matched to their parameters; it "
                "can be resharded with fresh moments (train.reshard_optimizer=false), or saved under ZeRO 1-3")
        return RankMoments({key: stack_experts(state, self.num_experts) for key, state in found.states.items()},
                           found.step)

    def full_moments(self) -> FullMoments:
        """Every rank's moments joined over pipeline stages and tensor-parallel slices, by plain-model name."""
        ranks = {mp: self.rank_moments(mp) for mp in range(self.grid.tp * self.grid.pp)}
        steps = {found.step for found in ranks.values()}
        if len(steps) != 1:
            raise ConsolidationError(f"{self.tag_dir}: the model-parallel ranks' optimizer files hold different Adam "
                                     f"step counts {sorted(steps)} (files from different saves)")
        moments = {key: dict(self._joined(self.tp_states(lambda mp, key=key: ranks[mp].states[key]),
                                          complete=False, what="Adam moments of "))
                   for key in MOMENTS}
        return FullMoments(moments, steps.pop())

    def tp_states(self, read: Callable[[int], RankState] | None = None) -> list[RankState]:
        """Per tensor-parallel rank, its pipeline stages' tensors together (``read``: a model-parallel rank's
        tensors; default its fp32 masters, ``rank_state``)."""
        read = read or self.rank_state
        tp, pp = self.grid.tp, self.grid.pp
        states: list[RankState] = [{} for _ in range(tp)]
        for stage in range(pp):
            for t in range(tp):
                states[t].update(read(stage * tp + t))
        return states

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) in the plain model's ``state_dict()`` order."""
        yield from self._joined(self.tp_states(), complete=True, what="")

    def _joined(self, states: list[RankState], *, complete: bool, what: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(plain-model name, full tensor) from per-TP-rank ``states``, in ``state_dict()`` order; a name the
        states lack is an error when ``complete``, else skipped. A state the plain model does not have is an
        error (``what`` names the kind in its message)."""
        splits = _tp_splits(self.cfg, self.multimodal) if self.grid.tp > 1 else {}
        twins = _tied_twins(self.plain)
        used = set()
        for name, ref in self.plain.state_dict().items():
            source = name if name in states[0] else twins.get(name, name)
            if source not in states[0]:
                if not complete:
                    continue
                raise ConsolidationError(f"{self.tag_dir} holds another model config: it has no '{name}', which the "
                                         f"run's config builds")
            used.add(source)
            yield name, self._full(name, [s.get(source) for s in states], splits.get(name), ref)
        extra = sorted(set(states[0]) - used)
        if extra:
            raise ConsolidationError(f"{self.tag_dir} holds another model config: {what}{len(extra)} tensor(s) the "
                                     f"run's config does not build, e.g. '{extra[0]}'")

    def _full(self, name: str, pieces: list, split: tuple[int, int] | None, ref: torch.Tensor) -> torch.Tensor:
        if split is None:
            tensor = pieces[0]()
        else:
            if any(piece is None for piece in pieces):
                raise ConsolidationError(f"{self.tag_dir}: '{name}' is missing on tensor-parallel rank "
                                         f"{pieces.index(None)}")
            tensor = _join_tp([piece() for piece in pieces], *split)
        if tensor.shape != ref.shape:
            tensor = _cut_padding(tensor, ref, name, self.tag_dir)
        return tensor.to(ref.dtype).clone()


def _join_tp(slices: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``parallel.tensor.tp_slice``: each rank holds its share of each of ``stride`` blocks."""
    blocks = [s.chunk(stride, dim=dim) for s in slices]
    return torch.cat([blocks[r][b] for b in range(stride) for r in range(len(slices))], dim=dim)


def _cut_padding(tensor: torch.Tensor, ref: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    """The vocabulary rows beyond the plain model's (tensor parallelism pads to a multiple of pad · tp)."""
    if tensor.ndim == ref.ndim and tensor.shape[1:] == ref.shape[1:] and tensor.shape[0] > ref.shape[0]:
        return tensor[: ref.shape[0]]
    raise ConsolidationError(f"{where} holds another model config: '{name}' is {tuple(tensor.shape)}, the run's "
                             f"config builds {tuple(ref.shape)}")


def _meta_model(cfg: XoronConfig, multimodal: bool) -> nn.Module:
    """The plain model the trainer built (no memory: meta device)."""
    with torch.device("meta"):
        model = build_model(cfg) if multimodal else XoronLLM(cfg.llm)
        if cfg.model.lora.enabled:  # the adapters the trainer added (model/lora.py)
            apply_lora(model, cfg.model.lora)
    if multimodal != isinstance(model, XoronMultimodalModel):
        raise ConsolidationError("the checkpoint holds a multimodal model (llm.* names) but the run's config enables "
                                 "no encoder or generator: another model config")
    return model


def _tp_splits(cfg: XoronConfig, multimodal: bool) -> dict[str, tuple[int, int]]:
    """name -> (dim, stride) of every tensor-parallel split parameter, as ``apply_tensor_parallel``
    marks them (Megatron's ``partition_dim``/``partition_stride``) on the meta model."""
    from xoron_dist.model.sharding import tensor_plan
    from xoron_dist.parallel.tensor import apply_tensor_parallel

    model = _meta_model(cfg, multimodal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_tensor_parallel(model, tensor_plan(model, cfg), 0, cfg.parallel.tp)
    return {name: (p.partition_dim, p.partition_stride) for name, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "tensor_model_parallel", False)}


def _tied_twins(model: nn.Module) -> dict[str, str]:
    """Each name of a tied parameter -> its first name (DeepSpeed keeps one of them in ZeRO-3 files)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {other: group[0] for group in names.values() for other in group[1:]}


def parameter_counts(state: dict[str, Any], multimodal: bool) -> dict[str, int]:
    """Parameters (tensor elements; buffers included) per part: ``llm``, then each multimodal part."""
    counts: dict[str, int] = {}
    for name, tensor in state.items():
        part = name.split(".")[0] if multimodal else "llm"
        counts[part] = counts.get(part, 0) + tensor.numel()
    return counts


__all__ = ["ConsolidatedCheckpoint", "ConsolidationError", "FullMoments", "consolidate", "find_checkpoint",
           "parameter_counts", "read_full_moments", "read_full_tensors", "run_config"]
