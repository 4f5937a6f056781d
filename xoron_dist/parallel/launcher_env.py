"""Who am I in the job? Rank, world size and rendezvous address from whichever launcher started us.

Every launcher describes the job in its own environment variables:

- ``deepspeed`` (also with ``--hostfile``) and ``torchrun``: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; torchrun adds ``LOCAL_WORLD_SIZE``,
  deepspeed ``LOCAL_SIZE``.
- ``srun`` (SLURM): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, tasks per node and
  ``SLURM_JOB_NODELIST``; rank 0 runs on the first host of the node list.
- ``mpirun``/``mpiexec``: ``OMPI_COMM_WORLD_*`` (Open MPI), ``PMI_RANK``/``PMI_SIZE`` and
  ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS`` (MPICH/hydra, Intel MPI); where the rendezvous address
  is not exported, rank 0 broadcasts it through mpi4py.

``discover_ranks`` reads them into one ``RankInfo``. It is a pure function of the environment
except where MPI has to be asked (the mpi4py fallback), so each launcher's case is a unit test.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500

# Signs that an MPI launcher started us even though it exported no rank variable we read
# directly (PMIx-only launches, hydra without PMI_RANK): then mpi4py's COMM_WORLD decides.
_MPI_MARKERS = ("PMIX_RANK", "PMIX_NAMESPACE", "PMI_FD", "PMI_PORT", "HYDI_CONTROL_FD", "MPI_LOCALNRANKS")


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent or incomplete. The message names the variables."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job.

    ``master_port`` 0 (single process only) means "any free port": nobody else has to find it.
    ``launcher``: deepspeed | torchrun | env | slurm | openmpi | mpich | mpi | single.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover_ranks(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Read rank, world size, local rank and rendezvous address from the launcher's environment.

    Precedence: ``RANK``/``WORLD_SIZE`` (deepspeed, torchrun, hand-set), then MPI
    (Open MPI, MPICH/PMI), then SLURM, then mpi4py when only MPI markers are present; a process
    with none of these is a world of one. MPI comes before SLURM because ``mpirun`` inside an
    ``sbatch`` allocation inherits the batch step's stale ``SLURM_PROCID=0`` on every rank;
    when both describe the same rank (``srun --mpi=pmi2``) SLURM is used, as it needs no MPI call.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_env(env)
    mpi = _mpi_ranks(env)
    if mpi is not None:
        if "SLURM_PROCID" in env and _slurm_rank_and_size(env) == (mpi[0], mpi[1]):
            return _from_slurm(env)
        return _from_mpi(env, *mpi)
    if "SLURM_PROCID" in env:
        return _from_slurm(env)
    if any(name in env for name in _MPI_MARKERS):
        return _from_mpi4py(env)
    return RankInfo(0, 1, 0, 1, "127.0.0.1", _port(env, default=0), "single")


# --------------------------------------------------------------------------- torchrun / deepspeed


def _from_torch_env(env: Mapping[str, str]) -> RankInfo:
    for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if name in env and other not in env:
            raise LaunchError(
                f"{name}={env[name]} is set but {other} is not; a launcher sets both "
                f"(deepspeed, torchrun). Set {other} too, or unset {name} for a single process."
            )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        launcher = "torchrun"
    elif "LOCAL_SIZE" in env or "CROSS_RANK" in env:
        launcher = "deepspeed"
    else:
        launcher = "env"
    if world > 1 and not env.get("MASTER_ADDR"):
        raise LaunchError(
            f"WORLD_SIZE={world} but MASTER_ADDR is not set: every rank needs the address of rank 0's "
            f"host to meet there. Export MASTER_ADDR (and MASTER_PORT), or start with deepspeed/torchrun."
        )
    master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
    local_world = _first_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    if local_world is None:
        if world > 1 and not _is_loopback(master_addr):
            raise LaunchError(
                f"RANK/WORLD_SIZE are set (WORLD_SIZE={world}, MASTER_ADDR={master_addr}) but nothing says "
                f"how many ranks run on this node: set LOCAL_WORLD_SIZE (torchrun and deepspeed set it, "
                f"or LOCAL_SIZE, for you)."
            )
        local_world = world  # every rank meets on this host
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
    elif local_world == world:
        local_rank = rank
    else:
        raise LaunchError(
            f"RANK={rank} is set but LOCAL_RANK is not, and this node runs {local_world} of {world} ranks: "
            f"set LOCAL_RANK (this rank's index on its node; it picks the GPU)."
        )
    _check_local(local_rank, local_world, world, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    port = _port(env, default=DEFAULT_MASTER_PORT if world > 1 else 0)
    return RankInfo(rank, world, local_rank, local_world, master_addr, port, launcher)


# --------------------------------------------------------------------------- MPI


def _mpi_ranks(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(rank, size, flavour) from the MPI launcher's own variables, or None."""
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _required_int(env, "OMPI_COMM_WORLD_SIZE", "Open MPI")
        _check_rank(rank, size, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
        return rank, size, "openmpi"
    if "PMI_RANK" in env:
        rank, size = _int(env, "PMI_RANK"), _required_int(env, "PMI_SIZE", "MPICH/PMI")
        _check_rank(rank, size, "PMI_RANK", "PMI_SIZE")
        return rank, size, "mpich"
    return None


def _from_mpi(env: Mapping[str, str], rank: int, world: int, flavour: str) -> RankInfo:
    if flavour == "openmpi":
        local_names = ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        local_names = ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    has_local = all(name in env for name in local_names)
    has_master = bool(env.get("MASTER_ADDR")) or world == 1
    if not (has_local and has_master):
        # The launcher left something out (local ranks, rendezvous address): MPI itself knows.
        info = _from_mpi4py(env)
        if (info.rank, info.world_size) != (rank, world):
            raise LaunchError(
                f"{flavour} variables say rank {rank} of {world} but mpi4py's COMM_WORLD says rank "
                f"{info.rank} of {info.world_size}: mpi4py is built against a different MPI than the "
                f"launcher. Use that MPI's mpirun, or export MASTER_ADDR and the local-rank variables."
            )
        return RankInfo(rank, world, info.local_rank, info.local_world_size, info.master_addr,
                        info.master_port, flavour)
    local_rank, local_world = _int(env, local_names[0]), _int(env, local_names[1])
    _check_local(local_rank, local_world, world, *local_names)
    master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env, default=DEFAULT_MASTER_PORT if world > 1 else 0)
    return RankInfo(rank, world, local_rank, local_world, master_addr, port, flavour)


