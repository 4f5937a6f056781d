"""Export end to end: checkpoints written by the real trainer (ZeRO-3 on 2 ranks, TP=2 x EP=2 on 4, one
rank), consolidated on one process, exported to HF and loaded by transformers: the logits and greedy
tokens equal ours; the multi-rank weights equal the single-rank run's; a multimodal model survives the
round trip whole; and every way the input can be wrong is one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.runs import TEXT, run_train
from xoron_dist.cli import main as xoron
from xoron_dist.config import load_config
from xoron_dist.export import ConsolidatedCheckpoint, ConsolidationError, consolidate, export_hf, from_pretrained
from xoron_dist.export.hf import ExportError
from xoron_dist.model.xoron import XoronMultimodalModel, build_model
from xoron_dist.tokenizer import XoronTokenizer
from xoron_dist.train.deepspeed_shards import load_file

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
COMMON = (TEXT, "train.steps=3", "train.save_every=3", "train.seq_len=64", "model.llm.pad_vocab_multiple=32")
EPS = "model.llm.rms_norm_eps=1e-5"  # not DeepSeek's 1e-6: HF must take it from config.json


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _trained(root: Path, name: str, *overrides: str, world: int = 1) -> Path:
    """3 steps of the trainer (global batch 4), trained once per module."""
    if not (root / name / "checkpoints" / "latest").is_file():
        run_train(root, name, *COMMON, *overrides, world=world)
    return root / name


LAYOUTS = {  # name -> (overrides, world)
    "single_eps": ((EPS, "parallel.zero_stage=0", "train.micro_batch_size=4"), 1),
    "single": (("parallel.zero_stage=0", "train.micro_batch_size=4"), 1),
    "zero3_eps": ((EPS, "parallel.zero_stage=3", "train.micro_batch_size=2"), 2),
    "tp2_ep2": (("parallel.tp=2", "parallel.ep=2", "parallel.zero_stage=1", "train.micro_batch_size=2"), 4),
    "pp2": (("parallel.pp=2", "parallel.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum_steps=2"), 2),
}


def trained(runs: Path, name: str) -> Path:
    overrides, world = LAYOUTS[name]
    return _trained(runs, name, *overrides, world=world)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.multirank
@pytest.mark.parametrize("name, reference, tolerance", [
    ("zero3_eps", "single_eps", 1e-5), ("tp2_ep2", "single", 2e-5), ("pp2", "single", 1e-5)])
def test_multi_rank_checkpoints_consolidate_to_the_single_rank_weights(runs, name, reference, tolerance):
    """ZeRO-3 partitions (2 ranks), TP=2 x EP=2 slices and experts (4 ranks) and PP=2 stages (2 ranks; both
    ZeRO-1 masters) give the weights one rank reaches on the same global batches (the trainer's parity tests
    guarantee the losses; differences are Adam's rounding, ~1e-6); the expert biases (buffers) come along."""
    got, want = consolidate(trained(runs, name)), consolidate(trained(runs, reference))
    assert "fp32 master weights" in got.source and "module weights" in want.source
    assert _max_diff(got.state, want.state) <= tolerance
    bias = got.state["layers.1.ffn.router.expert_bias"]
    assert bias.abs().sum() > 0 and torch.equal(bias, want.state["layers.1.ffn.router.expert_bias"])


@pytest.mark.parametrize("name", [
    "single_eps",
    pytest.param("zero3_eps", marks=pytest.mark.multirank),
    pytest.param("tp2_ep2", marks=pytest.mark.multirank),
])
def test_hf_export_loads_in_transformers_with_our_logits_and_tokens(runs, name, tmp_path):
    """``xoron export``, then transformers' DeepseekV3ForCausalLM and AutoTokenizer, and our own loader."""
    run = trained(runs, name)
    out = tmp_path / "hf"
    assert xoron(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(out)]) == 0
    ours = consolidate(run).build_model()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.rms_norm_eps == ours.cfg.rms_norm_eps
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    prompt = ids[:1, :8]
    greedy_hf = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    greedy_ours = ours.generate_text(prompt, 6, temperature=0, eos_token_id=eos)
    assert greedy_hf.tolist() == greedy_ours[:, : greedy_hf.shape[1]].tolist()

    back = from_pretrained(out)
    assert _max_diff(back.state_dict(), ours.state_dict()) == 0.0
    text = "Two red circles and 3 blue squares."
    tokenizer = XoronTokenizer.load(run / "tokenizer")
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer.encode(text)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nlicense: other") and "## Intended use and limits" in card


def test_multimodal_model_round_trips_whole(tmp_path):
    """The smoke run's model (every encoder, projector, fusion layer and generator): the LLM in HF shards
    that transformers loads, the rest in ``xoron_multimodal.safetensors``, all back identical."""
    cfg = load_config(REPO / "pipelines" / "smoke.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    out = export_hf(ConsolidatedCheckpoint(cfg, state, multimodal=True, step=7), tmp_path / "mm")
    back = from_pretrained(out)
    assert isinstance(back, XoronMultimodalModel)
    assert _max_diff(back.state_dict(), state) == 0.0
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.llm.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model.llm(ids).logits).abs().max().item() <= 1e-5
    card = (out / "README.md").read_text()
    assert "| vision |" in card and "| speech |" in card and "xoron_multimodal.safetensors" in card


