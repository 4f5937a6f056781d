"""Checkpoints through a real DeepSpeed engine on CPU (world size 1, gloo).

Save -> continue, and load into a fresh engine -> continue, must give the same losses
bit for bit: model, optimizer, lr schedule and every RNG (the batches and the dropout
draw from python ``random``, numpy and torch) are restored. No DeepSpeed op may be
JIT-compiled: the module runs with TORCH_EXTENSIONS_DIR pointing at an empty directory
and checks it is still empty at the end.
"""

import hashlib
import json
import os
import pickle
import random
import re
import socket

import numpy as np
import pytest
import torch

from xoron_dist.config import XoronConfig
from xoron_dist.train.checkpoint import (
    CheckpointError,
    TrainerState,
    complete_tags,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
)
from xoron_dist.train.ds_config import build_ds_config
from xoron_dist.train.schedule import WarmupCosineSchedule, lr_at


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def single_rank_deepspeed(tmp_path_factory):
    """World size 1 on gloo, without DeepSpeed's shared-memory comm op (a ~1.5 min JIT build on CPU)."""
    extensions = tmp_path_factory.mktemp("torch_extensions")
    saved = {k: os.environ.get(k) for k in ("TORCH_EXTENSIONS_DIR",)}
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)
    import deepspeed
    import deepspeed.ops

    if not torch.distributed.is_initialized():
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.comm.init_distributed(dist_backend="gloo")
    yield
    assert not any(extensions.iterdir()), f"a DeepSpeed op was JIT-compiled: {list(extensions.iterdir())}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.down = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 8) -> (batch, 1)
        return self.down(self.drop(torch.relu(self.up(x))))


def _engine(stage: int | str, seed: int, steps: int = 10):
    """stage: 0..3, or "3_offload" (ds_configs/zero3_offload.json; torch AdamW on CPU, nothing to compile)."""
    import deepspeed

    cfg = XoronConfig.from_dict({
        "train": {"ds_config": f"ds_configs/zero{stage}.json", "micro_batch_size": 2, "lr": 1e-2,
                  "warmup_steps": 2, "steps": steps},
        "parallel": {"zero_stage": int(str(stage)[0])},
    })
    ds = build_ds_config(cfg, dp_size=1, dtype=torch.float32, device_kind="cpu")
    torch.manual_seed(seed)
    model = Tiny()
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters(),
                                      lr_scheduler=WarmupCosineSchedule.factory(cfg.train))
    return engine, cfg


def _train_step(engine) -> float:
    x = torch.randn(2, 8) * (1 + random.random()) + float(np.random.rand())
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _state(step: int) -> TrainerState:
    return TrainerState(step=step, tokens_seen=16 * step, stage_index=1, stage_name="pretrain",
                        data_position={"shard": 3, "offset": 40 + step}, wall_time_s=1.5, config_hash="abc")


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "3_offload"])
def test_resume_continues_exactly(stage, tmp_path):
    _seed_all(0)
    engine, cfg = _engine(stage, seed=0)
    for _ in range(3):
        _train_step(engine)
    saved = save_checkpoint(engine, tmp_path, _state(3), keep=2)
    assert saved == tmp_path / "step00000003" and latest_tag(tmp_path) == "step00000003"
    expected = [_train_step(engine) for _ in range(2)]
    expected_rng = (random.random(), float(np.random.rand()), torch.rand(3))

    _seed_all(123)
    fresh, _ = _engine(stage, seed=7)
    state = load_checkpoint(fresh, tmp_path)
    assert state == _state(3)
    assert fresh.global_steps == 3 and fresh.lr_scheduler.last_epoch == 3
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(3, cfg.train))
    assert [_train_step(fresh) for _ in range(2)] == expected
    rng = (random.random(), float(np.random.rand()), torch.rand(3))
    assert rng[:2] == expected_rng[:2] and torch.equal(rng[2], expected_rng[2])


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path):
    engine, _ = _engine(1, seed=0, steps=10)
    for _ in range(5):
        _train_step(engine)
    save_checkpoint(engine, tmp_path, _state(5), keep=1)
    longer, cfg = _engine(1, seed=0, steps=40)
    load_checkpoint(longer, tmp_path)
    # DeepSpeed restores the optimizer's param groups (lr of the old schedule) after the
    # scheduler; load_checkpoint re-applies the current schedule.
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(5, cfg.train))
    assert lr_at(5, cfg.train) != pytest.approx(engine.optimizer.param_groups[0]["lr"])


