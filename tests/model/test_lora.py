"""LoRA adapters (model/lora.py, train/lora.py): exact zero init, adapter-only training, LoRA+,
tensor parallelism equal to one rank, and old checkpoints' config hash."""

import pytest
import torch

from tests.parallel.harness import run_ranks
from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.lora import LoRAError, apply_lora, is_adapter, is_b_matrix
from xoron_dist.parallel.tensor import tp_slice
from xoron_dist.train.build import parameter_groups
from xoron_dist.train.checkpoint import config_hash, hash_matches
from xoron_dist.train.lora import freeze_for_stage
from xoron_dist.train.stages import freeze_parameters, plan_stages

LORA = ["preset=tiny", "model.llm.dense_layers=1", "model.lora.enabled=true", "model.lora.rank=4",
        "model.lora.alpha=8", "model.llm.pad_vocab_multiple=32"]


def _cfg(*overrides):
    return load_config(None, LORA + list(overrides))


def _batches(cfg, n=3, seed=7):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 17), generator=gen)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _adapted(cfg, random_b=False):
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    apply_lora(model, cfg.model.lora)
    if random_b:  # an adapter as training leaves it, so its path through every layer counts
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_b_matrix(name):
                    param.normal_(std=0.1)
    return model


def test_zero_init_adapter_is_the_base_model_exactly(one_thread):
    cfg = _cfg("model.lora.dropout=0.2")
    torch.manual_seed(0)
    base = XoronLLM(cfg.llm)
    ids, labels = _batches(cfg, 1)[0]
    ref = base(ids, labels=labels)
    counts = apply_lora(base, cfg.model.lora)
    assert counts == {"attention": 10, "ffn": 3, "shared_experts": 3, "routed_experts": 2, "projector": 0}
    base.train()
    got = base(ids, labels=labels)
    assert torch.equal(got.logits, ref.logits) and torch.equal(got.loss, ref.loss)
    got.loss.backward()  # B = 0: only the B matrices get a gradient at the first step
    grads = {n: p.grad for n, p in base.named_parameters() if is_adapter(n)}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".B"))
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.endswith(".A"))


