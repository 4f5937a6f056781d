"""The multi-rank harness itself: results in rank order, and failures that point at the rank."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.parallel.harness import RankFailure, run_ranks

pytestmark = pytest.mark.multirank


def _rank_and_env(extra: str) -> tuple[int, dict[str, str], int]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", extra, "SLURM_PROCID")
    return int(os.environ["RANK"]), {n: os.environ.get(n) for n in names}, torch.get_num_threads()


def test_results_come_back_in_rank_order_with_launcher_variables(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "7")  # an outer launcher's variable must not leak into the ranks
    monkeypatch.setenv("XORON_TEST", "from the caller")  # the caller's own variables do
    results = run_ranks(_rank_and_env, 2, "XORON_TEST", threads_per_rank=1)
    assert [r[0] for r in results] == [0, 1]
    for rank, (_, env, threads) in enumerate(results):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["XORON_TEST"] == "from the caller" and env["SLURM_PROCID"] is None and threads == 1
    assert results[0][1]["MASTER_PORT"] == results[1][1]["MASTER_PORT"]


def test_spawned_ranks_and_extra_env():
    (rank, env, _), = run_ranks(_rank_and_env, 1, "XORON_TEST", env={"XORON_TEST": "extra"}, start_method="spawn")
    assert (rank, env["WORLD_SIZE"], env["XORON_TEST"]) == (0, "1", "extra")


def _fails_on_rank1(how: str) -> int:
    rank = int(os.environ["RANK"])
    if rank == 1:
        if how == "raise":
            raise ValueError("rank one broke")
        if how == "exit":
            os._exit(3)
        time.sleep(600)
    return rank


def test_a_raising_rank_fails_the_run_with_its_traceback():
    with pytest.raises(RankFailure) as info:
        run_ranks(_fails_on_rank1, 2, "raise", timeout=60)
    assert list(info.value.failures) == [1] and "ValueError: rank one broke" in info.value.failures[1]


def test_a_dead_rank_is_reported_with_its_exit_code():
    with pytest.raises(RankFailure, match="rank 1 ---\nprocess exited with code 3"):
        run_ranks(_fails_on_rank1, 2, "exit", timeout=60)


def test_a_hung_rank_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 ---\nno result after 8 s"):
        run_ranks(_fails_on_rank1, 2, "hang", timeout=8)
    assert time.monotonic() - start < 30
