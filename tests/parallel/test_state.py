"""initialize/destroy on real gloo ranks: Megatron-core groups, the DeepSpeed mpu adapter, early refusal."""

from __future__ import annotations

import os

import pytest
import torch

from tests.parallel.harness import is_launcher_var, run_ranks
from xoron_dist.config import load_config
from xoron_dist.parallel.layout import LayoutError

pytestmark = pytest.mark.multirank


def _cfg(*overrides: str):
    return load_config(None, ["preset=tiny", "train.dist_timeout_minutes=1", *overrides])


def _group_ranks(group) -> list[int]:
    return torch.distributed.get_process_group_ranks(group)


def _deepspeed_engine_sizes(mpu) -> dict:
    """deepspeed.initialize accepts the adapter and trains one ZeRO-1 step over its dp group."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config, mpu=mpu)
    x = torch.full((1, 4), float(torch.distributed.get_rank() + 1))
    engine.backward(engine(x).sum())
    engine.step()
    return {"dp": engine.dp_world_size, "mp": engine.mp_world_size, "seq_dp": engine.seq_dp_world_size,
            "train_batch": engine.train_batch_size(), "weight": engine.module.weight.detach().clone()}


def _two_rank_body() -> dict:
    from xoron_dist.parallel import state

    ctx = state.initialize(_cfg())
    mpu = state.mpu()
    total = torch.tensor([float(ctx.rank + 1)])
    torch.distributed.all_reduce(total, group=ctx.dp_group)
    out = {
        "rank": ctx.rank, "is_main": ctx.is_main, "launcher": ctx.rank_info.launcher,
        "backend": torch.distributed.get_backend(), "device": str(ctx.device), "layout": ctx.layout,
        "dp": (ctx.dp_rank, ctx.dp_size, _group_ranks(ctx.dp_group)), "dp_sum": total.item(),
        "mpu": {
            "model": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
            "tp": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
                   mpu.get_tensor_model_parallel_src_rank()),
            "pp": (mpu.get_pipe_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()),
            "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                   mpu.get_data_parallel_group_ranks()),
            "sp": (mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()),
            "seq_dp": (mpu.get_sequence_data_parallel_rank(), mpu.get_sequence_data_parallel_world_size()),
            "ulysses_marker": hasattr(mpu, "initialize_sequence_parallel"),
        },
        "engine": _deepspeed_engine_sizes(mpu),
    }
    state.destroy()
    state.destroy()  # idempotent
    out["after_destroy"] = torch.distributed.is_initialized()
    return out


def test_two_ranks_data_parallel_groups_and_mpu():
    results = run_ranks(_two_rank_body, 2)
    for rank, out in enumerate(results):
        assert out["rank"] == rank and out["is_main"] == (rank == 0)
        assert out["launcher"] == "env"  # the harness sets the variables as a hand-made launch would
        assert (out["backend"], out["device"]) == ("gloo", "cpu")
        assert (out["layout"].world, out["layout"].dp) == (2, 2)
        assert out["dp"] == (rank, 2, [0, 1]) and out["dp_sum"] == 3.0
        assert out["mpu"] == {
            "model": (0, 1), "tp": (0, 1, rank), "pp": (0, 1), "dp": (rank, 2, [0, 1]),
            "sp": (0, 1), "seq_dp": (rank, 2), "ulysses_marker": False,
        }
        engine = out["engine"]
        assert (engine["dp"], engine["mp"], engine["seq_dp"], engine["train_batch"]) == (2, 1, 2, 2)
        assert out["after_destroy"] is False
    # ZeRO-1 averaged the gradients over the dp group: both ranks hold the same updated weight.
    torch.testing.assert_close(results[0]["engine"]["weight"], results[1]["engine"]["weight"])


def _tp2_body() -> dict:
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state

    ctx = state.initialize(_cfg("parallel.tp=2"))
    mpu = state.mpu()
    out = {
        "layout": (ctx.layout.dp, ctx.layout.tp),
        "tp": (ps.get_tensor_model_parallel_rank(), _group_ranks(ps.get_tensor_model_parallel_group())),
        "dp": (ctx.dp_rank, ctx.dp_size, _group_ranks(ctx.dp_group)),
        "model": _group_ranks(mpu.get_model_parallel_group()),
        "mpu_model": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
        "mpu_tp_src": mpu.get_tensor_model_parallel_src_rank(),
        "engine": _deepspeed_engine_sizes(mpu),
    }
    state.destroy()
    return out


def test_four_ranks_tensor_parallel_groups():
    results = run_ranks(_tp2_body, 4)
    for rank, out in enumerate(results):
        tp_rank, pair = rank % 2, [rank - rank % 2, rank - rank % 2 + 1]
        assert out["layout"] == (2, 2)
        assert out["tp"] == (tp_rank, pair)                      # tp groups [0,1] [2,3]
        assert out["dp"] == (rank // 2, 2, [tp_rank, tp_rank + 2])  # dp groups [0,2] [1,3]
        assert out["model"] == pair and out["mpu_model"] == (tp_rank, 2)
        assert out["mpu_tp_src"] == pair[0]
        engine = out["engine"]
        assert (engine["dp"], engine["mp"], engine["train_batch"]) == (2, 2, 2)


def _sp_ep_body() -> dict:
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state

    ctx = state.initialize(_cfg("parallel.sp=2", "parallel.ep=2"))
    mpu = state.mpu()
    out = {
        "cp": _group_ranks(ps.get_context_parallel_group()),
        "dp": (ctx.dp_rank, ctx.dp_size, _group_ranks(ctx.dp_group)),
        "ep": _group_ranks(ps.get_expert_model_parallel_group()),
        "expert_dp": _group_ranks(ps.get_expert_data_parallel_group()),
        "mpu_sp": (mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size(),
                   _group_ranks(mpu.get_sequence_parallel_group())),
        "mpu_seq_dp": (mpu.get_sequence_data_parallel_world_size(),
                       _group_ranks(mpu.get_sequence_data_parallel_group())),
        "engine": _deepspeed_engine_sizes(mpu),
    }
    state.destroy()
    return out


def test_four_ranks_sequence_and_expert_parallel_groups():
    for rank, out in enumerate(run_ranks(_sp_ep_body, 4)):
        cp_pair = [rank - rank % 2, rank - rank % 2 + 1]
        assert out["cp"] == cp_pair                              # ring neighbours [0,1] [2,3]
        assert out["dp"] == (rank // 2, 2, [rank % 2, rank % 2 + 2])
        assert out["ep"] == cp_pair and out["expert_dp"] == [rank % 2, rank % 2 + 2]
        assert out["mpu_sp"] == (rank % 2, 2, cp_pair)
        assert out["mpu_seq_dp"] == (4, [0, 1, 2, 3])          # ZeRO partitions over dp x sp
        engine = out["engine"]
        assert (engine["dp"], engine["seq_dp"], engine["train_batch"]) == (2, 4, 2)


def _pp_body() -> dict:
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state

    state.initialize(_cfg("parallel.pp=2"))
    mpu = state.mpu()
    out = {
        "pp": (mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size(),
               _group_ranks(mpu.get_pipe_parallel_group())),
        "stage": (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()),
        "model": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
        "dp": mpu.get_data_parallel_world_size(),
    }
    state.destroy()
    return out


def test_two_ranks_pipeline_groups():
    first, last = run_ranks(_pp_body, 2)
    assert first == {"pp": (0, 2, [0, 1]), "stage": (True, False), "model": (0, 2), "dp": 1}
    assert last == {"pp": (1, 2, [0, 1]), "stage": (False, True), "model": (1, 2), "dp": 1}


def _invalid_layout_body() -> tuple[str, bool]:
    import torch.distributed as dist

    from xoron_dist.parallel import state

    try:
        state.initialize(_cfg("parallel.tp=3"))
    except LayoutError as err:
        return str(err), dist.is_initialized()
    raise AssertionError("initialize accepted tp=3 on 2 ranks")


def test_invalid_layout_raises_on_every_rank_before_any_group():
    for message, initialized in run_ranks(_invalid_layout_body, 2):
        assert "world size 2 is not divisible by tp*pp*sp = 3" in message
        assert initialized is False


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables, and whatever initialize exports is undone afterwards."""
    saved = dict(os.environ)
    for name in [k for k in os.environ if is_launcher_var(k)]:
        monkeypatch.delenv(name)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_refuses_a_layout_before_any_group(single_process_env):
    from xoron_dist.parallel import state

    with pytest.raises(LayoutError, match=r"parallel.ep = 2 does not divide dp\*sp = 1"):
        state.initialize(_cfg("parallel.ep=2"))
    assert not torch.distributed.is_initialized() and not state.is_initialized()