def _from_mpi4py(env: Mapping[str, str]) -> RankInfo:
    """Ask MPI: COMM_WORLD for rank/size, a shared-memory split for the node, rank 0 for the address."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError(
            "started by an MPI launcher that did not export the rank variables this needs "
            "(MASTER_ADDR, local ranks) and mpi4py is not importable; install mpi4py, or export "
            "MASTER_ADDR/MASTER_PORT (mpirun -x, mpiexec -genv)"
        ) from err
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    master = None
    if rank == 0:
        master = _rank0_rendezvous(env, all_local=local_world == world)
    master_addr, master_port = comm.bcast(master, root=0)
    return RankInfo(rank, world, local_rank, local_world, master_addr, master_port, "mpi")


def _rank0_rendezvous(env: Mapping[str, str], all_local: bool) -> tuple[str, int]:
    """Rank 0 hosts the TCP store: its address, and a port that is free on it unless one was given."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], _port(env, default=DEFAULT_MASTER_PORT)
    addr = "127.0.0.1" if all_local else socket.gethostname()
    return addr, _port(env, default=0) or free_port()


def free_port(host: str = "") -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- SLURM


def _slurm_rank_and_size(env: Mapping[str, str]) -> tuple[int, int | None]:
    # The step's task count first: SLURM_NTASKS is the whole allocation's.
    return _int(env, "SLURM_PROCID"), _first_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")


