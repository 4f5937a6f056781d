"""GGUF export: read back with ``gguf.GGUFReader`` and checked against the source weights (exact in f32,
within each quant's error bound otherwise); the file alone, run by an independent deepseek2 forward written
here from llama.cpp's graph (``models/deepseek2.cpp``: absorbed MLA over attn_k_b/attn_v_b, leading dense
layers, biased sigmoid routing), gives our logits; the dense-between-MoE rewrite is exact; every bad input
is one line; and, where llama-cpp-python is installed, llama.cpp itself decodes our tokens greedily."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xoron_dist.cli import main as xoron
from xoron_dist.config import load_config
from xoron_dist.export import ConsolidatedCheckpoint
from xoron_dist.export.gguf import dense_as_moe, export_gguf, ffn_layout, pad_shared, read_archive
from xoron_dist.export.hf import ExportError
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.common.rope import apply_rotary
from xoron_dist.model.xoron import build_model
from xoron_dist.tokenizer import XoronTokenizer, build_tokenizer

gguf = pytest.importorskip("gguf")

# 4 layers, MoE on every second one: layer 0 leading dense, 1 MoE, 2 dense *between* MoE layers, 3 MoE;
# the dense FFN (128) is wider than the one shared expert (64), so the shared count is raised to 2.
OVERRIDES = ["preset=tiny", "model.llm.num_layers=4", "model.llm.moe_layer_freq=2", "model.llm.init_std=0.08",
             "model.llm.moe.routed_scaling_factor=2.5"]
TEXT = "Two red circles and 3 blue squares.\nIt's   the end, isn't it?"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tokenizer a run of this config trains (byte-level BPE on the shipped corpus) and saves."""
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(load_config(None, OVERRIDES), directory)
    return directory


# The other branches: full-rank queries (attn_q), the head tied to the embedding, the softmax router, plain RoPE.
VARIANT = ["model.llm.q_lora_rank=null", "model.llm.tie_word_embeddings=true", "model.llm.moe.router_score=softmax",
           "model.llm.rope.type=default"]


