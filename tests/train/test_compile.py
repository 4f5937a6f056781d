"""train.compile: the trainer with its decoder blocks compiled gives the eager run's losses.

One rank (the harness's forkserver: no import cost), the smoke model on synthetic text, 2 steps eager
then 2 steps compiled in the same process. The blocks compile with the "aot_eager" backend: the same
dynamo capture and AOT autograd graphs as inductor, without inductor's cold C++ builds (about 40 s on 2
busy cores, over this suite's budget). Every block of the smoke LLM is an MoE block, and it traces whole:
the routed experts' grouped GEMM is ``xoron::grouped_mm`` (tests/model/test_grouped_mm.py).
``python -m bench.llm_step --compile`` runs inductor itself and checks its losses against eager.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.harness import run_ranks
from tests.train.runs import records

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


def _losses(root: str, compile_: bool) -> list[dict]:
    from xoron_dist.config import load_config
    from xoron_dist.train.trainer import train

    name = f"compile_{compile_}"
    cfg = load_config(SMOKE, ["data.source=synthetic_text", "train.steps=2", "train.log_every=1",
                              f"train.output_dir={root}", f"train.name={name}", f"train.compile={compile_}",
                              "train.tensorboard=false"])
    train(cfg)
    return records(Path(root), name)


def _body(root: str) -> dict:
    from torch._dynamo.utils import counters

    from xoron_dist.train import compile as compile_module

    compile_module.BACKEND = "aot_eager"  # this rank's process only
    eager = _losses(root, False)
    assert not counters["stats"]["unique_graphs"]  # nothing compiled with the option off
    compiled = _losses(root, True)
    return {"eager": eager, "compiled": compiled, "graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values())}


def test_compiled_blocks_train_to_the_eager_losses(tmp_path):
    [result] = run_ranks(_body, 1, str(tmp_path), timeout=240)
    # the MoE blocks compiled whole: no graph break at the routed experts (before xoron::grouped_mm: 1 per block)
    assert result["graphs"] >= 1 and result["breaks"] == 0, result
    assert [r["step"] for r in result["compiled"]] == [1, 2]
    for a, b in zip(result["eager"], result["compiled"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)


def _checkpointed_packed_body() -> dict:
    import torch
    from torch._dynamo.utils import counters

    from xoron_dist.config import load_config
    from xoron_dist.model.llm import DecoderLayer, XoronLLM
    from xoron_dist.parallel.checkpointing import apply_activation_checkpointing
    from xoron_dist.train import compile as compile_module

    compile_module.BACKEND = "aot_eager"
    cfg = load_config(None, ["preset=tiny"]).llm
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.usable_vocab_size, (2, 32), generator=gen)
    documents = torch.tensor([[0] * 12 + [1] * 20, [0] * 25 + [1] * 7])  # packed: the layout is planned on the host
    grads = {}
    for compiled in (False, True):
        torch.manual_seed(1)
        model = XoronLLM(cfg)
        apply_activation_checkpointing(model, (DecoderLayer,))
        model.train()
        if compiled:
            assert compile_module.compile_blocks(model, torch.device("cpu")) == cfg.num_layers
        out = model(ids, labels=ids, document_ids=documents)
        out.loss.backward()
        grads[compiled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"grads": grads, "graphs": counters["stats"]["unique_graphs"]}


def test_checkpointed_blocks_with_packed_documents_compile_inside_their_checkpoint():
    """A checkpointed block compiles inside its checkpoint: the document layout's graph break splits its
    graph. Compiled from outside (the checkpoint one traced op), that one break left the whole block eager."""
    import torch

    [result] = run_ranks(_checkpointed_packed_body, 1, timeout=240)
    assert result["graphs"] >= 2, result["graphs"]  # the block's code before and after the break
    eager, compiled = result["grads"][False], result["grads"][True]
    assert eager.keys() == compiled.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
