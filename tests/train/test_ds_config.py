"""build_ds_config: our values win over the JSON's, loudly; the optimizer section per device."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from xoron_dist.config import XoronConfig
from xoron_dist.parallel.device import detect_device
from xoron_dist.train import ds_config
from xoron_dist.train.ds_config import REPO_ROOT, build_ds_config, write_ds_config
from xoron_dist.utils.typed_config import ConfigError

SHIPPED = ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]


def _cfg(**train):
    stage = train.pop("zero_stage", 1)
    return XoronConfig.from_dict({"train": {"micro_batch_size": 4, "grad_accum_steps": 2, "grad_clip": 0.5,
                                            "lr": 2e-3, "beta2": 0.98, "eps": 1e-7, "weight_decay": 0.05,
                                            **train},
                                  "parallel": {"zero_stage": stage}})


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid_json_without_scheduler(name):
    data = json.loads((REPO_ROOT / "ds_configs" / name).read_text())
    assert "zero_optimization" in data and "scheduler" not in data and "optimizer" not in data
    assert data["steps_per_print"] >= 10**6 and data["wall_clock_breakdown"] is False


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_accepted_by_deepspeed(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    stage = json.loads((REPO_ROOT / "ds_configs" / name).read_text())["zero_optimization"]["stage"]
    optimizer = "cpu_adam" if "offload" in name else "auto"
    ds = build_ds_config(_cfg(ds_config=f"ds_configs/{name}", zero_stage=stage, optimizer=optimizer),
                         dp_size=1, dtype=torch.bfloat16, device_kind="cuda")
    parsed = DeepSpeedConfig(ds)  # the pydantic sections reject unknown keys
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.train_batch_size == 8 and parsed.gradient_clipping == 0.5


def test_owned_values_filled(caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_ds_config(_cfg(ds_config="ds_configs/zero2.json", zero_stage=2), dp_size=3,
                             dtype=torch.float32, device_kind="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "scheduler" not in ds
    assert not caplog.records, "the shipped JSONs use \"auto\" for our values: nothing to warn about"


@pytest.mark.parametrize(("dtype", "bf16", "fp16"),
                         [(torch.bfloat16, True, False), (torch.float16, False, True), (torch.float32, False, False)])
def test_precision_from_dtype(dtype, bf16, fp16):
    ds = build_ds_config(_cfg(), dp_size=1, dtype=dtype, device_kind="cuda")
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16
    assert ds["fp16"]["initial_scale_power"] == 16  # the JSON's loss-scale settings survive


def test_optimizer_auto_on_cpu_is_torch_adamw():
    ds = build_ds_config(_cfg(), dp_size=1, dtype=torch.float32, device_kind="cpu")
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-7,
                                                           "weight_decay": 0.05, "torch_adam": True}}


@pytest.fixture
def plain_pip_install(monkeypatch, tmp_path):
    """A GPU node with the torch wheel only: no CUDA_HOME, no nvcc anywhere, no prebuilt DeepSpeed op."""
    from deepspeed import git_version_info

    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(ds_config, "CUDA_HOME_FALLBACK", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(git_version_info, "installed_ops", {**git_version_info.installed_ops, "fused_adam": False})
    return tmp_path


def _cuda_stand_in(monkeypatch):
    """detect_device as on one bf16 GPU, without one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return detect_device(0, "auto")


