"""The one owner of process groups: start torch.distributed, DeepSpeed's comm layer and Megatron-core's groups.

Every rank, whichever launcher started it, calls

    ctx = initialize(cfg)              # discover ranks -> device -> validate layouts -> groups
    engine, *_ = deepspeed.initialize(model=..., mpu=mpu(), config=...)
    ...
    ctx = switch_layout(stage_cfg)     # a curriculum stage with its own layout: new groups, same world
    ...
    destroy()

The layouts (the run's and every curriculum stage's own) are validated before any process group
exists, so a wrong layout fails on every rank with the same message and leaves nothing to tear down;
``initialize`` builds the first stage's. ``switch_layout`` destroys the model-parallel groups (and
Megatron-core's and DeepSpeed's references to them) and builds another layout's on the same world;
torch.distributed's default group and the device stay. After ``initialize`` every other module
asks Megatron-core's ``parallel_state`` (or this module's ``ParallelContext``) for its group and
rank; nothing else creates groups.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from xoron_dist.config import XoronConfig
from xoron_dist.parallel.device import DeviceInfo, detect_device, set_matmul_precision, share_cpu_threads
from xoron_dist.parallel.experts import register_expert_groups
from xoron_dist.parallel.launcher_env import LaunchError, RankInfo, discover_ranks
from xoron_dist.parallel.layout import Layout, validate_layout, validate_layouts

with warnings.catch_warnings():
    # megatron.core's package import warns, once per rank, that Transformer Engine and apex are
    # absent; we use neither of its fused paths, so the warning is noise on every CPU run.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelContext:
    """What ``initialize`` found and built: ranks, device, and the validated layout."""

    rank_info: RankInfo
    device_info: DeviceInfo
    layout: Layout

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one rank that writes TensorBoard, progress bars and run files."""
        return self.rank_info.rank == 0

    @property
    def rank(self) -> int:
        return self.rank_info.rank

    @property
    def world_size(self) -> int:
        return self.rank_info.world_size

    @property
    def device(self) -> torch.device:
        return self.device_info.device

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard (sequence-parallel peers share a shard)."""
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    @property
    def sp_rank(self) -> int:
        return parallel_state.get_context_parallel_rank()

    @property
    def sp_size(self) -> int:
        return parallel_state.get_context_parallel_world_size()

    @property
    def pipeline_group(self) -> dist.ProcessGroup:
        """The ranks holding the pipeline stages of one model replica."""
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def embedding_group(self) -> dist.ProcessGroup | None:
        """The first and last pipeline stage of this rank's (dp, tp, sp) position (Megatron-core's
        embedding group, made by ``initialize_model_parallel``): the two copies of tied word embeddings
        sum their gradients over it (``pipeline/tied.py``). None on middle stages."""
        return parallel_state.get_embedding_group(check_initialized=False)

    @property
    def token_group(self) -> dist.ProcessGroup:
        """The ranks that hold distinct tokens of a step (data x sequence parallel): token counts,
        losses and expert loads are summed over it."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)


_CONTEXT: ParallelContext | None = None


