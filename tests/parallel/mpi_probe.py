"""Started by test_launcher_env under a real ``mpiexec -n N``: each rank discovers itself, joins the
job through state.initialize, all-reduces its rank, and writes OUT_DIR/rank<r>.json (one file per
rank: mpiexec interleaves the ranks' stdout)."""

import json
import sys
from pathlib import Path

import torch

from xoron_dist.config import load_config
from xoron_dist.parallel import state
from xoron_dist.parallel.launcher_env import discover_ranks

if __name__ == "__main__":
    info = discover_ranks()
    ctx = state.initialize(load_config(None, ["preset=tiny", "train.dist_timeout_minutes=1"]))
    total = torch.tensor([float(ctx.rank)])
    torch.distributed.all_reduce(total)
    torch.distributed.barrier()
    state.destroy()
    out = Path(sys.argv[1]) / f"rank{info.rank}.json"
    out.write_text(json.dumps({**info.__dict__, "rank_sum": total.item()}))