def test_optimizer_auto_on_cuda_without_a_toolkit_is_torch_fused_adamw(plain_pip_install, monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    info = _cuda_stand_in(monkeypatch)
    assert (info.kind, info.dtype) == ("cuda", torch.bfloat16)
    ds = build_ds_config(_cfg(), dp_size=1, dtype=info.dtype, device_kind=info.kind)
    params = dict(ds["optimizer"]["params"])
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    # DeepSpeed's own mapping of that section: torch.optim.AdamW(fused=True), no op to build
    engine = SimpleNamespace(zero_use_cpu_optimizer=lambda: False)
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(engine, params, True)
    optimizer = cls([torch.nn.Parameter(torch.zeros(4))], **params, **kwargs)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True


def test_optimizer_auto_on_cuda_takes_a_prebuilt_fused_adam(plain_pip_install, monkeypatch):
    from deepspeed import git_version_info

    monkeypatch.setattr(git_version_info, "installed_ops", {"fused_adam": True})
    monkeypatch.setattr(git_version_info, "accelerator_name", "cuda", raising=False)
    ds = build_ds_config(_cfg(), dp_size=1, dtype=torch.bfloat16, device_kind="cuda")
    assert ds["optimizer"]["type"] == "AdamW" and not {"torch_adam", "fused"} & set(ds["optimizer"]["params"])


def test_fused_adam_on_cuda_needs_a_prebuilt_op_or_nvcc(plain_pip_install, monkeypatch):
    with pytest.raises(ConfigError, match="no nvcc.*CUDA_HOME=<unset>.*train.optimizer=auto"):
        build_ds_config(_cfg(optimizer="fused_adam"), dp_size=1, dtype=torch.bfloat16, device_kind="cuda")
    nvcc = plain_pip_install / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    monkeypatch.setenv("CUDA_HOME", str(nvcc.parents[1]))  # a toolkit to JIT-compile with: the user's choice stands
    ds = build_ds_config(_cfg(optimizer="fused_adam"), dp_size=1, dtype=torch.bfloat16, device_kind="cuda")
    assert "torch_adam" not in ds["optimizer"]["params"]


@pytest.mark.parametrize(("dtype", "accum", "stage", "choice", "expected"), [
    (torch.bfloat16, 2, 1, "auto", "fp32"),
    (torch.bfloat16, 2, 3, "auto", "fp32"),
    (torch.bfloat16, 1, 1, "auto", None),  # nothing accumulates
    (torch.bfloat16, 2, 0, "auto", None),  # DeepSpeed accumulates in fp32 only under ZeRO
    (torch.bfloat16, 2, 1, "bf16", "bf16"),
    (torch.bfloat16, 1, 2, "fp32", "fp32"),
    (torch.float32, 2, 1, "auto", None),
    (torch.float16, 2, 1, "fp32", None),
])
def test_grad_accum_dtype(dtype, accum, stage, choice, expected):
    cfg = _cfg(grad_accum_steps=accum, zero_stage=stage, grad_accum_dtype=choice)
    ds = build_ds_config(cfg, dp_size=1, dtype=dtype, device_kind="cuda")
    assert ds.get("data_types", {}).get("grad_accum_dtype") == expected
    # ZeRO-1's BF16_Optimizer must move each grad into fp32 as it lands (see build_ds_config)
    assert ds["bf16"].get("immediate_grad_update", False) is (expected == "fp32" and stage == 1)
    if expected is not None:
        from deepspeed.runtime.config import DeepSpeedConfig

        assert DeepSpeedConfig(ds).grad_accum_dtype == expected


def test_fp32_accumulation_without_zero_is_refused():
    with pytest.raises(ConfigError, match="grad_accum_dtype='fp32'.*parallel.zero_stage"):
        build_ds_config(_cfg(zero_stage=0, grad_accum_dtype="fp32"), dp_size=1, dtype=torch.bfloat16,
                        device_kind="cuda")


def test_optimizer_adamw_everywhere():
    ds = build_ds_config(_cfg(optimizer="adamw"), dp_size=1, dtype=torch.bfloat16, device_kind="cuda")
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_cpu_adam_needs_offload():
    with pytest.raises(ConfigError, match="offload_optimizer.*zero3_offload.json"):
        build_ds_config(_cfg(optimizer="cpu_adam"), dp_size=1, dtype=torch.float32, device_kind="cpu")
    ds = build_ds_config(_cfg(optimizer="cpu_adam", ds_config="ds_configs/zero3_offload.json", zero_stage=3),
                         dp_size=1, dtype=torch.float32, device_kind="cpu")
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_fused_adam_rejects_offload():
    with pytest.raises(ConfigError, match="fused_adam"):
        build_ds_config(_cfg(optimizer="fused_adam", ds_config="ds_configs/zero3_offload.json", zero_stage=3),
                        dp_size=1, dtype=torch.float32, device_kind="cuda")


def test_conflicts_are_overridden_with_a_warning(tmp_path, caplog):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({
        "train_batch_size": 1024, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
        "bf16": {"enabled": True},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "scheduler": {"type": "WarmupLR"},
        "some_future_key": "auto",
    }))
    with caplog.at_level(logging.WARNING, logger="xoron_dist.train.ds_config"):
        ds = build_ds_config(_cfg(ds_config=str(path), zero_stage=1), dp_size=2, dtype=torch.float32,
                             device_kind="cpu")
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["type"] == "AdamW" and "scheduler" not in ds
    text = caplog.text
    for expected in ("train_batch_size=1024", "gradient_clipping=1.0", "zero_optimization.stage=3",
                     "bf16.enabled=True", "'optimizer' section", "'scheduler' section", "some_future_key"):
        assert expected in text
    assert "train_micro_batch_size_per_gpu" not in text  # same value: no warning


def test_missing_file_names_the_path():
    with pytest.raises(ConfigError, match=r"ds_configs/nope\.json.*not found.*zero1\.json"):
        build_ds_config(_cfg(ds_config="ds_configs/nope.json"), dp_size=1, dtype=torch.float32, device_kind="cpu")


def test_invalid_json_names_the_path_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 1,}\n}\n')
    with pytest.raises(ConfigError, match=rf"{bad}.*not valid JSON \(line 2"):
        build_ds_config(_cfg(ds_config=str(bad)), dp_size=1, dtype=torch.float32, device_kind="cpu")


def test_path_relative_to_repo_root_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = build_ds_config(_cfg(ds_config="ds_configs/zero1.json"), dp_size=1, dtype=torch.float32, device_kind="cpu")
    assert ds["zero_optimization"]["stage"] == 1


def test_write_ds_config_round_trips(tmp_path):
    ds = build_ds_config(_cfg(), dp_size=1, dtype=torch.float32, device_kind="cpu")
    out = write_ds_config(tmp_path / "run" / "ds_config.json", ds)
    assert json.loads(out.read_text()) == ds
    assert not list(out.parent.glob("*.tmp"))


def test_comment_of_a_template_with_another_stage_is_rewritten():
    ds = build_ds_config(_cfg(ds_config="ds_configs/zero1.json", zero_stage=3), dp_size=2,
                         dtype=torch.float32, device_kind="cpu")
    assert ds["zero_optimization"]["stage"] == 3
    assert "ZeRO-1" not in ds["_comment"] and "stage=3" in ds["_comment"]
    same = build_ds_config(_cfg(ds_config="ds_configs/zero1.json", zero_stage=1), dp_size=2,
                           dtype=torch.float32, device_kind="cpu")
    assert same["_comment"].startswith("ZeRO-1")
