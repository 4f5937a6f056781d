"""Each launcher's environment -> RankInfo; SLURM host lists; errors that name the variables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xoron_dist.parallel.launcher_env import (
    LaunchError,
    RankInfo,
    discover_ranks,
    expand_hostlist,
    expand_tasks_per_node,
)

TORCH_ENV = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}


def test_single_process_without_launcher_is_world_of_one():
    assert discover_ranks({"HOME": "/root"}) == RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")


def test_torchrun():
    env = {**TORCH_ENV, "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "none"}
    assert discover_ranks(env) == RankInfo(3, 8, 1, 2, "10.0.0.5", 29400, "torchrun")


def test_deepspeed_launcher_with_hostfile():
    env = {**TORCH_ENV, "LOCAL_SIZE": "4", "CROSS_RANK": "0", "CROSS_SIZE": "2"}
    assert discover_ranks(env) == RankInfo(3, 8, 1, 4, "10.0.0.5", 29400, "deepspeed")


def test_hand_set_single_node_env_infers_local_ranks():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}
    assert discover_ranks(env) == RankInfo(1, 2, 1, 2, "localhost", 29500, "env")


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"RANK": "0"}, ["RANK=0", "WORLD_SIZE"]),
        ({**TORCH_ENV, "RANK": "8", "LOCAL_WORLD_SIZE": "2"}, ["RANK=8", "WORLD_SIZE=8"]),
        ({**TORCH_ENV, "RANK": "x"}, ["RANK='x'", "not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["MASTER_ADDR", "WORLD_SIZE=2"]),
        (TORCH_ENV, ["LOCAL_WORLD_SIZE", "MASTER_ADDR=10.0.0.5"]),
        ({**TORCH_ENV, "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
        ({**TORCH_ENV, "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE=0"]),
    ],
)
def test_inconsistent_torch_env_names_the_variables(env, names):
    with pytest.raises(LaunchError) as err:
        discover_ranks(env)
    for name in names:
        assert name in str(err.value)


SLURM_ENV = {
    "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "123456",
}


def test_slurm_srun():
    # master port derived from the job id, identical on every task
    assert discover_ranks(SLURM_ENV) == RankInfo(5, 8, 1, 4, "node07", 10000 + 123456 % 20000, "slurm")


def test_slurm_prefers_step_values_and_explicit_master():
    env = {**SLURM_ENV, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "4,2",
           "SLURM_STEP_NODELIST": "gpu[3,5]", "MASTER_PORT": "12345"}
    assert discover_ranks(env) == RankInfo(5, 6, 1, 2, "gpu3", 12345, "slurm")
    assert discover_ranks({**env, "MASTER_ADDR": "head"}).master_addr == "head"


def test_slurm_uniform_tasks_per_node():
    env = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "4"}
    del env["SLURM_TASKS_PER_NODE"]
    assert discover_ranks(env).local_world_size == 4


def test_slurm_errors_name_the_variables():
    with pytest.raises(LaunchError, match="SLURM_NTASKS"):
        discover_ranks({"SLURM_PROCID": "0"})
    with pytest.raises(LaunchError, match="SLURM_PROCID=9"):
        discover_ranks({**SLURM_ENV, "SLURM_PROCID": "9"})
    no_nodes = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(LaunchError, match="MASTER_ADDR.*SLURM_JOB_NODELIST"):
        discover_ranks(no_nodes)


def test_torch_env_wins_over_an_enclosing_slurm_allocation():
    # deepspeed/torchrun started inside sbatch: SLURM_* describe the allocation, not the ranks
    env = {**SLURM_ENV, **TORCH_ENV, "LOCAL_WORLD_SIZE": "2"}
    assert discover_ranks(env).launcher == "env" and discover_ranks(env).rank == 3


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("node-1.cluster.org", ["node-1.cluster.org"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(("text", "fragment"), [("node[01-03", "unclosed"), ("node]1", "unbalanced"),
                                                ("node[a-b]", "'a-b'"), ("node[5-3]", "backwards"), ("", "no host")])
def test_expand_hostlist_errors(text, fragment):
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST") as err:
        expand_hostlist(text, name="SLURM_JOB_NODELIST")
    assert fragment in str(err.value)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("2(3)")


def test_open_mpi_with_exported_master():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "host1", "MASTER_PORT": "23456",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # mpirun in sbatch: SLURM_PROCID is the batch step's
    assert discover_ranks(env) == RankInfo(2, 4, 0, 2, "host1", 23456, "openmpi")


def test_mpich_hydra_with_exported_master():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h"}
    assert discover_ranks(env) == RankInfo(1, 2, 1, 2, "h", 29500, "mpich")


def test_srun_with_pmi_agreeing_is_read_as_slurm():
    env = {**SLURM_ENV, "PMI_RANK": "5", "PMI_SIZE": "8"}
    assert discover_ranks(env).launcher == "slurm"


def test_mpi_errors_name_the_variables():
    with pytest.raises(LaunchError, match="PMI_SIZE"):
        discover_ranks({"PMI_RANK": "0"})
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK=4"):
        discover_ranks({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"})


def _mpiexec() -> str | None:
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


@pytest.mark.multirank
def test_real_mpiexec_discovers_ranks_and_joins(tmp_path):
    """mpich's hydra exports PMI_RANK/PMI_SIZE but no MASTER_ADDR: rank 0 broadcasts it via mpi4py."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")
           and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    probe = Path(__file__).with_name("mpi_probe.py")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(probe), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world_size"], r["local_rank"], r["local_world_size"]) for r in lines] == [
        (0, 2, 0, 2), (1, 2, 1, 2)]
    assert {r["launcher"] for r in lines} == {"mpich"}
    assert len({(r["master_addr"], r["master_port"]) for r in lines}) == 1  # both got rank 0's broadcast
    assert [r["rank_sum"] for r in lines] == [1.0, 1.0]  # and met there: all_reduce of 0 + 1