def test_an_export_from_before_the_pitch_source_loads(tmp_path):
    """An export written before BigVGAN's pitch source and harmonic branch were on by default has no such tensors
    and its config names neither option: ``from_pretrained`` sizes them from the tensors (off) and loads strictly."""
    off = ["model.speech.vocoder.source_harmonics=0", "model.speech.vocoder.envelope_harmonics=0"]
    cfg = load_config(REPO / "pipelines" / "smoke.yaml", off)
    torch.manual_seed(0)
    state = {name: t.detach().clone() for name, t in build_model(cfg).state_dict().items()}
    out = export_hf(ConsolidatedCheckpoint(cfg, state, multimodal=True, step=7), tmp_path / "old")
    text = (out / "xoron_config.yaml").read_text()
    old = "\n".join(line for line in text.splitlines() if not line.strip().startswith(("source_harmonics:",
                                                                                      "envelope_harmonics:")))
    assert old != text
    (out / "xoron_config.yaml").write_text(old + "\n")
    assert load_config(out / "xoron_config.yaml").model.speech.vocoder.source_harmonics > 0  # today's default
    back = from_pretrained(out)
    assert back.speech.vocoder.generator.source is None and _max_diff(back.state_dict(), state) == 0.0


def _one_line_error(capsys, argv: list[str]) -> str:
    assert xoron(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_format_and_an_existing_export_are_one_line_errors(runs, tmp_path, capsys):
    run = trained(runs, "single_eps")
    base = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]
    assert "safetensors is unknown; formats: hf, gguf, onnx" in _one_line_error(capsys, [*base, "--format",
                                                                                         "safetensors"])
    assert "--quant applies to --format gguf only" in _one_line_error(capsys, [*base, "--quant", "q8_0"])
    assert xoron([*base, "--format", "hf"]) == 0
    assert "exported step 3 (ZeRO-0 on 1 ranks" in capsys.readouterr().err
    assert "already holds an export; pass --force" in _one_line_error(capsys, [*base, "--format", "hf"])
    (tmp_path / "hf" / "model-00007-of-00009.safetensors").write_bytes(b"stale")  # a shard of an older export
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert xoron([*base, "--format", "hf", "--force"]) == 0
    assert not (tmp_path / "hf" / "model-00007-of-00009.safetensors").exists()
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"  # --force removes only export files


def _copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = shutil.copytree(run, tmp_path / run.name)
    return copy, copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()


def test_damaged_missing_and_foreign_checkpoints_are_named(runs, tmp_path):
    run, tag = _copy(trained(runs, "single_eps"), tmp_path)
    with pytest.raises(ConsolidationError, match="holds no checkpoint"):
        consolidate(tmp_path)

    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["model"]["llm"]["num_layers"] = 3  # the run directory reused for another model
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(ConsolidationError, match=r"holds another model config: .* hash .*config.yaml"):
        consolidate(run)
    shutil.copyfile(trained(runs, "single_eps") / "config.yaml", run / "config.yaml")

    weights = tag / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConsolidationError, match=r"is damaged: mp_rank_00_model_states\.pt: sha256"):
        consolidate(tag)

    weights.unlink()
    with pytest.raises(ConsolidationError, match=r"mp_rank_00_model_states\.pt is missing"):
        consolidate(run / "checkpoints")
    manifest = json.loads((tag / "trainer_state.json").read_text())
    del manifest["files"][weights.name]  # a manifest that lost track of the file: the layout still names it
    (tag / "trainer_state.json").write_text(json.dumps(manifest))
    with pytest.raises(ConsolidationError, match=r"lacks 1 file\(s\) that ZeRO-0 on 1 ranks .* mp_rank_00"):
        consolidate(tag)


def test_an_llm_transformers_cannot_express_is_refused(tmp_path):
    cfg = load_config(None, ["preset=tiny", "model.llm.moe.router_score=softmax"])
    state = {n: t.clone() for n, t in build_model(cfg).state_dict().items()}
    with pytest.raises(ExportError, match="format hf: .*router_score='softmax'"):
        export_hf(ConsolidatedCheckpoint(cfg, state, multimodal=False), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_bf16_run_exports_its_fp32_master_weights(tmp_path):
    """bf16 on CPU (DeepSpeed's BF16_Optimizer, ZeRO-1: ``bf16_zero_pp_rank_*`` files): the export holds the
    fp32 masters, of which the saved bf16 module weights are the rounding."""
    run_train(tmp_path, "bf16", *COMMON, "train.precision=bf16", "parallel.zero_stage=1", "train.micro_batch_size=4")
    ckpt = consolidate(tmp_path / "bf16")
    module = load_file(ckpt.checkpoint / "mp_rank_00_model_states.pt")["module"]
    weight = ckpt.state["layers.0.ffn.experts.gate_up"]
    assert module["layers.0.ffn.experts.gate_up"].dtype == torch.bfloat16 and weight.dtype == torch.float32
    assert torch.equal(weight.bfloat16(), module["layers.0.ffn.experts.gate_up"])
    assert not torch.equal(weight.bfloat16().float(), weight)  # finer than bf16: the masters, not the module
