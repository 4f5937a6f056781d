"""Resharding (``train/reshard.py``): a checkpoint saved on 2 ranks under ZeRO-3 (dp 2) is resumed with
``train.reshard`` on 2 ranks under TP=2 and on 1 rank. The first loss after the resume must equal a
one-rank reference: the plain model with the checkpoint's consolidated weights (expert biases
included) on the batch at the saved data position; with Adam's moments carried, the step after the resume
updates the weights as the saved run did when it went on in its own layout without a stop. Without the flag,
the resume is refused with the differences named. The trainer runs in-process on the multi-rank harness's
forked ranks (no launcher)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import losses, records

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "pipelines" / "smoke.yaml"
# global batch 4 rows of 64 tokens on every layout; the checkpoint is taken after step 2
COMMON = ("data.source=synthetic_text", "train.seq_len=64", "model.llm.pad_vocab_multiple=32", "train.log_every=1",
          "train.save_every=2")
SAVED = ("parallel.zero_stage=3", "train.micro_batch_size=2", "train.steps=2")


def _train_rank(root: str, overrides: tuple[str, ...], resume: bool) -> object:
    """One rank of ``xoron train`` (in this process); a config error comes back as its message."""
    from xoron_dist.config import ConfigError, load_config
    from xoron_dist.train.trainer import train

    cfg = load_config(SMOKE, [*COMMON, f"train.output_dir={root}", "train.name=run", *overrides])
    try:
        return train(cfg, resume=resume).final_loss
    except ConfigError as err:
        return f"ConfigError: {err}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run on 2 ranks, ZeRO-3, made once for the module: its checkpoint step00000002 is what the tests
    resume from; the same run went on to step 3 (step00000003: layout A continued, without a stop)."""
    root = tmp_path_factory.mktemp("reshard")
    run_ranks(_train_rank, 2, str(root), (*SAVED[:-1], "train.steps=3"), False, timeout=240)
    return root


def _resumed_copy(saved: Path, tmp_path: Path) -> Path:
    """The saved run as it stood after step 2 (its step-3 checkpoint left behind)."""
    shutil.copytree(saved / "run", tmp_path / "run", ignore=shutil.ignore_patterns("step00000003"))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step00000002")
    return tmp_path