def test_every_rank_file_and_manifest_written(tmp_path):
    engine, _ = _engine(1, seed=0)
    _train_step(engine)
    tag_dir = save_checkpoint(engine, tmp_path, _state(1), keep=1)
    meta = json.loads((tag_dir / "trainer_state.json").read_text())
    assert meta["world_size"] == 1 and meta["state"]["step"] == 1
    assert "rng_rank0.pt" in meta["files"] and "mp_rank_00_model_states.pt" in meta["files"]
    assert any(name.endswith("optim_states.pt") for name in meta["files"])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))


def test_pruning_keeps_the_newest(tmp_path):
    engine, _ = _engine(1, seed=0)
    for step in range(1, 5):
        _train_step(engine)
        save_checkpoint(engine, tmp_path, _state(step), keep=2)
    assert complete_tags(tmp_path) == ["step00000003", "step00000004"]
    assert latest_tag(tmp_path) == "step00000004"
    # Resumed from an earlier step: tags past the new one are left alone (not pruned) ...
    save_checkpoint(engine, tmp_path, _state(2), keep=1)
    assert complete_tags(tmp_path) == ["step00000002", "step00000003", "step00000004"]
    assert latest_tag(tmp_path) == "step00000002"
    # ... until the run saves that step again, which replaces it.
    before = (tmp_path / "step00000003" / "trainer_state.json").read_text()
    save_checkpoint(engine, tmp_path, _state(3), keep=2)
    assert complete_tags(tmp_path) == ["step00000002", "step00000003", "step00000004"]
    assert (tmp_path / "step00000003" / "trainer_state.json").read_text() != before
    assert not list(tmp_path.glob("*.replaced")) and not list(tmp_path.glob("*.partial"))


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    engine, _ = _engine(1, seed=0)
    _train_step(engine)
    save_checkpoint(engine, tmp_path, _state(1), keep=2)
    _train_step(engine)

    real_save = engine.checkpoint_engine.save

    def failing_save(state_dict, path):
        if "optim_states" in str(path):
            raise OSError("No space left on device")
        return real_save(state_dict, path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(engine, tmp_path, _state(2), keep=2)
    assert latest_tag(tmp_path) == "step00000001" and complete_tags(tmp_path) == ["step00000001"]
    assert (tmp_path / "step00000002.partial").is_dir()

    fresh, _ = _engine(1, seed=5)
    assert load_checkpoint(fresh, tmp_path).step == 1

    monkeypatch.setattr(engine.checkpoint_engine, "save", real_save)
    save_checkpoint(engine, tmp_path, _state(2), keep=2)
    assert complete_tags(tmp_path) == ["step00000001", "step00000002"]
    assert not (tmp_path / "step00000002.partial").exists()


def test_nothing_to_resume_returns_none(tmp_path):
    engine, _ = _engine(1, seed=0)
    assert load_checkpoint(engine, tmp_path / "absent") is None
    assert load_checkpoint(engine, tmp_path) is None
    (tmp_path / "step00000005.partial").mkdir()
    assert load_checkpoint(engine, tmp_path) is None


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    engine, _ = _engine(1, seed=0)
    _train_step(engine)
    save_checkpoint(engine, root, _state(1), keep=1)
    return root


def _damaged_copy(saved_checkpoint, tmp_path):
    import shutil

    shutil.copytree(saved_checkpoint, tmp_path, dirs_exist_ok=True)
    return tmp_path / "step00000001"


def test_truncated_file_is_named(saved_checkpoint, tmp_path):
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    states = tag_dir / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step00000001 is incomplete or damaged: "
                                              r"mp_rank_00_model_states\.pt has 100 bytes"):
        load_checkpoint(_engine(1, seed=0)[0], tmp_path)


