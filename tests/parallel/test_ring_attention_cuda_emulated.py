"""Ring attention on 2 gloo ranks with its block kernel on the emulated CUDA ops == single-rank SDPA.

Each rank swaps the kernel adapter's op lookup for ``tests/model/cuda_sdpa_emulator.py`` (the CUDA
ops' signatures, dtypes, head-dim limits and padded LSE, in plain torch), so the ring's forward
merge and its recomputing backward run through the CUDA branch: fp32 tiles take the efficient
kernel, masked tiles (packed documents) its aligned bias. The cases and the oracle are the CPU
ring test's (``test_ring_attention``).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.parallel.harness import run_ranks
from tests.parallel.test_ring_attention import TOL, _expanded_case, _latent_case

pytestmark = pytest.mark.multirank


def _body(seed: int) -> dict:
    import xoron_dist.model.common.attention_kernels as ak
    from tests.model.cuda_sdpa_emulator import EMULATED_CUDA_OPS

    calls: list[str] = []

    def counted(name):
        op = getattr(EMULATED_CUDA_OPS, name)
        return lambda *a, **kw: calls.append(name) or op(*a, **kw)

    ak._device_type = lambda t: "cuda"
    ak.CUDA_OPS = ak.CudaOps(*(counted(n) for n in ("flash", "flash_backward", "efficient", "efficient_backward")))
    dist.init_process_group("gloo")
    results = {case: _expanded_case(case, None, seed) for case in ("causal_packed", "full_packed")}
    results["latent"] = _latent_case(None, seed, True, True)
    return {"diffs": results, "kernels": sorted(set(calls))}


def test_ring_on_emulated_cuda_kernels_matches_sdpa():
    for rank, result in enumerate(run_ranks(_body, 2, 0, timeout=120)):
        assert result["kernels"] == ["efficient", "efficient_backward"], result["kernels"]  # fp32: no flash
        for case, diffs in result["diffs"].items():
            assert max(diffs.values()) <= TOL, f"rank {rank} {case}: {diffs}"
