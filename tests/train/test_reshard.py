"""Resharding (``train/reshard.py``): a checkpoint saved on 2 ranks under ZeRO-3 (dp 2) is resumed with
``train.reshard`` on 2 ranks under TP=2 and on 1 rank. The first loss after the resume must equal a
one-rank reference: the plain model with the checkpoint's consolidated weights (expert biases
included) on the batch at the saved data position. Without the flag, the resume is refused with the
differences named. The trainer runs in-process on the multi-rank harness's forked ranks (no launcher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.parallel.harness import run_ranks

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


def _losses(run: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run of 2 steps on 2 ranks, ZeRO-3 (its checkpoint step00000002), made once for the module."""
    root = tmp_path_factory.mktemp("reshard")
    run_ranks(_train_rank, 2, str(root), SAVED, False, timeout=240)
    return root


def _resumed_copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved / "run", tmp_path / "run")
    return tmp_path


def _reference_loss(saved: Path, zero_biases: bool = False) -> float:
    """The step-3 loss of one rank that loads the consolidated step-2 weights: the global batch of step 3
    (data position step 2, micro-step 0) through the plain model."""
    from xoron_dist.data.synthetic_text import SyntheticTextDataset
    from xoron_dist.export import consolidate
    from xoron_dist.tokenizer import build_tokenizer

    ckpt = consolidate(saved / "run" / "checkpoints" / "step00000002")
    if zero_biases:
        ckpt.state = {k: torch.zeros_like(v) if k.endswith("expert_bias") else v for k, v in ckpt.state.items()}
    model = ckpt.build_model()
    tokenizer = build_tokenizer(ckpt.cfg, saved / "run" / "tokenizer")
    data = SyntheticTextDataset(tokenizer, ckpt.cfg.data.num_documents, ckpt.cfg.data.seed, 64)
    rows = data.batch(2, 0, 0, 1, 4, grad_accum_steps=1)
    with torch.no_grad():
        return model(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss.item()


@pytest.mark.multirank
def test_dp2_zero3_checkpoint_resumes_on_tp2_and_on_one_rank(saved, tmp_path):
    """dp2 ZeRO-3 -> tp2 ZeRO-1 (2 ranks), and -> 1 rank ZeRO-3 (its partitions written directly): the first
    loss after the resume is the one-rank reference's, with the data position and the LR schedule where the
    run stopped; the expert biases travel (the reference without them differs)."""
    state = torch.load(saved / "run" / "checkpoints" / "step00000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    assert state["layers.1.ffn.router.expert_bias"].abs().sum() > 0  # the biases moved during the 2 steps
    reference = _reference_loss(saved)
    without_biases = _reference_loss(saved, zero_biases=True)
    assert abs(without_biases - reference) > 1e-4, "the test needs biases that change the routing"

    tp2 = _resumed_copy(saved, tmp_path / "tp2")
    run_ranks(_train_rank, 2, str(tp2), ("parallel.tp=2", "parallel.zero_stage=1", "train.micro_batch_size=4",
                                          "train.steps=3", "train.reshard=true"), True, timeout=240)
    one = _resumed_copy(saved, tmp_path / "one")
    run_ranks(_train_rank, 1, str(one), ("parallel.zero_stage=3", "train.micro_batch_size=4", "train.steps=3",
                                          "train.reshard=true"), True, timeout=240)
    for root in (tp2, one):
        losses = _losses(root / "run")
        assert sorted(losses) == [1, 2, 3]
        assert losses[3] == pytest.approx(reference, rel=1e-5, abs=1e-6), (root.name, losses[3], reference)
        lrs = [json.loads(line)["lr"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        assert lrs[2] > lrs[1]  # step 3 of the warmup, not step 1 again
        assert (root / "run" / "checkpoints" / "step00000003" / "trainer_state.json").is_file()
    assert (tp2 / "run" / "checkpoints" / "step00000003" / "mp_rank_01_model_states.pt").is_file()

    # The update after the resume: one AdamW step (fresh moments: about lr = 3e-3 per weight) from the
    # step-2 weights, the same on both layouts (the fp32 weights the checkpoints hold, read back).
    from xoron_dist.export import consolidate

    before = consolidate(saved / "run" / "checkpoints" / "step00000002").state
    after = {root.name: consolidate(root / "run" / "checkpoints" / "step00000003").state for root in (tp2, one)}
    for state in after.values():
        weights = [k for k in before if not k.endswith("expert_bias")]  # biases follow the balancer, not AdamW
        moved, name = max(((state[k] - before[k]).abs().max().item(), k) for k in weights)
        assert 0 < moved < 1e-2, (moved, name)
    # Adam's first step from zero moments is lr·g/(|g| + eps): where |g| is near eps, the layouts' different
    # summation orders move a weight by a visible fraction of lr (3e-3), so the bound is 1e-4, not 1e-5
    assert max((after["tp2"][k] - after["one"][k]).abs().max().item() for k in before) < 1e-4


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