def _reference_loss(saved: Path, zero_biases: bool = False, step: int = 2) -> float:
    """The loss of step ``step`` + 1 on one rank that loads the consolidated weights of step ``step``: the
    global batch of 4 rows (one data-parallel rank) at data position ``step``, micro-step 0, through the plain
    model."""
    from xoron_dist.data.synthetic_text import SyntheticTextDataset
    from xoron_dist.export import consolidate
    from xoron_dist.tokenizer import build_tokenizer

    ckpt = consolidate(saved / "run" / "checkpoints" / f"step{step:08d}")
    if zero_biases:
        ckpt.state = {k: torch.zeros_like(v) if k.endswith("expert_bias") else v for k, v in ckpt.state.items()}
    model = ckpt.build_model()
    tokenizer = build_tokenizer(ckpt.cfg, saved / "run" / "tokenizer")
    data = SyntheticTextDataset(tokenizer, ckpt.cfg.data.num_documents, ckpt.cfg.data.seed, 64)
    rows = data.batch(step, 0, 0, 1, 4, grad_accum_steps=1)
    with torch.no_grad():
        return model(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss.item()


def _moments(root: Path, tag: str):
    from xoron_dist.config import load_config
    from xoron_dist.train.consolidation import read_full_moments
    from xoron_dist.train.reshard import saved_layout

    run = root / "run"
    ckpt = run / "checkpoints" / tag
    layout = saved_layout(run, ckpt, load_config(run / "config.yaml"))
    return read_full_moments(ckpt, layout.cfg, layout.world_size)


@pytest.mark.multirank
def test_dp2_zero3_checkpoint_resumes_on_tp2_and_on_one_rank(saved, tmp_path):
    """dp2 ZeRO-3 -> tp2 ZeRO-1 (2 ranks) with Adam's moments carried, and -> 1 rank ZeRO-3 (its partitions
    written directly) without them. The first loss after the resume is the one-rank reference's, with the data
    position and the LR schedule where the run stopped; the expert biases travel (the reference without them
    differs). The update of step 3 on tp2 equals that of the saved run, which went on in its own layout without a
    stop; with fresh moments it does not."""
    state = torch.load(saved / "run" / "checkpoints" / "step00000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    assert state["layers.1.ffn.router.expert_bias"].abs().sum() > 0  # the biases moved during the 2 steps
    reference = _reference_loss(saved)
    without_biases = _reference_loss(saved, zero_biases=True)
    assert abs(without_biases - reference) > 1e-4, "the test needs biases that change the routing"

    tp2 = _resumed_copy(saved, tmp_path / "tp2")
    run_ranks(_train_rank, 2, str(tp2), ("parallel.tp=2", "parallel.zero_stage=1", "train.micro_batch_size=4",
                                          "train.steps=3", "train.reshard=true", "train.reshard_optimizer=true"),
              True, timeout=240)
    one = _resumed_copy(saved, tmp_path / "one")
    run_ranks(_train_rank, 1, str(one), ("parallel.zero_stage=3", "train.micro_batch_size=4", "train.steps=3",
                                          "train.reshard=true", "train.reshard_optimizer=false"), True, timeout=240)
    assert losses(saved, "run")[3] == pytest.approx(reference, rel=1e-5, abs=1e-6)  # layout A, no stop
    for root in (tp2, one):
        logged = losses(root, "run")
        assert sorted(logged) == [1, 2, 3]
        assert logged[3] == pytest.approx(reference, rel=1e-5, abs=1e-6), (root.name, logged[3], reference)
        lrs = [rec["lr"] for rec in records(root, "run")]
        assert lrs[2] > lrs[1]  # step 3 of the warmup, not step 1 again
        assert (root / "run" / "checkpoints" / "step00000003" / "trainer_state.json").is_file()
    assert (tp2 / "run" / "checkpoints" / "step00000003" / "mp_rank_01_model_states.pt").is_file()

    # The weights after the resumed step (the fp32 masters the step-3 checkpoints hold, read back): tp2 with the
    # moments carried makes the update the dp2 ZeRO-3 run made (measured 6e-8 apart: summation order); the
    # one rank with fresh moments makes Adam's first step (about lr = 3e-3 per weight; measured 4e-3 apart)
    from xoron_dist.export import consolidate

    before = consolidate(saved / "run" / "checkpoints" / "step00000002").state
    after = {root.name: consolidate(root / "run" / "checkpoints" / "step00000003").state for root in (tp2, one)}
    after["same"] = consolidate(saved / "run" / "checkpoints" / "step00000003").state  # layout A, no stop
    weights = [k for k in before if not k.endswith("expert_bias")]  # biases follow the balancer, not AdamW
    for state in after.values():
        moved, name = max(((state[k] - before[k]).abs().max().item(), k) for k in weights)
        assert 0 < moved < 1e-2, (moved, name)
    assert max((after["tp2"][k] - after["same"][k]).abs().max().item() for k in weights) < 1e-6
    assert max((after["one"][k] - after["same"][k]).abs().max().item() for k in weights) > 1e-3

    # The moments themselves: tp2's (ZeRO-1 fragments of TP slices) and the ZeRO-3 run's (partitions) read back
    # to the same full tensors (measured 5e-7 of each tensor's largest entry apart), at Adam's step 3; the fresh
    # run's count started again
    carried, continued = _moments(tp2, "step00000003"), _moments(saved, "step00000003")
    assert carried.step == continued.step == 3 and _moments(one, "step00000003").step == 1
    for key, full in continued.moments.items():
        assert sorted(carried.moments[key]) == sorted(full)
        for name, value in full.items():
            assert (carried.moments[key][name] - value).abs().max() <= 1e-5 * value.abs().max(), (key, name)


def test_a_changed_layout_without_reshard_is_refused_with_what_differs(saved, tmp_path, capsys):
    """1 rank resuming the 2-rank ZeRO-3 checkpoint without the flag: refused by the trainer, naming the
    differences and --reshard; a changed model config is refused even with the flag; --reshard needs
    --resume."""
    from xoron_dist.cli import main as xoron
    from xoron_dist.config import ConfigError, load_config
    from xoron_dist.train.reshard import check_layout, saved_layout

    root = _resumed_copy(saved, tmp_path)
    refused, = run_ranks(_train_rank, 1, str(root), ("parallel.zero_stage=1", "train.micro_batch_size=4",
                                                     "train.steps=3"), True)
    assert refused.startswith("ConfigError: checkpoint "), refused
    assert "parallel.zero_stage 3 -> 1" in refused and "world size 2 -> 1" in refused and "--reshard" in refused

    ckpt = root / "run" / "checkpoints" / "step00000002"
    other = load_config(SMOKE, [*COMMON, "parallel.zero_stage=1", "train.reshard=true", "model.llm.rms_norm_eps=1e-5"])
    with pytest.raises(ConfigError, match=r"another model: model\.llm\.rms_norm_eps 1e-06 -> 1e-05\. .*same model"):
        check_layout(saved_layout(root / "run", ckpt, other), other, 1, ckpt)
    same = load_config(SMOKE, [*COMMON, *SAVED])
    assert not check_layout(saved_layout(root / "run", ckpt, same), same, 2, ckpt)  # its own layout: no reshard

    assert xoron(["train", "--config", str(SMOKE), "--reshard"]) == 2
    assert "--reshard goes with --resume" in capsys.readouterr().err
    assert xoron(["train", "--config", str(SMOKE), "--resume", "--reshard-optimizer", "carry"]) == 2
    assert "--reshard-optimizer goes with --resume --reshard" in capsys.readouterr().err


def test_moments_of_a_zero0_checkpoint_are_refused_with_the_reason(saved, tmp_path):
    """ZeRO-0 saves torch's positional optimizer state_dict: its moments are refused naming why and the way
    out (the weights of the same files still consolidate)."""
    from xoron_dist.config import load_config
    from xoron_dist.export import consolidate
    from xoron_dist.train.consolidation import ConsolidationError, read_full_moments, read_full_tensors

    cfg = load_config(SMOKE, [*COMMON, "parallel.zero_stage=0"])
    torch.save({"module": consolidate(saved / "run" / "checkpoints" / "step00000002").state},
               tmp_path / "mp_rank_00_model_states.pt")  # a one-rank ZeRO-0 checkpoint's model file
    assert len(dict(read_full_tensors(tmp_path, cfg, 1))) > 0
    with pytest.raises(ConsolidationError, match=r"ZeRO-0 checkpoint's optimizer state .* cannot be matched to "
                                                 r"their parameters; .*train\.reshard_optimizer=false"):
        read_full_moments(tmp_path, cfg, 1)
