"""The launch half of ``xoron setup``: a DeepSpeed hostfile or an sbatch script, and the command that starts the run.

Both start the run through the project's own launch scripts, so there is one copy of how a run is
launched: a hostfile run goes through ``launch_scripts/multi_node_hostfile.sh`` (DeepSpeed over ssh;
the first host is the master), a SLURM run through a copy of ``launch_scripts/slurm_train.sbatch``
whose ``#SBATCH`` header lines for the job name, nodes, tasks and GPUs per node are set to the
planned cluster (the body, with its requeue-on-timeout logic, is the template's, unchanged). A
template that lost one of those header lines is an error, not a silently wrong script.

The run config's relative paths (``ds_configs/``, ``data.path``, ``runs/``) resolve against the
repository root, so the command starts with ``cd`` there.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from xoron_dist.config import ConfigError
from xoron_dist.plan.cluster import ClusterSpec
from xoron_dist.setup.questions import REPO_ROOT

SBATCH_TEMPLATE = REPO_ROOT / "launch_scripts" / "slurm_train.sbatch"
HOSTFILE_LAUNCHER = "launch_scripts/multi_node_hostfile.sh"


def hostfile_text(hosts: list[str], cluster: ClusterSpec) -> str:
    """DeepSpeed's hostfile format: ``<host> slots=<GPUs>`` per node."""
    lines = [f"# DeepSpeed hostfile written by `xoron setup` for {cluster.describe()}"]
    lines += [f"{host} slots={cluster.gpus_per_node}" for host in hosts]
    return "\n".join(lines) + "\n"


def sbatch_text(cluster: ClusterSpec, run_name: str, template: Path = SBATCH_TEMPLATE) -> str:
    """``launch_scripts/slurm_train.sbatch`` with its resource lines set to ``cluster`` (one task per
    GPU; on a CPU cluster the ``--gpus-per-node`` line is dropped)."""
    if not template.is_file():
        raise ConfigError(f"sbatch template {template} not found: run `xoron setup` from a checkout of the repository")
    text = template.read_text()
    settings = {"job-name": run_name, "nodes": str(cluster.nodes),
                "ntasks-per-node": str(cluster.gpus_per_node), "gpus-per-node": str(cluster.gpus_per_node)}
    for key, value in settings.items():
        pattern = re.compile(rf"^#SBATCH --{key}=.*\n", re.MULTILINE)
        if not pattern.search(text):
            raise ConfigError(f"sbatch template {template} has no '#SBATCH --{key}=' line to set; restore it")
        replacement = "" if key == "gpus-per-node" and cluster.device == "cpu" else f"#SBATCH --{key}={value}\n"
        text = pattern.sub(replacement, text)
    shebang, _, body = text.partition("\n")
    note = (f"# Written by `xoron setup` from launch_scripts/slurm_train.sbatch for {cluster.describe()}; "
            "submit it with the run config as its first argument.")
    return f"{shebang}\n{note}\n{body}"


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it (the command runs there), else absolute."""
    full = path.resolve()
    return str(full.relative_to(REPO_ROOT)) if full.is_relative_to(REPO_ROOT) else str(full)


def launch_command(out: Path, config: Path, launcher: Path) -> str:
    """The shell command that starts the run: ``sbatch`` of the written script, or the hostfile launcher."""
    cd = f"cd {shlex.quote(str(REPO_ROOT))} && "
    if launcher.suffix == ".sbatch":
        return cd + f"sbatch {shlex.quote(_shown(launcher))} {shlex.quote(_shown(config))}"
    return cd + f"HOSTFILE={shlex.quote(_shown(launcher))} {HOSTFILE_LAUNCHER} {shlex.quote(_shown(config))}"


__all__ = ["HOSTFILE_LAUNCHER", "SBATCH_TEMPLATE", "hostfile_text", "launch_command", "sbatch_text"]
