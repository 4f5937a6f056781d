"""The step-time model: FLOPs against torch's FLOP counter, and what each parallel dimension adds."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xoron_dist.config import load_config
from xoron_dist.model.common.moe import RoutedExperts
from xoron_dist.model.llm import XoronLLM
from xoron_dist.model.llm.attention import LatentKVCache
from xoron_dist.parallel.layout import validate_layout
from xoron_dist.plan.cluster import load_cluster
from xoron_dist.plan.cost import attention_flops, estimate_step, matmul_flops, step_flops
from xoron_dist.plan.memory import TrainingShape, latent_cache_bytes

TINY = ["preset=tiny", "train.seq_len=64"]


@pytest.mark.parametrize("extra", [[], ["model.llm.dense_layers=1"], ["model.llm.tie_word_embeddings=true"]])
def test_matmul_flops_equal_torch_flop_counter(extra):
    """FlopCounterMode counts every matmul of forward + backward (on CPU it does not count the fused
    attention kernel, which ``attention_flops`` covers): 6 x active parameters x tokens."""
    cfg = load_config(None, TINY + extra)
    torch.manual_seed(0)
    model = XoronLLM(cfg.llm)
    for module in model.modules():  # torch 2.13's FlopCounterMode has no formula for _grouped_mm:
        if isinstance(module, RoutedExperts):  # count the experts on the per-expert matmul path
            module.use_grouped_mm = False
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 65))
    with FlopCounterMode(display=False) as counter:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert matmul_flops(cfg.llm, 2 * 64) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_step_flops_add_attention_and_recompute():
    llm = load_config(None, TINY).llm
    plain = step_flops(llm, 1024, 512, False)
    assert plain == matmul_flops(llm, 1024) + attention_flops(llm, 1024, 512)
    assert attention_flops(llm, 1024, 1024) == 2 * attention_flops(llm, 1024, 512)  # quadratic in the row
    assert plain < step_flops(llm, 1024, 512, True) < plain * 4 / 3


def _cost(overrides, world, cluster="h100x8", **shape):
    cfg = load_config(None, TINY + overrides)
    layout = validate_layout(cfg, world)
    t = cfg.train
    dims = dict(micro_batch_size=t.micro_batch_size, seq_len=t.seq_len, grad_accum_steps=t.grad_accum_steps,
                activation_checkpointing=False) | shape
    return estimate_step(cfg, layout, TrainingShape(**dims), load_cluster(cluster, gpus_per_node=world), True)


def test_each_dimension_adds_its_own_communication():
    dp = _cost(["parallel.zero_stage=1"], 8)
    assert dp.dp > 0 and dp.tp == dp.sp == dp.ep == dp.pp == 0
    assert _cost(["parallel.zero_stage=3"], 8).dp == pytest.approx(1.5 * dp.dp)  # weights gathered again
    tp = _cost(["parallel.tp=2"], 8)
    assert tp.tp > 0 and tp.compute == pytest.approx(dp.compute / 2)  # each replica's micro-batch over 2 ranks
    assert _cost(["parallel.ep=2"], 8).ep > 0
    assert _cost(["parallel.sp=2"], 8).sp > 0


def test_pipeline_bubble_shrinks_with_micro_batches():
    def idle_share(m):
        cost = _cost(["parallel.pp=2", "parallel.zero_stage=1", f"train.grad_accum_steps={m}"], 2, cluster="cpu")
        return cost.pp / cost.step_time

    # (pp-1)/(m+pp-1) of the pipeline's time is idle, plus the boundary sends (small next to the
    # compute of a slow device).
    assert idle_share(2) == pytest.approx(1 / 3, abs=0.02)
    assert idle_share(8) == pytest.approx(1 / 9, abs=0.02)


def test_latent_cache_bytes_equal_the_allocated_cache():
    llm = load_config(None, TINY).llm
    cache = LatentKVCache.allocate(llm, batch=3, max_len=50, device=torch.device("cpu"), dtype=torch.bfloat16)
    allocated = sum(t.nbytes for t in cache.latent + cache.rope_key)
    assert latent_cache_bytes(llm, 3, 50, llm.num_layers, 2) == allocated
