"""Who else is converting: one process, or the ranks of an MPI job (``mpiexec -n N xoron prep ...``).

mpi4py is imported only when a launcher's environment says the job has more than one rank, so
a plain ``xoron prep`` never initialises MPI (and never needs an MPI runtime).
"""

from __future__ import annotations

import os
from typing import Any

# Set by the launchers for every rank: Open MPI, MPICH/Hydra (also Intel MPI), MVAPICH, Slurm's srun.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


class Ranks:
    """A single process: rank 0 of 1. The collectives just return their input."""

    rank = 0
    size = 1

    def bcast(self, value: Any) -> Any:
        return value

    def gather(self, value: Any) -> list[Any] | None:
        return [value]

    def barrier(self) -> None:
        pass


class MpiRanks(Ranks):
    """The ranks of ``MPI.COMM_WORLD``; objects travel pickled (plans, unit results: small)."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def bcast(self, value: Any) -> Any:
        return self.comm.bcast(value, root=0)

    def gather(self, value: Any) -> list[Any] | None:
        return self.comm.gather(value, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()


def launched_size(environ: dict[str, str] | None = None) -> int:
    """The world size a launcher announced in the environment (1 when there is none)."""
    environ = os.environ if environ is None else environ
    for name in MPI_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def detect_ranks() -> Ranks:
    """``MpiRanks`` under an MPI/srun launch of more than one rank, else a single ``Ranks``."""
    return MpiRanks() if launched_size() > 1 else Ranks()
