"""TFLOP/s and MFU of the step log (train/metrics.py): the peak table, the override, the arithmetic."""

import logging
from types import SimpleNamespace

import pytest
import torch

from xoron_dist.config import ConfigError, LLMConfig, load_config
from xoron_dist.model.flops import llm_step_flops
from xoron_dist.train.metrics import FlopsRate, ProgressLog, lookup_device_peak, peak_tflops, step_flops_rates


@pytest.mark.parametrize("name, entry, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.5),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-40GB", "A100 (40/80 GB, SXM/PCIe)", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100 (40/80 GB, SXM/PCIe)", 312.0),
    ("NVIDIA L40S", "L40S", 366.5),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10", "A10", 125.0),
    ("Tesla V100-PCIE-16GB", "V100 PCIe", None),
    ("Tesla V100-SXM2-32GB", "V100 SXM2", None),
    ("AMD Instinct MI300X", "MI300X", 1307.4),
])
def test_peak_table_matches_device_names(name, entry, bf16):
    peak = lookup_device_peak(name)
    assert peak is not None and peak.name == entry and peak.bf16 == bf16


def test_unknown_devices_and_precisions():
    assert lookup_device_peak("NVIDIA A10G") is None  # another chip than the A10: no guess
    assert lookup_device_peak("NVIDIA GeForce RTX 4090") is None
    h100 = lookup_device_peak("NVIDIA H100 80GB HBM3")
    assert h100.tflops(torch.float32, tf32=True) == 494.5 and h100.tflops(torch.float32, tf32=False) == 67.0
    v100 = lookup_device_peak("Tesla V100-SXM2-32GB")
    assert v100.tflops(torch.float16, tf32=True) == 125.0 and v100.tflops(torch.float32, tf32=True) == 15.7


def test_peak_from_the_device_name_the_override_and_cpu(monkeypatch, caplog):
    peak_tflops.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert peak_tflops(cuda, torch.bfloat16, True, None) == 989.5
    assert peak_tflops(cuda, torch.bfloat16, True, 700.0) == 700.0  # train.peak_tflops wins
    assert peak_tflops(torch.device("cpu"), torch.float32, True, None) is None
    assert peak_tflops(torch.device("cpu"), torch.float32, True, 2.0) == 2.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    peak_tflops.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert peak_tflops(cuda, torch.bfloat16, True, None) is None
        assert peak_tflops(cuda, torch.bfloat16, True, None) is None
    assert [r.getMessage() for r in caplog.records].count(
        "no peak TFLOP/s known for Mystery GPU 9000 in torch.bfloat16: MFU is not reported; set "
        "train.peak_tflops") == 1
    peak_tflops.cache_clear()


def test_mfu_from_a_known_peak():
    rate = FlopsRate(devices=2, peak=989.5)
    # 6 GFLOP per token at 100k tokens/s on 2 devices: 300 TFLOP/s each
    got = rate.rates(6e9, 1e5)
    assert got["tflops"] == pytest.approx(300.0) and got["mfu"] == pytest.approx(300.0 / 989.5)
    assert rate.rates(6e9, None) == {}  # the warm-up step has no rate yet
    assert FlopsRate(devices=1, peak=None).rates(6e9, 1e5) == {"tflops": pytest.approx(600.0)}
    with pytest.raises(ValueError, match="train.peak_tflops"):
        FlopsRate(devices=1, peak=0.0)


def test_step_rates_of_a_run_count_the_llm():
    llm = LLMConfig(vocab_size=200, special_token_slots=8, pad_vocab_multiple=16, hidden_size=32, num_layers=2,
                    num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    ctx = SimpleNamespace(device=torch.device("cpu"), device_info=SimpleNamespace(dtype=torch.float32), world_size=4)
    cfg = SimpleNamespace(llm=llm, train=SimpleNamespace(tf32=True, peak_tflops=None))
    peak_tflops.cache_clear()
    rates = step_flops_rates(cfg, ctx, 64, tokens_per_s=1000.0)
    assert rates == {"tflops": pytest.approx(llm_step_flops(llm, 1, 64) / 64 * 1000.0 / 4 / 1e12)}  # no MFU on CPU
    cfg.train.peak_tflops = 1e-6
    assert step_flops_rates(cfg, ctx, 64, 1000.0)["mfu"] == pytest.approx(rates["tflops"] / 1e-6)
    peak_tflops.cache_clear()


def test_progress_line_shows_tflops_and_mfu(caplog):
    progress = ProgressLog(10, log_every=10, rank=0, use_bar=False)
    with caplog.at_level(logging.INFO):
        line = progress.update(10, loss=1.0, lr=1e-3, tokens_per_s=5100.0, eta_s=0.0, tflops=312.4, mfu=0.3157)
    assert line == "step 10/10 | loss 1.000 | lr 1.0e-3 | 5.1k tok/s | 312 TFLOP/s | MFU 31.6% | eta 0:00:00"


def test_peak_tflops_config_is_checked():
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        load_config(None, ["train.peak_tflops=-5"])
    assert load_config(None, ["train.peak_tflops=989.5"]).train.peak_tflops == 989.5