def initialize(cfg: XoronConfig) -> ParallelContext:
    """Join the job: discover ranks, pick the device, validate the layout, then create every group.

    Raises ``LaunchError`` (environment), ``ConfigError``/``LayoutError`` (config vs. hardware/world)
    before any group exists.
    """
    global _CONTEXT
    if _CONTEXT is not None or dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized; xoron_dist.parallel.state.initialize owns the process "
            "groups and runs once per process (call destroy() first)"
        )
    rank_info = discover_ranks()
    device_info = detect_device(rank_info.local_rank, cfg.train.precision)
    layout = validate_layouts(cfg, rank_info.world_size)[0]  # every stage's checked; the first stage's built
    accelerator = get_accelerator().device_name()
    if accelerator != device_info.kind:
        raise LaunchError(
            f"DeepSpeed selected the '{accelerator}' accelerator but torch computes on '{device_info.kind}'; "
            f"unset DS_ACCELERATOR or set DS_ACCELERATOR={device_info.kind}"
        )
    _export_environ(rank_info)
    if device_info.kind == "cuda":
        torch.cuda.set_device(device_info.device)
    set_matmul_precision(device_info.kind, cfg.train.tf32)
    share_cpu_threads(device_info.kind, rank_info.local_world_size)

    if device_info.kind == "cpu":
        _skip_cpu_shm_comm_build()
    timeout = timedelta(minutes=cfg.train.dist_timeout_minutes)
    _default_group_timeout(timeout)
    ds_comm.init_distributed(
        dist_backend=device_info.backend,
        auto_mpi_discovery=False,  # discover_ranks already read the launcher
        verbose=False,
        timeout=timeout,
        init_method=_init_method(rank_info),
        rank=rank_info.rank,
        world_size=rank_info.world_size,
    )
    try:
        _build_groups(layout, cfg)
        _seed(cfg.train.seed, device_info)
    except BaseException:
        destroy()
        raise
    _CONTEXT = ParallelContext(rank_info, device_info, layout)
    threads = f", {torch.get_num_threads()} threads" if device_info.kind == "cpu" else ""
    logger.info("joined %s job as rank %d/%d on %s (%s, %s%s): %s", rank_info.launcher, rank_info.rank,
                rank_info.world_size, device_info.device, device_info.backend, device_info.dtype, threads,
                layout.describe())
    return _CONTEXT


def switch_layout(cfg: XoronConfig) -> ParallelContext:
    """Re-form the model-parallel groups for ``cfg.parallel`` on the same world (a curriculum stage with
    its own layout; ``cfg``: ``layout.stage_layout_config``). Every rank calls it, after the previous
    layout's DeepSpeed engines are destroyed; the default group, device and RNG stay as they are."""
    global _CONTEXT
    ctx = get_context()
    layout = validate_layout(cfg, ctx.world_size)
    _destroy_groups()
    try:
        _build_groups(layout, cfg)
    except BaseException:
        destroy()
        raise
    _CONTEXT = ParallelContext(ctx.rank_info, ctx.device_info, layout)
    logger.info("switched to the layout %s", layout.describe())
    return _CONTEXT


def _build_groups(layout: Layout, cfg: XoronConfig) -> None:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.sp,
        expert_model_parallel_size=layout.ep,
        distributed_timeout_minutes=cfg.train.dist_timeout_minutes,
    )
    if layout.ep > 1:
        register_expert_groups(layout.ep)  # DeepSpeed uses Megatron's expert groups, builds none


def _destroy_groups() -> None:
    """Destroy the model-parallel groups and forget them: Megatron-core's (its globals, RNG tracker and
    buffers) and the references DeepSpeed keeps (its ``mpu``, expert and ZeRO groups), so that nothing
    can reach a group of the previous layout. Each group is destroyed (its communicator freed: on GPUs an
    NCCL communicator holds device memory); ``destroy_model_parallel`` destroys only its gloo groups."""
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d

    made = _megatron_groups()
    if parallel_state.is_initialized():
        parallel_state.destroy_model_parallel()
    groups._release_process_group_references(None)  # what deepspeed.comm does at its own teardown
    registered = distributed_c10d._world.pg_map  # destroy_model_parallel destroyed its gloo groups itself
    for group in made:
        if group in registered:
            dist.destroy_process_group(group)


def _megatron_groups() -> list[dist.ProcessGroup]:
    """Every process group Megatron-core's ``parallel_state`` holds for this rank (its ``_*GROUP*``
    globals, single or in lists), once each, without the default group."""
    found: dict[int, dist.ProcessGroup] = {}
    for name, value in vars(parallel_state).items():
        if not (name.startswith("_") and "GROUP" in name):
            continue
        for group in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(group, dist.ProcessGroup) and group is not dist.GroupMember.WORLD:
                found[id(group)] = group
    return list(found.values())


def get_context() -> ParallelContext:
    if _CONTEXT is None:
        raise RuntimeError("xoron_dist.parallel.state.initialize(cfg) has not run in this process")
    return _CONTEXT


def is_initialized() -> bool:
    return _CONTEXT is not None


def destroy() -> None:
    """Tear down Megatron-core's groups, DeepSpeed's references and torch.distributed. Idempotent.

    No barrier: ranks that failed must be able to leave too. Callers that finish normally and
    need peers to stay reachable (rank 0 hosts the rendezvous store) synchronise first.
    """
    global _CONTEXT
    _CONTEXT = None
    _default_group_timeout(None)
    if parallel_state.is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # also drops deepspeed.utils.groups' references (its mpu)
        else:
            dist.destroy_process_group()


