"""Tensor parallelism: a TP=2 model equals the single-rank model on the same weights and data.

Compared: loss and every gradient after one step (each TP rank's slice against the matching slice
of the single-rank gradient), and the losses of 3 optimizer steps with SGD (which exposes
gradient-scale errors Adam's scale invariance would hide) and AdamW.
"""

import pytest
import torch

from tests.parallel.harness import run_ranks
from xoron_dist.config import load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.parallel.tensor import tp_slice

BASE = ["preset=tiny", "model.llm.pad_vocab_multiple=32", "train.seq_len=32"]


def _cfg(*overrides):
    return load_config(None, BASE + list(overrides))


def _batches(cfg, n=3):
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 33), generator=gen)
        labels = ids[:, 1:].clone()
        labels[0, :5] = -100  # a masked prompt
        out.append((ids[:, :-1], labels))
    return out


def _train(model, cfg, optimizer_name):
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses, first_grads = [], None
    for ids, labels in _batches(cfg):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def load_sharded(model, full_state):
    """Copy a single-rank state dict into a (possibly TP-split, vocab-padded) model."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    own = model.state_dict()
    for name, param in model.named_parameters():
        full = full_state[name]
        if getattr(param, "tensor_model_parallel", False):
            dim, stride = param.partition_dim, param.partition_stride
            rows = param.shape[dim] * size
            if full.shape[dim] < rows:  # vocabulary padded for TP: extra rows are never used
                pad = list(full.shape)
                pad[dim] = rows - full.shape[dim]
                full = torch.cat([full, torch.zeros(pad)], dim=dim)
            full = tp_slice(full, dim, stride, rank, size)
        own[name] = full
    model.load_state_dict(own)


def tensor_parallel_llm(cfg):
    """The tiny LLM built from seed 0 on one rank and split by ``parallelize`` (groups must exist)."""
    from xoron_dist.parallel.parallelize import parallelize

    torch.manual_seed(0)
    return parallelize(XoronLLM(cfg.llm), cfg).model


def _tp_body(overrides, optimizer_name, full_state):
    from xoron_dist.parallel import state

    cfg = _cfg("parallel.tp=2", *overrides)
    state.initialize(cfg)
    model = tensor_parallel_llm(cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    load_sharded(model, full_state)
    same_init = all(torch.equal(initial[n], p) for n, p in model.named_parameters())
    losses, grads = _train(model, cfg, optimizer_name)
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "meta": meta, "same_init": same_init,
            "tied": model.lm_head.weight is model.embed_tokens.weight}


@pytest.mark.multirank
@pytest.mark.parametrize(
    "overrides,optimizer_name",
    [
        pytest.param([], "sgd", id="sgd"),
        pytest.param([], "adamw", id="adamw"),
        pytest.param(["parallel.tp_experts=false"], "sgd", id="whole-experts"),
        pytest.param(["model.llm.pad_vocab_multiple=1", "model.llm.vocab_size=1023"], "sgd", id="padded-vocab"),
        pytest.param(["model.llm.q_lora_rank=null", "model.llm.dense_layers=1"], "sgd", id="dense-no-qlora"),
        # the full size's layout: LM head tied to the (vocab-padded) embedding, dense layers between MoE ones
        pytest.param(["model.llm.tie_word_embeddings=true", "model.llm.moe_layer_freq=2",
                      "model.llm.pad_vocab_multiple=1", "model.llm.vocab_size=1023"], "sgd", id="tied-alternating"),
    ],
)
def test_tp2_equals_single_rank(overrides, optimizer_name):
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    single = XoronLLM(cfg.llm)
    full_state = {k: v.clone() for k, v in single.state_dict().items()}
    ref_losses, ref_grads = _train(single, cfg, optimizer_name)
    results = run_ranks(_tp_body, 2, overrides, optimizer_name, full_state)
    for rank, out in enumerate(results):
        # The TP model is cut from the single-rank weights, also where TP pads the vocabulary.
        assert out["same_init"], rank
        assert out["tied"] == cfg.llm.tie_word_embeddings, rank  # one parameter again after the swap
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (rank, out["losses"], ref_losses)
        for name, grad in out["grads"].items():
            split, dim, stride = out["meta"][name]
            ref = ref_grads[name]
            if split:
                rows = grad.shape[dim] * 2
                if ref.shape[dim] < rows:
                    pad = list(ref.shape)
                    pad[dim] = rows - ref.shape[dim]
                    ref = torch.cat([ref, torch.zeros(pad)], dim=dim)
                ref = tp_slice(ref, dim, stride, rank, 2)
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} grad of {name}")


def _whole_and_chunked(model, ids, labels):
    """chunk size -> (loss, every gradient, whether the logits were None) for the one-piece head (0) and 24."""
    out = {}
    for chunk in (0, 24):
        model.zero_grad()
        model.lm_head.chunk_tokens = chunk
        res = model(ids, labels=labels)
        res.loss.backward()
        out[chunk] = (res.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, res.logits is None)
    return out


def _chunked_body(full_state):
    from xoron_dist.parallel import state

    cfg = _cfg("parallel.tp=2", "model.llm.pad_vocab_multiple=1", "model.llm.vocab_size=1023")
    state.initialize(cfg)
    model = tensor_parallel_llm(cfg)
    load_sharded(model, full_state)
    return _whole_and_chunked(model, *_batches(cfg, 1)[0])


@pytest.mark.multirank
def test_chunked_loss_equals_the_whole_loss_single_rank_and_tp2():
    """``loss_chunk_tokens``: the head + loss over chunks of 24 tokens (64 tokens, a ragged last chunk),
    ``LinearCrossEntropy``, give the loss and every gradient of the one-piece head; with TP=2 and a
    vocabulary TP pads too (each rank's rows, the per-token max and sums all-reduced per chunk)."""
    cfg = _cfg("model.llm.pad_vocab_multiple=1", "model.llm.vocab_size=1023")
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = _whole_and_chunked(model, *_batches(cfg, 1)[0])
    assert results[24][2] and not results[0][2]  # logits None only when chunked
    assert results[24][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[24][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for rank, out in enumerate(run_ranks(_chunked_body, 2, full_state)):
        assert out[24][2] and out[24][0] == pytest.approx(results[0][0], rel=1e-5), rank
        for name, grad in out[0][1].items():
            torch.testing.assert_close(out[24][1][name], grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