def test_missing_file_is_named(saved_checkpoint, tmp_path):
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    (tag_dir / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt is missing"):
        load_checkpoint(_engine(1, seed=0)[0], tmp_path)


def test_garbage_of_the_right_size_is_caught_by_its_hash_or_unreadable(saved_checkpoint, tmp_path):
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    states = tag_dir / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)
    engine = _engine(1, seed=0)[0]
    with pytest.raises(CheckpointError, match=r"step00000001 is damaged: mp_rank_00_model_states\.pt: sha256"):
        load_checkpoint(engine, tmp_path)
    with pytest.raises(CheckpointError, match=r"step00000001: unreadable checkpoint"):
        load_checkpoint(engine, tmp_path, verify=False)


def test_unfinished_tag_and_dangling_latest(saved_checkpoint, tmp_path):
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    engine = _engine(1, seed=0)[0]
    (tag_dir / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: trainer_state\.json is missing"):
        load_checkpoint(engine, tmp_path)
    (tmp_path / "latest").write_text("step00000099")
    with pytest.raises(CheckpointError, match=r"step00000099 does not exist"):
        load_checkpoint(engine, tmp_path)


def test_world_size_change_is_refused(saved_checkpoint, tmp_path):
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    meta = json.loads((tag_dir / "trainer_state.json").read_text())
    meta["world_size"] = 2
    (tag_dir / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        load_checkpoint(_engine(1, seed=0)[0], tmp_path)


def test_missing_latest_falls_back_to_newest_complete(saved_checkpoint, tmp_path):
    _damaged_copy(saved_checkpoint, tmp_path)
    (tmp_path / "latest").unlink()
    assert load_checkpoint(_engine(1, seed=0)[0], tmp_path).step == 1


# --------------------------------------------------------------------------- integrity and trust (issue 17)


def _flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "optim_states.pt", "rng_rank0.pt"])
def test_a_flipped_byte_in_any_file_is_named(saved_checkpoint, tmp_path, kind):
    """One flipped bit, same size: the sha256 recorded at save time names the file, before DeepSpeed reads it."""
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    target = next(p for p in tag_dir.iterdir() if p.name.endswith(kind))
    _flip_byte(target)
    with pytest.raises(CheckpointError, match=rf"step00000001 is damaged: {re.escape(target.name)}: sha256") as err:
        load_checkpoint(_engine(1, seed=0)[0], tmp_path)
    assert "No earlier complete checkpoint is left" in str(err.value)


