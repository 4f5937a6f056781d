"""Write the chosen layout: a run config (``plan.yaml``) and its DeepSpeed JSON (``ds_config.json``).

``plan.yaml`` is the input config with ``parallel.tp/pp/sp/ep/zero_stage``,
``train.micro_batch_size``, ``train.grad_accum_steps`` and ``train.activation_checkpointing`` set;
``train.ds_config`` stays the run's JSON when its ZeRO stage agrees with the plan, else it becomes
the shipped ``ds_configs/zero<stage>.json`` (a JSON whose stage disagrees would only be overridden,
with a warning, by ``build_ds_config``). ``ds_config.json`` is exactly what ``build_ds_config``
makes for that run config on the cluster's device, as the trainer will build it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from xoron_dist.config import XoronConfig
from xoron_dist.plan.cluster import ClusterSpec
from xoron_dist.plan.search import Candidate
from xoron_dist.train.ds_config import build_ds_config, ds_config_path_for, write_ds_config


def planned_config(cfg: XoronConfig, choice: Candidate) -> XoronConfig:
    """``cfg`` with the candidate's layout and batch split, and a DeepSpeed JSON of its ZeRO stage."""
    import dataclasses

    run = choice.apply(cfg)
    return dataclasses.replace(run, train=dataclasses.replace(run.train, ds_config=ds_config_path_for(run)))


def write_plan(cfg: XoronConfig, choice: Candidate, cluster: ClusterSpec, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``plan.yaml`` and ``ds_config.json`` into ``out_dir``; return their paths."""
    if choice.layout is None:
        raise ValueError(f"candidate {choice.describe()} was refused ({choice.refusal}); nothing to write")
    run = planned_config(cfg, choice)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by `xoron plan` for {cluster.describe()}\n"
              f"# layout: {choice.layout.describe()}; micro-batch {choice.micro_batch_size} x "
              f"{choice.grad_accum_steps} accumulation steps"
              f"{', activation checkpointing' if choice.activation_checkpointing else ''}\n")
    yaml_path = out / "plan.yaml"
    yaml_path.write_text(header + yaml.safe_dump(run.to_dict(), sort_keys=False))
    dtype = torch.bfloat16 if cluster.device == "cuda" else torch.float32
    ds = build_ds_config(run, choice.layout.dp, dtype, cluster.device)
    return yaml_path, write_ds_config(out / "ds_config.json", ds)


__all__ = ["planned_config", "write_plan"]
