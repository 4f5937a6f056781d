"""``python -m xoron_dist.train`` with a fault injected for real, for the reliability tests:

    python tests/train/faults.py nan-batches=3,4 -- --config pipelines/smoke.yaml ...
    python tests/train/faults.py sleep-in-collective=1:3:60 -- --config ...

(The tests run its ``main`` in their trainer ranks: ``start_ranks(..., faults=...)`` in ``runs.py``.)

``nan-batches=S,...``: the synthetic-text batches of data steps S (the batch a straight run trains
on at step S) carry NaN per-token loss weights, so their loss and gradients are NaN; the batch is
marked by its data position, so a run that skips that data after a rollback never sees it again.
``sleep-in-collective=R:S:SECONDS``: on rank R, in step S, the first collective (the step's token
count all-reduce) sleeps SECONDS before it joins: the others wait for a rank that did not arrive.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def poison_batches(data_steps: set[int]) -> None:
    import torch

    from xoron_dist.train import sources, step

    pending: list[bool] = []  # one flag per batch taken from the source since the last step
    real_next, real_run, real_inputs = (sources.SyntheticTextSource.next_batch, step.StepRunner.run,
                                        step.StepRunner.model_inputs)

    def next_batch(self):
        pending.append(self.step + 1 in data_steps)
        return real_next(self)

    def run(self, batches):
        self._poisoned = iter(pending[-len(batches):])  # earlier flags: batches skipped after a rollback
        pending.clear()
        return real_run(self, batches)

    def model_inputs(self, batch):
        inputs = real_inputs(self, batch)
        if next(self._poisoned, False):
            inputs["loss_weights"] = torch.full(inputs["labels"].shape, float("nan"), device=inputs["labels"].device)
        return inputs

    sources.SyntheticTextSource.next_batch = next_batch
    step.StepRunner.run = run
    step.StepRunner.model_inputs = model_inputs


def sleep_in_collective(rank: int, at_step: int, seconds: float) -> None:
    import torch.distributed as dist

    from xoron_dist.train import step

    real_all_reduce, real_run = dist.all_reduce, step.StepRunner.run
    armed = {"calls": 0, "now": False}

    def run(self, batches):
        armed["calls"] += 1
        armed["now"] = armed["calls"] == at_step and dist.get_rank() == rank
        return real_run(self, batches)

    def all_reduce(tensor, *args, **kwargs):
        if armed["now"]:
            armed["now"] = False
            time.sleep(seconds)  # this rank has not arrived in the collective
        return real_all_reduce(tensor, *args, **kwargs)

    step.StepRunner.run = run
    dist.all_reduce = all_reduce


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for fault in argv[:split]:
        name, _, value = fault.partition("=")
        if name == "nan-batches":
            poison_batches({int(s) for s in value.split(",")})
        elif name == "sleep-in-collective":
            rank, at_step, seconds = value.split(":")
            sleep_in_collective(int(rank), int(at_step), float(seconds))
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    from xoron_dist.train.__main__ import main as train_main

    return train_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