def test_manifest_records_sha256_and_the_files_are_flushed_before_publishing(tmp_path, monkeypatch):
    import xoron_dist.train.checkpoint as ckpt

    events = []
    monkeypatch.setattr(ckpt, "flush_filesystem", lambda folder: events.append(("flush", folder.name)))
    real_fsync_dir, real_write = ckpt.fsync_dir, ckpt._write_atomic
    monkeypatch.setattr(ckpt, "fsync_dir", lambda folder: (events.append(("fsync_dir", folder.name)),
                                                            real_fsync_dir(folder)))
    monkeypatch.setattr(ckpt, "_write_atomic", lambda path, text: (events.append(("write", path.name)),
                                                                   real_write(path, text)))
    engine, _ = _engine(1, seed=0)
    _train_step(engine)
    tag_dir = save_checkpoint(engine, tmp_path, _state(1), keep=1)
    assert events == [("flush", "step00000001.partial"), ("write", "trainer_state.json"),
                      ("fsync_dir", "step00000001.partial"), ("fsync_dir", tmp_path.name), ("write", "latest"),
                      ("fsync_dir", tmp_path.name)]
    meta = json.loads((tag_dir / "trainer_state.json").read_text())
    assert meta["format_version"] == 2
    for name, entry in meta["files"].items():
        assert entry["bytes"] == (tag_dir / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256((tag_dir / name).read_bytes()).hexdigest()


def test_resume_tag_falls_back_to_the_previous_checkpoint_that_verifies(tmp_path, caplog):
    from xoron_dist.train.checkpoint import resume_tag

    engine, _ = _engine(1, seed=0)
    for step in (1, 2):
        _train_step(engine)
        save_checkpoint(engine, tmp_path, _state(step), keep=2)
    assert resume_tag(tmp_path) == "step00000002"
    _flip_byte(tmp_path / "step00000002" / "mp_rank_00_model_states.pt")
    with caplog.at_level("WARNING"):
        assert resume_tag(tmp_path) == "step00000001"
    assert "step00000002 is damaged: mp_rank_00_model_states.pt" in caplog.text
    assert "The previous complete checkpoint is step00000001" in caplog.text
    assert load_checkpoint(_engine(1, seed=3)[0], tmp_path, "step00000001").step == 1


def test_non_finite_weights_are_never_saved(tmp_path):
    from xoron_dist.train.checkpoint import NonFiniteStateError

    engine, _ = _engine(1, seed=0)
    _train_step(engine)
    save_checkpoint(engine, tmp_path, _state(1), keep=1)
    with torch.no_grad():
        engine.module.down.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteStateError, match=r"not saving step00000002: 1 weight tensor\(s\) hold NaN"):
        save_checkpoint(engine, tmp_path, _state(2), keep=1)
    assert complete_tags(tmp_path) == ["step00000001"] and latest_tag(tmp_path) == "step00000001"
    assert not list(tmp_path.glob("*.partial"))


class _WritesAFile:
    """A pickle payload: unpickling it runs ``os.system`` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["rng_rank0.pt", "mp_rank_00_model_states.pt"])
def test_a_crafted_pickle_never_runs(saved_checkpoint, tmp_path, victim):
    """The attacker also rewrites the manifest (size and sha256 match): the hash cannot help; the
    tensors-only unpickler refuses the global and names the file."""
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = tag_dir / victim
    evil.write_bytes(pickle.dumps(_WritesAFile(marker), protocol=2))  # torch.save's protocol
    meta = json.loads((tag_dir / "trainer_state.json").read_text())
    meta["files"][victim] = {"bytes": evil.stat().st_size, "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
    (tag_dir / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{re.escape(victim)}: refused to unpickle: .*GLOBAL posix\.system"):
        load_checkpoint(_engine(1, seed=0)[0], tmp_path / "run")
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # the payload is live: a plain load runs it (then fails)
        torch.load(evil, weights_only=False)
    assert marker.exists()


def test_format_1_rng_files_with_numpy_arrays_still_load(saved_checkpoint, tmp_path):
    """Checkpoints written before format 2 pickled numpy's RNG key as an array: allow-listed, still loads."""
    tag_dir = _damaged_copy(saved_checkpoint, tmp_path)
    rng = tag_dir / "rng_rank0.pt"
    state = torch.load(rng, weights_only=True)
    name, key, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, key.numpy().astype(np.uint32), *rest)
    torch.save(state, rng)
    meta = json.loads((tag_dir / "trainer_state.json").read_text())
    meta["format_version"] = 1
    meta["files"] = {name: entry["bytes"] for name, entry in meta["files"].items()}
    meta["files"]["rng_rank0.pt"] = rng.stat().st_size
    (tag_dir / "trainer_state.json").write_text(json.dumps(meta))
    np.random.seed(5)
    assert load_checkpoint(_engine(1, seed=0)[0], tmp_path).step == 1
    assert np.random.get_state()[1].tolist() == key.tolist()