def test_adapter_only_stage_changes_only_adapters_and_lora_plus_scales_b(one_thread):
    cfg = _cfg("model.lora.plus_ratio=4.0", "train.lr=1e-2")
    (plan,) = plan_stages(cfg)
    assert plan.trains == "adapters"  # with lora on, a stage trains the adapters unless it says otherwise
    model = _adapted(cfg)
    frozen = freeze_parameters(model, plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert frozen == sum(p.numel() for n, p in before.items() if not is_adapter(n))
    groups = parameter_groups(model, 0.1, 0, lora_b_lr=(cfg.train.lr, cfg.model.lora.plus_ratio))
    b_groups = [g for g in groups if g["name"].endswith("_lora_B")]
    assert {id(p) for g in b_groups for p in g["params"]} == {id(p) for n, p in model.named_parameters()
                                                               if is_b_matrix(n)}
    assert all(g["lr"] == pytest.approx(4e-2) for g in b_groups) and all("lr" not in g for g in groups
                                                                         if g not in b_groups)
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    for ids, labels in _batches(cfg):
        opt.zero_grad()
        model(ids, labels=labels).loss.backward()
        opt.step()
    for name, param in model.named_parameters():
        if is_adapter(name):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # bit-identical base
    # LoRA+: the first Adam step moves every B entry by about its group's lr (Adam's step is ~lr·sign)
    fresh = _adapted(cfg)
    freeze_parameters(fresh, plan)
    opt = torch.optim.Adam(parameter_groups(fresh, 0.0, 0, lora_b_lr=(1e-3, 4.0)), lr=1e-3)
    ids, labels = _batches(cfg, 1)[0]
    fresh(ids, labels=labels).loss.backward()
    opt.step()
    b = fresh.get_parameter("layers.0.attn.kv_up.lora.B")
    moved = b.detach().abs()[b.grad.abs() > 1e-6]
    assert moved.numel() and torch.allclose(moved, torch.full_like(moved, 4e-3), rtol=1e-2)


def test_trains_base_freezes_adapters_and_needs_lora():
    model = _adapted(_cfg())
    frozen = freeze_for_stage(model, "base")
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    assert all(p.requires_grad != is_adapter(n) for n, p in model.named_parameters())
    cfg = load_config(None, ["preset=tiny", "train.steps=2", "stages=[{name: a, steps: 2, trains: adapters}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\].trains.*model.lora.enabled"):
        plan_stages(cfg)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ConfigError, match="model.lora.targets"):
        _cfg("model.lora.targets=[attention, mlp]")
    with pytest.raises(ConfigError, match="model.lora.rank"):
        _cfg("model.lora.rank=0")
    with pytest.raises(LoRAError, match="match no layer"):
        apply_lora(XoronLLM(_cfg().llm), _cfg("model.lora.targets=[projector]").model.lora)


def test_config_hash_of_runs_without_lora_is_unchanged():
    """The lora section is hashed only when enabled: every checkpoint written before it (same model,
    lora off) keeps its hash and resumes; one with adapters is another model."""
    off = load_config(None, ["preset=tiny"])
    old = "4cd82170a206a87d"  # config_hash of preset=tiny as the code before LoRA computed it (recorded)
    assert config_hash(off) == old and hash_matches(old, off)
    on = load_config(None, ["preset=tiny", "model.lora.enabled=true"])
    assert config_hash(on) != old and not hash_matches(old, on)
    # a changed lora setting (while off) does not matter either
    assert config_hash(load_config(None, ["preset=tiny", "model.lora.rank=64"])) == old


def _train(model, cfg):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, first = [], None
    for ids, labels in _batches(cfg):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, first


def _tp_body(full_state):
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    cfg = _cfg("parallel.tp=2")
    state.initialize(cfg)
    model = _adapted(cfg)
    freeze_for_stage(model, "adapters")
    model = parallelize(model, cfg).model
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    own = model.state_dict()
    for name, param in model.named_parameters():  # the single-rank weights, sliced like the layers
        full = full_state[name]
        if getattr(param, "tensor_model_parallel", False):
            dim, stride = param.partition_dim, param.partition_stride
            if full.shape[dim] < param.shape[dim] * size:  # vocabulary padding
                pad = list(full.shape)
                pad[dim] = param.shape[dim] * size - full.shape[dim]
                full = torch.cat([full, torch.zeros(pad)], dim=dim)
            full = tp_slice(full, dim, stride, rank, size)
        own[name] = full
    model.load_state_dict(own)
    losses, grads = _train(model, cfg)
    meta = {n: (getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None,
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "meta": meta, "rank": rank}


@pytest.mark.multirank
def test_tp2_with_adapters_equals_single_rank():
    cfg = _cfg()
    single = _adapted(cfg, random_b=True)
    full_state = {k: v.detach().clone() for k, v in single.state_dict().items()}
    freeze_for_stage(single, "adapters")
    ref_losses, ref_grads = _train(single, cfg)
    results = run_ranks(_tp_body, 2, full_state)
    split_factors = set()
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (out["losses"], ref_losses)
        assert set(out["grads"]) == set(ref_grads)  # the adapters, and only they, train on every rank
        for name, grad in out["grads"].items():
            dim, stride = out["meta"][name]
            ref = ref_grads[name] if dim is None else tp_slice(ref_grads[name], dim, stride, out["rank"], 2)
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=name)
            if dim is not None:
                split_factors.add(name.rsplit(".", 1)[1] + f"@{dim}")
    # column layers split B on out, row layers A on in; experts B (gate_up) and A (down)
    assert split_factors == {"B@0", "A@1", "B@1", "A@2"}