def mpu() -> DeepSpeedMPU:
    """The ``mpu`` to pass to ``deepspeed.initialize``: DeepSpeed then uses our groups."""
    get_context()
    return DeepSpeedMPU()


class DeepSpeedMPU:
    """Megatron-core ``parallel_state`` seen through DeepSpeed's ``mpu`` protocol.

    DeepSpeed calls these names (grep ``mpu.`` in deepspeed/); Megatron-core 0.16 lacks the
    ``get_model_parallel_rank/world_size``, ``pipe``/``slice`` and ``sequence`` ones. Mapping:

    - model parallel = Megatron's tp x pp group; rank and size within it, as in DeepSpeed's own
      ``PipelineParallelGrid`` (it names checkpoint files ``mp_rank_XX``).
    - data parallel = Megatron's dp group *without* the sequence ranks: DeepSpeed sizes the global
      batch with it (sequence-parallel peers share a sample).
    - sequence parallel = Megatron's context-parallel group (our ring attention);
      sequence-data parallel = dp x sp, over which DeepSpeed partitions ZeRO state and reduces
      gradients (weights are replicated across sequence ranks).
    - slice parallel = tensor parallel (DeepSpeed's older name for it).

    It deliberately has no ``initialize_sequence_parallel``: DeepSpeed takes that attribute as the
    mark of a Ulysses-only mpu and then ignores its model-parallel group.
    """

    # model parallel (tp x pp)
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    # tensor parallel
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # pipeline parallel
    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # data parallel (without the sequence-parallel ranks)
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # sequence parallel (Megatron's context parallel) and sequence x data parallel
    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_context_parallel_group()

    def get_sequence_parallel_rank(self) -> int:
        return parallel_state.get_context_parallel_rank()

    def get_sequence_parallel_world_size(self) -> int:
        return parallel_state.get_context_parallel_world_size()

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def _skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    ``init_distributed`` on the CPU accelerator compiles ``deepspeed_shm_comm`` on first use
    (25-75 s per machine) to speed up intra-node CPU collectives; CPU runs here are smoke tests
    and CI, where gloo is fast enough, so the compile would be pure start-up cost.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _default_group_timeout(timeout: timedelta | None) -> None:
    """The collective timeout of every group made without one: ours and Megatron's pass
    ``train.dist_timeout_minutes`` explicitly, DeepSpeed's ``dist.new_group(ranks)`` calls do not and
    would wait torch's default (30 minutes on gloo). ``None``: torch's defaults again."""
    from torch.distributed import constants, distributed_c10d

    distributed_c10d.default_pg_timeout = timeout or constants.default_pg_timeout
    if constants.default_pg_nccl_timeout is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout or constants.default_pg_nccl_timeout


def _export_environ(info: RankInfo) -> None:
    """Publish the discovered ranks the way deepspeed/torchrun would: DeepSpeed's engine reads
    ``LOCAL_RANK`` from the environment, and SLURM/MPI launches do not set it."""
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )


def _init_method(info: RankInfo) -> str:
    host = f"[{info.master_addr}]" if ":" in info.master_addr else info.master_addr
    return f"tcp://{host}:{info.master_port}"  # port 0 (world 1 only): the store takes any free port


def _seed(seed: int, device: DeviceInfo) -> None:
    """Same default RNG on every rank (identical initial weights before DeepSpeed's broadcast).

    On CUDA also Megatron's RNG tracker (per-TP-rank streams for TP-sharded init and dropout).
    Its tracker stores CUDA generator states only, so on CPU it is not seeded: TP layers there
    must be built with ``ModelParallelConfig(use_cpu_initialization=True)``, which initialises
    the full weight from the CPU generator and slices it, and must not fork the tracker.
    """
    torch.manual_seed(seed)
    if device.kind == "cuda":
        megatron_random.model_parallel_cuda_manual_seed(seed)


__all__ = ["DeepSpeedMPU", "ParallelContext", "destroy", "get_context", "initialize", "is_initialized", "mpu",
           "switch_layout"]