def _checkpoint(*overrides: str) -> ConsolidatedCheckpoint:
    cfg = load_config(None, [*OVERRIDES, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for i in cfg.llm.moe_layers:  # a trained router's bias: it changes which experts are picked
        state[f"layers.{i}.ffn.router.expert_bias"] = torch.randn(cfg.llm.moe.num_experts) * 0.05
    return ConsolidatedCheckpoint(cfg, state, multimodal=False, step=3)


@pytest.fixture(scope="module")
def ckpt() -> ConsolidatedCheckpoint:
    return _checkpoint()


@pytest.fixture(scope="module")
def exports(ckpt, tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    return {quant: export_gguf(ckpt, root / quant, quant=quant, tokenizer_dir=tokenizer_dir) / f"xoron-llm-{quant}.gguf"
            for quant in ("f32", "f16", "q8_0", "q4_0")}


def _tensors(path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """name -> (values dequantized to f32 in PyTorch's dim order, stored type)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = values.reshape(tuple(reversed(t.shape.tolist()))).astype(np.float32), t.tensor_type
    return out


def _fields(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def test_metadata_holds_every_key_llama_cpp_deepseek2_reads(ckpt, exports, tokenizer_dir):
    cfg, meta = ckpt.cfg.llm, _fields(exports["f32"])
    expected = {
        "general.architecture": "deepseek2", "general.file_type": 0,
        "deepseek2.context_length": 2048, "deepseek2.embedding_length": 64, "deepseek2.block_count": 4,
        "deepseek2.feed_forward_length": 128, "deepseek2.vocab_size": 1088,
        "deepseek2.attention.head_count": 4, "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.q_lora_rank": 32, "deepseek2.attention.kv_lora_rank": 32,
        "deepseek2.attention.key_length": 32 + 8, "deepseek2.attention.value_length": 32,
        "deepseek2.attention.key_length_mla": 16 + 8, "deepseek2.attention.value_length_mla": 16,
        "deepseek2.leading_dense_block_count": 1,
        "deepseek2.expert_feed_forward_length": 64, "deepseek2.expert_count": 8, "deepseek2.expert_used_count": 2,
        "deepseek2.expert_shared_count": 2, "deepseek2.expert_weights_norm": True,
        "deepseek2.expert_gating_func": 2, "deepseek2.expert_group_count": 1, "deepseek2.expert_group_used_count": 1,
        "deepseek2.rope.dimension_count": 8, "deepseek2.rope.scaling.type": "yarn",
        "deepseek2.rope.scaling.original_context_length": 256,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": 1024, "tokenizer.ggml.eos_token_id": 1024,
        "tokenizer.ggml.padding_token_id": 1025, "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: meta.get(k) for k in expected} == expected
    approx = {"deepseek2.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "deepseek2.rope.freq_base": 10000.0,
              "deepseek2.expert_weights_scale": cfg.moe.routed_scaling_factor, "deepseek2.rope.scaling.factor": 8.0,
              "deepseek2.rope.scaling.yarn_log_multiplier": 0.1 * cfg.rope.mscale_all_dim}
    assert all(meta[k] == pytest.approx(v, rel=1e-6) for k, v in approx.items())

    tokenizer = XoronTokenizer.load(tokenizer_dir)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.padded_vocab_size and len(meta["tokenizer.ggml.merges"]) > 0
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == token for token, i in vocab.items())
    assert types[tokenizer.eos_id] == types[tokenizer.special_ids["image_pad"]] == gguf.TokenType.CONTROL
    assert types[5] == gguf.TokenType.NORMAL
    if tokenizer.vocab_size < cfg.padded_vocab_size:  # rows no token uses: placeholders llama.cpp skips
        assert tokens[-1] == "[PAD1087]" and types[-1] == gguf.TokenType.UNUSED


def test_f32_tensors_equal_the_source_and_kv_b_is_split_per_head(ckpt, exports):
    cfg, state, got = ckpt.cfg.llm, ckpt.state, _tensors(exports["f32"])
    assert all(kind == gguf.GGMLQuantizationType.F32 for _, kind in got.values())
    assert np.array_equal(got["token_embd.weight"][0], state["embed_tokens.weight"].numpy())
    assert np.array_equal(got["output.weight"][0], state["lm_head.weight"].numpy())
    kv_up = state["layers.1.attn.kv_up.weight"]  # rows: head 0 (nope, v), head 1 (nope, v), ...
    for head in range(cfg.num_heads):
        rows = kv_up[head * 32:(head + 1) * 32]
        assert np.array_equal(got["blk.1.attn_k_b.weight"][0][head], rows[:16].T.numpy())  # (r, nope)
        assert np.array_equal(got["blk.1.attn_v_b.weight"][0][head], rows[16:].numpy())  # (v, r)
    gate_up = state["layers.3.ffn.experts.gate_up"]
    assert np.array_equal(got["blk.3.ffn_gate_exps.weight"][0], gate_up[:, :64].numpy())
    assert np.array_equal(got["blk.3.ffn_up_exps.weight"][0], gate_up[:, 64:].numpy())
    assert np.array_equal(got["blk.3.exp_probs_b.bias"][0], state["layers.3.ffn.router.expert_bias"].numpy())
    shexp = got["blk.3.ffn_down_shexp.weight"][0]  # the real shared expert zero-padded from 64 to 128
    assert np.array_equal(shexp[:, :64], state["layers.3.ffn.shared.down_proj.weight"].numpy())
    assert not shexp[:, 64:].any() and not got["blk.3.ffn_gate_shexp.weight"][0][64:].any()
    assert np.array_equal(got["blk.2.ffn_up_shexp.weight"][0], state["layers.2.ffn.up_proj.weight"].numpy())
    assert not got["blk.2.ffn_down_exps.weight"][0].any() and "blk.2.ffn_up.weight" not in got


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def deepseek2_forward(path, ids: torch.Tensor, rope) -> torch.Tensor:
    """Logits (seq, vocab) of the GGUF at ``path`` for one row of ``ids``, computed from the file alone as
    llama.cpp's deepseek2 graph does; ``rope(positions) -> cos, sin`` is our rotary table (YaRN)."""
    meta = _fields(path)
    w = {name: torch.from_numpy(values) for name, (values, _) in _tensors(path).items()}
    p = "deepseek2."
    eps, heads, rank = meta[p + "attention.layer_norm_rms_epsilon"], meta[p + "attention.head_count"], \
        meta[p + "attention.kv_lora_rank"]
    rope_dim, k_dim = meta[p + "rope.dimension_count"], meta[p + "attention.key_length_mla"]
    kq_scale = 1 / math.sqrt(k_dim)
    if meta[p + "rope.scaling.type"] == "yarn":
        factor, log_mul = meta[p + "rope.scaling.factor"], meta[p + "rope.scaling.yarn_log_multiplier"] / 0.1
        kq_scale *= (0.1 * log_mul * math.log(factor) + 1) ** 2
    seq = ids.shape[0]
    cos, sin = rope(torch.arange(seq)[None])
    x = w["token_embd.weight"][ids]
    for i in range(meta[p + "block_count"]):
        b = f"blk.{i}."
        h = _rms(x, w[b + "attn_norm.weight"], eps)
        if meta[p + "attention.q_lora_rank"]:
            q = _rms(h @ w[b + "attn_q_a.weight"].T, w[b + "attn_q_a_norm.weight"], eps) @ w[b + "attn_q_b.weight"].T
        else:
            q = h @ w[b + "attn_q.weight"].T
        q_nope, q_pe = q.view(seq, heads, k_dim).split([k_dim - rope_dim, rope_dim], dim=-1)
        kv = h @ w[b + "attn_kv_a_mqa.weight"].T
        latent, k_pe = _rms(kv[:, :rank], w[b + "attn_kv_a_norm.weight"], eps), kv[:, rank:]
        q_pe = apply_rotary(q_pe[None], cos[:, :, None], sin[:, :, None])[0]
        k_pe = apply_rotary(k_pe[None], cos, sin)[0]
        q_latent = torch.einsum("shd,hrd->shr", q_nope, w[b + "attn_k_b.weight"])  # absorbed: MQA over the latent
        scores = (torch.einsum("shr,tr->hst", q_latent, latent) + torch.einsum("shd,td->hst", q_pe, k_pe)) * kq_scale
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hvr,hsr->shv", w[b + "attn_v_b.weight"], torch.einsum("hst,tr->hsr", probs, latent))
        x = x + out.reshape(seq, -1) @ w[b + "attn_output.weight"].T
        h = _rms(x, w[b + "ffn_norm.weight"], eps)
        if i < meta[p + "leading_dense_block_count"]:
            x = x + _swiglu(h, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
            continue
        gate_logits = h @ w[b + "ffn_gate_inp.weight"].T
        gate_probs = gate_logits.sigmoid() if meta[p + "expert_gating_func"] == 2 else gate_logits.softmax(-1)
        chosen = (gate_probs + w[b + "exp_probs_b.bias"]).topk(meta[p + "expert_used_count"], dim=-1).indices
        weights = gate_probs.gather(1, chosen)
        if meta[p + "expert_weights_norm"]:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * meta[p + "expert_weights_scale"]
        ffn = _swiglu(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"], w[b + "ffn_down_shexp.weight"])
        for token in range(seq):
            for e, weight in zip(chosen[token].tolist(), weights[token], strict=True):
                ffn[token] += weight * _swiglu(h[token], w[b + "ffn_gate_exps.weight"][e],
                                               w[b + "ffn_up_exps.weight"][e], w[b + "ffn_down_exps.weight"][e])
        x = x + ffn
    return _rms(x, w["output_norm.weight"], eps) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("variant", ["tiny", "variant"])
def test_the_file_alone_run_as_deepseek2_gives_our_logits(ckpt, exports, variant, tmp_path):
    """An independent reading of the f32 file (metadata + tensors, llama.cpp's graph) equals our model: this
    proves the names, layouts, the k_b/v_b split, the rewritten dense layer and the routing metadata."""
    if variant == "variant":
        ckpt = _checkpoint(*VARIANT)
        exports = {"f32": export_gguf(ckpt, tmp_path) / "xoron-llm-f32.gguf"}
        assert "output.weight" not in _tensors(exports["f32"]) and "blk.1.attn_q.weight" in _tensors(exports["f32"])
    model = ckpt.build_model()
    ids = torch.randint(0, ckpt.cfg.llm.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
        got = deepseek2_forward(exports["f32"], ids, model.rope)
    assert ours.abs().max() > 0.3  # logits far from flat: a wrong routing or layout shows
    assert (got - ours).abs().max().item() <= 2e-5


F16_ROUNDING = 2.0**-11  # the block scale d is stored in f16: |d16 - d| <= d·2^-11


@pytest.mark.parametrize("quant, bound", [("f16", None), ("q8_0", (0.5 + 127 * F16_ROUNDING) / 127),
                                          ("q4_0", (1 + 8 * F16_ROUNDING) / 8)])
def test_quantized_tensors_are_within_the_format_error(ckpt, exports, quant, bound):
    """Per 32-wide block, |error| <= |q|·|d16 - d| + the rounding error: q8_0 (d = max|x|/127, codes to 127,
    rounded) d/2 + 127·|d16 - d|; q4_0 (d = max|x|/8, codes to 8, the top one clipped) d + 8·|d16 - d|.
    Norms, biases and the router stay f32; a row that 32-wide blocks do not tile (attn_k_b's 16 = nope
    dim) falls back to f16."""
    exact, got = _tensors(exports["f32"]), _tensors(exports[quant])
    assert got.keys() == exact.keys()
    Q = gguf.GGMLQuantizationType
    for name, (want, _) in exact.items():
        values, kind = got[name]
        if want.ndim == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
            assert kind == Q.F32 and np.array_equal(values, want), name
        elif quant == "f16" or want.shape[-1] % 32:
            assert kind == Q.F16 and np.array_equal(values, want.astype(np.float16).astype(np.float32)), name
        else:
            assert kind == Q[quant.upper()], name
            blocks, err = want.reshape(-1, 32), np.abs(values - want).reshape(-1, 32)
            assert (err <= bound * np.abs(blocks).max(-1, keepdims=True) * (1 + 1e-6)).all(), name
    size = {q: exports[q].stat().st_size for q in exports}
    assert size["q4_0"] < size["q8_0"] < size["f16"] < size["f32"]


def test_a_dense_layer_between_moe_layers_is_rewritten_exactly():
    """``dense_as_moe``: our MoE module loaded with the rewritten dense layer computes the dense FFN (only
    fp32 summation order differs: zero-padded rows and columns add exact zeros); the routed experts add
    exactly 0; padding a real shared expert keeps it the same function."""
    cfg = load_config(None, OVERRIDES).llm
    layout = ffn_layout(cfg)
    assert (layout.leading_dense, layout.rewritten, layout.shared_count) == (1, (2,), 2)
    torch.manual_seed(0)
    dense = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe_cfg = load_config(None, [*OVERRIDES, "model.llm.moe.num_shared_experts=2"]).llm.moe
    moe = MoEFeedForward(cfg.hidden_size, moe_cfg)
    moe.load_state_dict(dense_as_moe(dense.state_dict(), cfg, layout.shared_count))
    x = torch.randn(3, 5, cfg.hidden_size)
    with torch.no_grad():
        routed = moe.experts(x.view(-1, cfg.hidden_size), *moe.router(x.view(-1, cfg.hidden_size)))
        assert torch.equal(routed, torch.zeros_like(routed))
        assert (moe(x) - dense(x)).abs().max().item() <= 1e-6
        shared, padded = SwiGLU(cfg.hidden_size, 64), SwiGLU(cfg.hidden_size, 128)
        for p in shared.parameters():
            torch.nn.init.normal_(p, std=0.2)
        padded.load_state_dict({k[len("shared."):]: v for k, v in pad_shared(
            {f"shared.{k}": v for k, v in shared.state_dict().items()}, 128).items()})
        assert (padded(x) - shared(x)).abs().max().item() <= 1e-6
    with pytest.raises(ExportError, match="dense FFN width 128 exceeds the shared-expert width 64"):
        dense_as_moe(dense.state_dict(), cfg, 1)


def test_multimodal_components_are_archived_losslessly(tmp_path):
    """The smoke run's model: the LLM in the deepseek2 file, each other component in its own archive,
    every tensor back bit-equal under its name (names past ggml's 63 bytes included)."""
    cfg = load_config("pipelines/smoke.yaml")
    torch.manual_seed(0)
    state = {name: t.detach().clone() for name, t in build_model(cfg).state_dict().items()}
    out = export_gguf(ConsolidatedCheckpoint(cfg, state, multimodal=True), tmp_path / "mm", quant="f16")
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert "xoron-llm-f16.gguf" in files and "xoron-vision.gguf" in files and "xoron-speech.gguf" in files
    back = {}
    for path in out.glob("xoron-*.gguf"):
        if path.name != "xoron-llm-f16.gguf":
            component, config, tensors = read_archive(path)
            assert path.name == f"xoron-{component}.gguf" and config == cfg.to_dict()
            back.update(tensors)
    rest = {k: v for k, v in state.items() if not k.startswith("llm.")}
    assert back.keys() == rest.keys() and any(len(k) > 63 for k in rest)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in rest.items())


def test_bad_quant_unexpressible_llm_and_existing_export_are_refused(ckpt, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"--quant q4_k_m cannot be written: gguf-py 0.19 .*`llama-quantize"):
        export_gguf(ckpt, tmp_path / "a", quant="q4_k_m")
    with pytest.raises(ExportError, match=r"--quant q3 is unknown; quants: f32, f16, q8_0, q4_0"):
        export_gguf(ckpt, tmp_path / "a", quant="q3")
    cfg = load_config(None, [*OVERRIDES, "model.llm.moe.router_norm=true", "model.llm.rope.mscale=0.7"])
    with pytest.raises(ExportError, match=r"cannot run this LLM: moe.router_norm=true .*; rope.mscale=0.7"):
        export_gguf(ConsolidatedCheckpoint(cfg, ckpt.state, False), tmp_path / "a")
    assert not (tmp_path / "a").exists()

    export_gguf(ckpt, tmp_path / "g", quant="q8_0", tokenizer_dir=tokenizer_dir)
    with pytest.raises(ExportError, match=r"already holds a GGUF export \(xoron-llm-q8_0.gguf\); pass --force"):
        export_gguf(ckpt, tmp_path / "g", tokenizer_dir=tokenizer_dir)
    (tmp_path / "g" / "notes.txt").write_text("mine")
    export_gguf(ckpt, tmp_path / "g", force=True, tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["notes.txt", "xoron-llm-f32.gguf",
                                                                  "xoron_config.yaml"]

    base = ["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "c"), "--format", "gguf"]
    for argv, message in (([*base, "--quant", "q5_k_m"], "--quant q5_k_m cannot be written"),
                          ([*base, "--quant", "int3"], "--quant int3 is unknown"),
                          ([*base[:-1], "hf", "--quant", "q8_0"], "--quant applies to --format gguf only")):
        assert xoron(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize("variant", ["tiny", "variant"])
def test_llama_cpp_decodes_our_tokens_greedily(ckpt, exports, tokenizer_dir, variant, tmp_path):
    """llama.cpp (llama-cpp-python) on the f32 file: same tokenization of TEXT, logits within 1e-4 of ours
    over a 24-token prompt (measured: 3.3e-6 at logit scale 2.7), and greedy decoding equal to our
    ``generate_text`` token for token; for the tiny config (YaRN, low-rank q, a dense layer between MoE
    layers) and the variant (full-rank q, tied head, softmax router, plain RoPE)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp "
                                                        "from source, 20-30 min on 2 cores): pip install "
                                                        "'llama-cpp-python==0.3.36'")
    if variant == "variant":
        ckpt = _checkpoint(*VARIANT)
        exports = {"f32": export_gguf(ckpt, tmp_path, tokenizer_dir=tokenizer_dir) / "xoron-llm-f32.gguf"}
    tokenizer = XoronTokenizer.load(tokenizer_dir)
    f32 = 0  # GGML_TYPE_F32: llama.cpp's default f16 latent cache alone moves the logits by ~2e-3
    llm = llama_cpp.Llama(str(exports["f32"]), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, type_k=f32,
                          type_v=f32, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tokenizer.encode(TEXT)
    prompt = tokenizer.encode(TEXT)[:24]
    model = ckpt.build_model()
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    llm.eval(prompt)
    diff = np.abs(np.asarray(llm.scores[: len(prompt)]) - ours).max()
    print(f"llama.cpp vs ours: max |logit diff| {diff:.2e} (logit scale {np.abs(ours).max():.2f})")
    assert diff <= 1e-4

    usable = ckpt.cfg.llm.usable_vocab_size
    greedy = []
    for _ in range(12):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1][:usable]))
        greedy.append(nxt)
        llm.eval([nxt])
    want = model.generate_text(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    assert greedy == want
