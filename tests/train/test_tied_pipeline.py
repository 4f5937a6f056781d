"""Tied word embeddings under pipeline parallelism, through the real trainer (gloo on CPU).

PP=2 with ``model.llm.tie_word_embeddings=true``: the first stage's embedding and the last stage's LM
head are two copies of one matrix whose gradients are summed over the embedding group before each
optimizer step (``xoron_dist/parallel/pipeline/tied.py``). Compared with one rank on the same seed and
batches: each step's loss and gradient norm (the tied gradient counted once), the final embedding,
the two copies bit-equal to each other, and the consolidated checkpoint (one embedding, the head tied).
"""

from __future__ import annotations

import pytest
import torch

from tests.train.runs import assert_same_steps, records, run_train
from tests.train.test_pipeline_runs import COMMON
from xoron_dist.train.consolidation import consolidate

TIED = (*COMMON, "model.llm.tie_word_embeddings=true", "train.steps=3", "train.micro_batch_size=2")


def _module(root, name, rank: int) -> dict[str, torch.Tensor]:
    path = root / name / "checkpoints" / "step00000003" / f"mp_rank_{rank:02d}_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.multirank
def test_tied_embeddings_over_two_stages_match_single_rank(tmp_path):
    run_train(tmp_path, "single", *TIED)
    run_train(tmp_path, "pp2", "parallel.pp=2", *TIED, world=2)

    single, ours = records(tmp_path, "single"), records(tmp_path, "pp2")
    assert [r["step"] for r in ours] == [r["step"] for r in single] == [1, 2, 3]
    assert_same_steps(single, ours)  # the grad norm equal: the tied gradient counted once
    assert single[-1]["loss"] < single[0]["loss"]

    reference = _module(tmp_path, "single", 0)["embed_tokens.weight"]
    first, last = _module(tmp_path, "pp2", 0), _module(tmp_path, "pp2", 1)
    assert "lm_head.weight" not in first and "embed_tokens.weight" not in last
    embed, head = first["embed_tokens.weight"], last["lm_head.weight"]
    assert torch.equal(embed, head), "the two stages' copies of the tied embedding drifted apart"
    assert not torch.equal(embed, _initial_embedding()), "the tied embedding did not train"
    torch.testing.assert_close(embed, reference, rtol=1e-5, atol=1e-7)

    # consolidation unites the stages: one embedding, the head its tied twin, both the single-rank weights
    full = consolidate(tmp_path / "pp2")
    assert torch.equal(full.state["embed_tokens.weight"], full.state["lm_head.weight"])
    torch.testing.assert_close(full.state["embed_tokens.weight"], reference, rtol=1e-5, atol=1e-7)
    model = full.build_model()
    assert model.lm_head.weight is model.embed_tokens.weight


def _initial_embedding() -> torch.Tensor:
    """The embedding every run starts from (the trainer's seed and config), to prove the steps moved it."""
    from tests.train.conftest import SMOKE
    from xoron_dist.config import load_config
    from xoron_dist.model.llm import XoronLLM

    cfg = load_config(SMOKE, list(TIED))
    torch.manual_seed(cfg.train.seed)
    return XoronLLM(cfg.llm).embed_tokens.weight.detach()