def test_single_process_world_of_one_and_reinitialize(single_process_env):
    from xoron_dist.parallel import state

    launchers = []
    for _ in range(2):  # destroy leaves the process able to initialize again
        ctx = state.initialize(_cfg())
        launchers.append(ctx.rank_info.launcher)
        assert (ctx.world_size, ctx.dp_size, ctx.dp_rank, ctx.is_main) == (1, 1, 0, True)
        assert state.get_context() is ctx and os.environ["LOCAL_RANK"] == "0"
        with pytest.raises(RuntimeError, match="already initialized"):
            state.initialize(_cfg())
        state.destroy()
        assert not torch.distributed.is_initialized()
    # the second run reads what the first exported (RANK, WORLD_SIZE, ...), as a launcher's would be
    assert launchers == ["single", "env"]
    with pytest.raises(RuntimeError, match="has not run"):
        state.get_context()


def _timeout_body() -> tuple:
    """Rank 1 never joins a collective on a group made without a timeout (as DeepSpeed makes its own)."""
    import time

    from xoron_dist.parallel import state

    ctx = state.initialize(_cfg("train.dist_timeout_minutes=0.05"))  # 3 s
    group = torch.distributed.new_group([0, 1])
    outcome: tuple = ("rank 1 sat it out",)
    if ctx.rank == 0:
        start = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.ones(1), group=group)
            outcome = ("completed",)
        except RuntimeError as err:
            outcome = ("timed out", time.monotonic() - start, "Timed out" in str(err))
    else:
        time.sleep(10)
    state.destroy()
    return outcome


def test_collective_timeout_comes_from_the_config_on_every_group():
    """train.dist_timeout_minutes bounds a collective a rank never joins, also on groups that DeepSpeed
    creates without a timeout of their own (torch's default would be 30 minutes)."""
    outcome, _ = run_ranks(_timeout_body, 2, timeout=90)
    assert outcome[0] == "timed out" and outcome[2], outcome
    assert 2.5 < outcome[1] < 8.0, outcome