def _from_slurm(env: Mapping[str, str]) -> RankInfo:
    rank, world = _slurm_rank_and_size(env)
    if world is None:
        raise LaunchError(
            f"SLURM_PROCID={rank} is set but none of SLURM_STEP_NUM_TASKS/SLURM_NTASKS/SLURM_NPROCS: "
            f"start the ranks with srun (sbatch --ntasks=N, srun python -m ...)."
        )
    _check_rank(rank, world, "SLURM_PROCID", "SLURM_NTASKS")
    local_rank = _first_int(env, "SLURM_LOCALID")
    if local_rank is None:
        if world > 1:
            raise LaunchError("SLURM_PROCID is set but SLURM_LOCALID is not: start the ranks with srun")
        local_rank = 0
    local_world = _slurm_local_world(env, world)
    _check_local(local_rank, local_world, world, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist_var = next(
            (n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None
        )
        if nodelist_var is None:
            if world > 1:
                raise LaunchError(
                    f"SLURM job with {world} tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
                    f"export MASTER_ADDR=<first node of the job>"
                )
            master_addr = "127.0.0.1"
        else:
            master_addr = expand_hostlist(env[nodelist_var], name=nodelist_var)[0]
    return RankInfo(rank, world, local_rank, local_world, master_addr, _slurm_port(env, world), "slurm")


def _slurm_local_world(env: Mapping[str, str], world: int) -> int:
    per_node = _first_int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is not None:
        return per_node
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name):
            counts = expand_tasks_per_node(env[name], name=name)
            node = _first_int(env, "SLURM_NODEID") or 0
            if node >= len(counts):
                raise LaunchError(f"SLURM_NODEID={node} but {name}={env[name]!r} lists {len(counts)} nodes")
            return counts[node]
    if world == 1:
        return 1
    raise LaunchError(
        "SLURM job without SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE: start the ranks with srun "
        "(sbatch --ntasks-per-node=N)"
    )


def _slurm_port(env: Mapping[str, str], world: int) -> int:
    """MASTER_PORT, else one derived from the job id so that every task derives the same port
    without talking, and concurrent jobs on a node rarely collide (range 10000-29999, below
    Linux's ephemeral ports)."""
    if env.get("MASTER_PORT"):
        return _port(env, default=DEFAULT_MASTER_PORT)
    job = _first_int(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job is None:
        return DEFAULT_MASTER_PORT if world > 1 else 0
    return 10000 + job % 20000


def expand_hostlist(text: str, name: str = "nodelist") -> list[str]:
    """Expand a SLURM host list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Supports several bracket groups per host (``rack[1-2]-n[1-2]`` -> cartesian product) and keeps
    zero padding (``[08-10]`` -> 08 09 10). ``scontrol show hostnames`` does the same, but
    scontrol is not on every compute node.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip(), name):
        if not item:
            continue
        pieces = re.split(r"\[([^\[\]]*)\]", item)
        if any(c in piece for piece in pieces[::2] for c in "[]"):
            raise LaunchError(f"{name}={text!r}: unbalanced brackets in {item!r}")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, text, name) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise LaunchError(f"{name}={text!r} names no host")
    return hosts


def _split_top_level(text: str, name: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"{name}={text!r}: unbalanced ']' at position {i}")
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise LaunchError(f"{name}={text!r}: unclosed '['")
    items.append(text[start:].strip())
    return items


def _expand_ranges(spec: str, text: str, name: str) -> list[str]:
    out = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise LaunchError(f"{name}={text!r}: cannot read the range {part!r} (expected N or N-M)")
        lo_text, hi_text = match.group(1), match.group(2) or match.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise LaunchError(f"{name}={text!r}: range {part!r} runs backwards")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def expand_tasks_per_node(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]: SLURM's run-length form of tasks per node."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise LaunchError(f"{name}={text!r}: cannot read {part!r} (expected N or N(xK))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# --------------------------------------------------------------------------- helpers


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value.strip())
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name)
    return None


def _required_int(env: Mapping[str, str], name: str, launcher: str) -> int:
    if name not in env:
        raise LaunchError(f"{launcher} launch without {name}: the launcher's environment is incomplete")
    return _int(env, name)


def _port(env: Mapping[str, str], default: int) -> int:
    """MASTER_PORT or ``default``. 0 ("any free port") is accepted only where the default is 0,
    i.e. for a world of one, where nobody else has to find the port."""
    if not env.get("MASTER_PORT"):
        return default
    port = _int(env, "MASTER_PORT")
    lowest = 0 if default == 0 else 1
    if not lowest <= port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port ({lowest}-65535)")
    return port


def _check_rank(rank: int, world: int, rank_name: str, world_name: str) -> None:
    if world < 1:
        raise LaunchError(f"{world_name}={world}: a job has at least one rank")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_name}={rank} is outside 0..{world_name}-1 ({world_name}={world})")


def _check_local(local_rank: int, local_world: int, world: int, rank_name: str, size_name: str) -> None:
    if not 1 <= local_world <= world:
        raise LaunchError(f"{size_name}={local_world} must be between 1 and the world size ({world})")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{rank_name}={local_rank} is outside 0..{size_name}-1 ({size_name}={local_world})")


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


__all__ = ["DEFAULT_MASTER_PORT", "LaunchError", "RankInfo", "discover_ranks", "expand_hostlist",
           "expand_tasks_per_node", "free_port"]
