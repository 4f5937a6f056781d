"""The hang watchdog in one process: a main thread that stops beating is reported with its stacks and
where it is; the multi-rank case (a rank that sleeps inside a collective) is in test_reliability.py."""

from __future__ import annotations

import json
import time

from xoron_dist.train.watchdog import HangWatchdog, summarise


def test_a_main_thread_that_stops_beating_is_reported(tmp_path, caplog):
    dog = HangWatchdog(tmp_path, rank=0, world_size=2, after_s=0.4)
    dog.start()
    try:
        dog.beat(7, "step")
        with caplog.at_level("ERROR"):
            time.sleep(2.5)  # stuck outside any collective; rank 1 never reports (dead)
        dog.beat(8, "step")
    finally:
        dog.stop()
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["step"] == 7 and report["phase"] == "step" and not report["in_collective"]
    assert "test_a_main_thread_that_stops_beating_is_reported at train/test_watchdog.py" in report["where"]
    assert "test_watchdog.py" in (tmp_path / "rank0.stacks.txt").read_text()
    assert "rank 0 has made no progress" in caplog.text and "NOT in a collective" in caplog.text
    assert "rank(s) that did not arrive: 0 (at step 7: " in caplog.text
    assert "1 (no report: dead, or busy without being stuck)" in caplog.text


def test_summary_names_the_rank_behind_and_the_ones_waiting(tmp_path):
    now = time.time()
    for rank, beats, in_collective in ((0, 12, True), (1, 11, True), (2, 12, True)):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "step": 4, "phase": "step", "beats": beats, "in_collective": in_collective,
            "where": "all_reduce at distributed/distributed_c10d.py:1", "written": now}))
    (tmp_path / "rank3.json").write_text(json.dumps({"rank": 3, "beats": 12, "written": now - 3600}))  # stale
    text = summarise(tmp_path, 4, since=now - 60)
    assert "did not arrive: 1 (at step 4: all_reduce" in text and "3 (no report" in text
    assert "waiting in a collective: 0, 2 (" in text
