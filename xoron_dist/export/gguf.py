"""Export to GGUF: the LLM as llama.cpp's ``deepseek2`` architecture, the other components as archives.

    <out>/xoron-llm-<quant>.gguf     the LLM + tokenizer; runs in llama.cpp (arch ``deepseek2``)
    <out>/xoron-<component>.gguf     multimodal runs: each top-level component (vision, audio, speech,
                                     image_gen, ...) stored losslessly with the model config as JSON
                                     (llama.cpp has no runtime for them: archives, read by ``read_archive``)
    <out>/xoron_config.yaml          the run's config (also what marks the directory as an export)

The LLM mapping (tensor names of gguf's ``MODEL_TENSORS[DEEPSEEK2]``; shapes in PyTorch order, which
GGUF stores reversed as ggml's ``ne``):

    embed_tokens / norm / lm_head          token_embd / output_norm / output (absent when tied)
    attn.q_proj | q_down, q_norm, q_up     attn_q | attn_q_a, attn_q_a_norm, attn_q_b
    attn.kv_down, kv_norm                  attn_kv_a_mqa, attn_kv_a_norm
    attn.kv_up (H·(nope+v), r)             -> view (H, nope+v, r): attn_k_b = k part transposed per head
                                              (H, r, nope), attn_v_b = v part (H, v, r)
    ffn (dense, leading)                   ffn_gate / ffn_up / ffn_down
    ffn (MoE)                              ffn_gate_inp (f32), exp_probs_b.bias (the expert bias),
                                           ffn_{gate,up}_exps (gate_up split: gate rows first), ffn_down_exps,
                                           ffn_{gate,up,down}_shexp

Metadata follows ``../shared/docs/ORACLES.md`` D.1 (what loaded in llama.cpp with logits equal to
2e-5): MLA runs absorbed there, as MQA over the latent, so ``head_count_kv`` is 1, ``key_length`` is
kv_lora_rank + rope dim and ``value_length`` kv_lora_rank, while ``key_length_mla``/``value_length_mla``
carry the per-head dims.

Dense layers between MoE layers (``moe_layer_freq`` > 1): llama.cpp's deepseek2 knows only leading
dense layers (``leading_dense_block_count``), so every later dense layer is written as an MoE layer
that computes exactly the dense FFN (``dense_as_moe``): its shared expert is the dense SwiGLU,
zero-padded to the shared width ``expert_feed_forward_length · expert_shared_count`` (when the dense
FFN is wider, the shared count is raised for every layer and every real shared expert is zero-padded
too: a zero gate/up row gives silu(0)·0 = 0 and a zero down column adds nothing), and its routed
experts and router are all zero, so whichever experts it picks contribute exactly 0.

Quantization is gguf-py's (``gguf.quants``): f32, f16, q8_0 and q4_0. Norms, biases, the router and
every 1-D tensor stay f32 (as llama.cpp's converter keeps them); a matrix whose rows do not fill the
quant's 32-wide blocks falls back to f16 (as the converter does). gguf-py 0.19 has no quantizer for
the K-quants, so q4_k_m and q5_k_m are refused with that reason: write f16 and run llama.cpp's
``llama-quantize`` on it.

Tokenizer: ``gpt2`` (byte-level BPE) with our vocabulary and merges; ids past the tokenizer's
vocabulary up to the embedding's padded rows are ``[PAD<id>]`` tokens of type UNUSED; special tokens
are CONTROL. The pre-tokenizer is ``qwen2``: llama.cpp's QWEN2 regex is our split pattern (Qwen2's,
``xoron_dist/tokenizer.py``) with the case-insensitive contractions spelled out, so both split text
identically; our NFC normalizer has no llama.cpp counterpart (text that is already NFC, as ASCII is,
encodes the same).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from xoron_dist.config import LLMConfig
from xoron_dist.export.hf import XORON_CONFIG, ExportError, llm_state, prepare_out_dir, tokenizer_ids
from xoron_dist.train.consolidation import ConsolidatedCheckpoint

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
QUANTS: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
UNWRITABLE = {name: "gguf-py 0.19 can read but not write K-quants (gguf.quants has no Q4_K/Q5_K quantizer); "
                    f"export --quant f16 and run llama.cpp's `llama-quantize in.gguf out.gguf {name.upper()}`"
              for name in ("q4_k_m", "q5_k_m")}
ARCH = "deepseek2"
LLM_FILE = "xoron-llm-{quant}.gguf"
ARCHIVE_FILE = "xoron-{component}.gguf"
ARCHIVE_ARCH = "xoron"
MAX_NAME = 63  # ggml's GGML_MAX_NAME (64) with its terminating zero


@dataclass(frozen=True)
class FFNLayout:
    """How the decoder's feed-forwards map onto deepseek2: ``leading_dense`` dense layers first, then
    MoE layers only; ``rewritten`` are our dense layers after them, written as exact MoE layers;
    ``shared_count`` is the shared-expert count of every MoE layer (ours, or raised to hold them)."""

    leading_dense: int
    rewritten: tuple[int, ...]
    shared_count: int


def ffn_layout(cfg: LLMConfig) -> FFNLayout:
    """The deepseek2 layout of ``cfg`` (see the module docstring)."""
    moe = cfg.moe_layers
    leading = moe[0] if moe else cfg.num_layers
    rewritten = tuple(i for i in range(leading, cfg.num_layers) if not cfg.is_moe_layer(i))
    shared = cfg.moe.num_shared_experts
    if rewritten:
        shared = max(shared, math.ceil(cfg.dense_intermediate_size / cfg.moe.expert_intermediate_size))
    # llama.cpp requires the shared-expert tensors on every MoE layer: a config without one gets a zero one.
    return FFNLayout(leading, rewritten, max(shared, 1) if moe else shared)


def dense_as_moe(dense: dict[str, torch.Tensor], cfg: LLMConfig, shared_count: int) -> dict[str, torch.Tensor]:
    """A dense SwiGLU layer's ``{gate_proj,up_proj,down_proj}.weight`` (our names under ``ffn.``) as the
    state of an ``MoEFeedForward`` with ``shared_count`` shared experts that computes the same function:
    the shared expert is the dense FFN zero-padded to ``shared_count · expert_intermediate_size``, the
    router and every routed expert are zero (their outputs are exactly 0)."""
    width = shared_count * cfg.moe.expert_intermediate_size
    ff = dense["gate_proj.weight"].shape[0]
    if ff > width:
        raise ExportError(f"dense FFN width {ff} exceeds the shared-expert width {width}; raise shared_count")
    hidden, experts, expert_ff = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.expert_intermediate_size
    like = dense["gate_proj.weight"]
    return {
        "router.weight": like.new_zeros(experts, hidden),
        "router.expert_bias": torch.zeros(experts, dtype=torch.float32),
        "experts.gate_up": like.new_zeros(experts, 2 * expert_ff, hidden),
        "experts.down": like.new_zeros(experts, hidden, expert_ff),
        **pad_shared({f"shared.{k}": v for k, v in dense.items()}, width),
    }


def pad_shared(shared: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """``shared.{gate,up,down}_proj.weight`` zero-padded from their width to ``width`` (same function)."""
    extra = width - shared["shared.gate_proj.weight"].shape[0]
    return {
        "shared.gate_proj.weight": torch.nn.functional.pad(shared["shared.gate_proj.weight"], (0, 0, 0, extra)),
        "shared.up_proj.weight": torch.nn.functional.pad(shared["shared.up_proj.weight"], (0, 0, 0, extra)),
        "shared.down_proj.weight": torch.nn.functional.pad(shared["shared.down_proj.weight"], (0, extra)),
    }


def _no_shared(cfg: LLMConfig, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """A shared expert of width 0 (our config has none; llama.cpp needs the tensors): padded, it is all zeros."""
    hidden = cfg.hidden_size
    return {"shared.gate_proj.weight": like.new_zeros(0, hidden), "shared.up_proj.weight": like.new_zeros(0, hidden),
            "shared.down_proj.weight": like.new_zeros(hidden, 0)}


def check_expressible(cfg: LLMConfig) -> None:
    """Raise ``ExportError`` for what llama.cpp's deepseek2 cannot run the way our model does."""
    problems = []
    if cfg.moe.router_norm:
        problems.append("moe.router_norm=true (deepseek2's router has no input norm)")
    rope = cfg.rope
    if rope.type == "longrope":
        problems.append("rope.type=longrope (deepseek2 knows none and YaRN rope scaling)")
    if rope.type == "yarn":
        if (rope.beta_fast, rope.beta_slow) != (32.0, 1.0):
            problems.append(f"rope.beta_fast/beta_slow={rope.beta_fast}/{rope.beta_slow} (deepseek2's loader "
                            "ignores the yarn_beta keys and uses 32/1)")
        if rope.mscale != rope.mscale_all_dim or rope.mscale_all_dim == 0:
            problems.append(f"rope.mscale={rope.mscale} with mscale_all_dim={rope.mscale_all_dim} (llama.cpp "
                            "derives both YaRN temperatures from yarn_log_multiplier: they must be equal and > 0)")
    if problems:
        raise ExportError("format gguf: llama.cpp's deepseek2 cannot run this LLM: " + "; ".join(problems))


def llm_tensors(cfg: LLMConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in PyTorch layout) of every LLM tensor, dense-between-MoE layers rewritten."""
    layout = ffn_layout(cfg)
    yield "token_embd.weight", state["embed_tokens.weight"]
    yield "output_norm.weight", state["norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    heads, nope, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for i in range(cfg.num_layers):
        ours = {k[len(f"layers.{i}."):]: t for k, t in state.items() if k.startswith(f"layers.{i}.")}
        blk = f"blk.{i}."
        yield blk + "attn_norm.weight", ours["attn_norm.weight"]
        if cfg.q_lora_rank is None:
            yield blk + "attn_q.weight", ours["attn.q_proj.weight"]
        else:
            yield blk + "attn_q_a.weight", ours["attn.q_down.weight"]
            yield blk + "attn_q_a_norm.weight", ours["attn.q_norm.weight"]
            yield blk + "attn_q_b.weight", ours["attn.q_up.weight"]
        yield blk + "attn_kv_a_mqa.weight", ours["attn.kv_down.weight"]
        yield blk + "attn_kv_a_norm.weight", ours["attn.kv_norm.weight"]
        kv_up = ours["attn.kv_up.weight"].view(heads, nope + v, cfg.kv_lora_rank)
        yield blk + "attn_k_b.weight", kv_up[:, :nope].transpose(1, 2).contiguous()  # (H, r, nope)
        yield blk + "attn_v_b.weight", kv_up[:, nope:].contiguous()  # (H, v, r)
        yield blk + "attn_output.weight", ours["attn.out_proj.weight"]
        yield blk + "ffn_norm.weight", ours["ffn_norm.weight"]
        ffn = {k[len("ffn."):]: t for k, t in ours.items() if k.startswith("ffn.")}
        if i < layout.leading_dense:
            for part in ("gate", "up", "down"):
                yield blk + f"ffn_{part}.weight", ffn[f"{part}_proj.weight"]
            continue
        if i in layout.rewritten:
            ffn = dense_as_moe(ffn, cfg, layout.shared_count)
        else:
            width = layout.shared_count * cfg.moe.expert_intermediate_size
            shared = {k: t for k, t in ffn.items() if k.startswith("shared.")} or _no_shared(cfg, ffn["router.weight"])
            ffn = {**ffn, **pad_shared(shared, width)}
        yield blk + "ffn_gate_inp.weight", ffn["router.weight"]
        yield blk + "exp_probs_b.bias", ffn["router.expert_bias"]
        gate, up = ffn["experts.gate_up"].chunk(2, dim=1)  # gate rows first
        yield blk + "ffn_gate_exps.weight", gate.contiguous()
        yield blk + "ffn_up_exps.weight", up.contiguous()
        yield blk + "ffn_down_exps.weight", ffn["experts.down"]
        for part in ("gate", "up", "down"):
            yield blk + f"ffn_{part}_shexp.weight", ffn[f"shared.{part}_proj.weight"]


def stored_type(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The GGUF type of one LLM tensor: f32 for 1-D tensors, norms and the router (as llama.cpp's converter
    keeps them); else ``qtype``, or f16 where a quant's 32-wide blocks do not tile the rows."""
    if array.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32
    if qtype in (Q.F32, Q.F16):
        return qtype
    return qtype if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)


def add_llm_metadata(writer: gguf.GGUFWriter, cfg: LLMConfig, layout: FFNLayout, file_type: int) -> None:
    """Every key llama.cpp's deepseek2 loader reads (``models/deepseek2.cpp``, ``llama-model.cpp``)."""
    writer.add_name("Xoron LLM")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.dense_intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(1)  # absorbed MLA is MQA over the latent
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.padded_vocab_size)
    writer.add_leading_dense_block_count(layout.leading_dense)
    writer.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a full-rank attn_q
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_rope_freq_base(cfg.rope.theta)
    moe = cfg.moe
    writer.add_expert_feed_forward_length(moe.expert_intermediate_size)
    writer.add_expert_count(moe.num_experts)
    writer.add_expert_used_count(moe.top_k)
    writer.add_expert_shared_count(layout.shared_count)
    writer.add_expert_weights_scale(moe.routed_scaling_factor)
    writer.add_expert_weights_norm(moe.norm_topk_prob)
    gating = gguf.ExpertGatingFuncType.SIGMOID if moe.router_score == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
    writer.add_expert_gating_func(gating)
    writer.add_expert_group_count(1)
    writer.add_expert_group_used_count(1)
    if cfg.rope.type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope.factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_positions)
        # llama.cpp's converter writes 0.1·mscale_all_dim and the loader divides it back out (legacy).
        writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope.mscale_all_dim)
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, cfg: LLMConfig) -> None:
    """The run's byte-level BPE as a ``gpt2`` vocabulary (see the module docstring)."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"{tokenizer_dir / 'tokenizer.json'} holds a {model.get('type')} model; "
                          "GGUF export writes byte-level BPE tokenizers only")
    rows = cfg.padded_vocab_size
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [gguf.TokenType.UNUSED] * rows
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] >= rows:
            raise ExportError(f"token {added['content']!r} has id {added['id']}, past the model's {rows} "
                              "embedding rows: the tokenizer does not belong to this checkpoint")
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if not merges:
        raise ExportError(f"{tokenizer_dir / 'tokenizer.json'} has no merges; llama.cpp refuses a BPE without them")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = tokenizer_ids(tokenizer_dir)
    if ids:
        writer.add_bos_token_id(ids["bos"])
        writer.add_eos_token_id(ids["eos"])
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(False)  # our prompts carry no BOS


def write_llm(ckpt: ConsolidatedCheckpoint, path: Path, quant: str, tokenizer_dir: Path | None) -> Path:
    cfg = ckpt.cfg.llm
    qtype, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(path, ARCH)
    add_llm_metadata(writer, cfg, ffn_layout(cfg), file_type)
    if tokenizer_dir is not None:
        add_tokenizer(writer, tokenizer_dir, cfg)
    for name, tensor in llm_tensors(cfg, llm_state(ckpt)):
        array = tensor.detach().float().numpy()
        add_tensor(writer, name, array, stored_type(name, array, qtype))
    _write(writer)
    return path


def write_archives(ckpt: ConsolidatedCheckpoint, out: Path) -> list[Path]:
    """Each top-level component but the LLM in ``xoron-<component>.gguf``, lossless (see ``read_archive``)."""
    groups: dict[str, list[str]] = {}
    for name in ckpt.state:
        if not name.startswith("llm."):
            groups.setdefault(name.split(".")[0], []).append(name)
    config = json.dumps(ckpt.cfg.to_dict())
    paths = []
    for component, names in groups.items():
        path = out / ARCHIVE_FILE.format(component=component)
        writer = gguf.GGUFWriter(path, ARCHIVE_ARCH)
        writer.add_name(f"Xoron {component}")
        writer.add_string(f"{ARCHIVE_ARCH}.component", component)
        writer.add_string(f"{ARCHIVE_ARCH}.config", config)
        writer.add_array(f"{ARCHIVE_ARCH}.tensor_names", names)
        for index, name in enumerate(names):
            writer.add_tensor(_stored_name(name, index), _lossless(ckpt.state[name], name))
        _write(writer)
        paths.append(path)
    return paths


def _stored_name(name: str, index: int) -> str:
    """ggml caps tensor names at 63 bytes: longer ones are stored by index (``xoron.tensor_names`` has all)."""
    return name if len(name.encode()) <= MAX_NAME else f"{ARCHIVE_ARCH}.long.{index}"


def _lossless(tensor: torch.Tensor, name: str) -> np.ndarray:
    kinds = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
             torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8}
    if tensor.dtype not in kinds:
        raise ExportError(f"format gguf: {name} is {tensor.dtype}, which GGUF cannot store losslessly; "
                          "cast the checkpoint to float32")
    return tensor.detach().contiguous().numpy().astype(kinds[tensor.dtype], copy=False)


def read_archive(path: str | Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """An archive written by ``write_archives``: (component, model config dict, our-name -> tensor)."""
    reader = gguf.GGUFReader(path)
    component = reader.fields[f"{ARCHIVE_ARCH}.component"].contents()
    config = json.loads(reader.fields[f"{ARCHIVE_ARCH}.config"].contents())
    names = reader.fields[f"{ARCHIVE_ARCH}.tensor_names"].contents()
    stored = {t.name: t for t in reader.tensors}
    state = {}
    for index, name in enumerate(names):
        tensor = stored[_stored_name(name, index)]
        # GGUF stores ggml's reversed dims; the data is row-major in PyTorch order.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        state[name] = torch.from_numpy(np.array(tensor.data).reshape(shape))
    return component, config, state


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_quant(quant: str) -> None:
    """Raise ``ExportError`` unless ``quant`` is one this module writes."""
    if quant in UNWRITABLE:
        raise ExportError(f"--quant {quant} cannot be written: {UNWRITABLE[quant]}")
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant} is unknown; quants: {', '.join(QUANTS)} "
                          f"({' and '.join(UNWRITABLE)} need llama.cpp's llama-quantize)")


def export_gguf(ckpt: ConsolidatedCheckpoint, out: str | Path, *, quant: str = "f32", force: bool = False,
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``ckpt`` as GGUF files in ``out`` (see the module docstring); returns ``out``.
    ``tokenizer_dir``: default the run's ``tokenizer/`` (none: a file without a vocabulary, which
    llama.cpp cannot load)."""
    check_quant(quant)
    out = Path(out)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (ckpt.run_dir / "tokenizer" if ckpt.run_dir else None)
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_dir} holds no tokenizer.json: give the run's tokenizer directory")
    if tokenizer_dir is None:
        logger.warning("GGUF export without a tokenizer: llama.cpp cannot load %s without a vocabulary "
                       "(pass tokenizer_dir / --tokenizer)", LLM_FILE.format(quant=quant))
    check_expressible(ckpt.cfg.llm)
    previous = sorted(out.glob("xoron-*.gguf")) if out.is_dir() else []
    if previous and not force:
        raise ExportError(f"{out} already holds a GGUF export ({previous[0].name}); pass --force to replace it, "
                          "or choose another --out")
    prepare_out_dir(out, force)
    for path in previous:
        path.unlink()
    write_llm(ckpt, out / LLM_FILE.format(quant=quant), quant, tokenizer_dir)
    if ckpt.multimodal:
        write_archives(ckpt, out)
    (out / XORON_CONFIG).write_text(ckpt.cfg.to_yaml(), encoding="utf-8")
    return out


__all__ = ["FFNLayout", "QUANTS", "UNWRITABLE", "check_quant", "dense_as_moe", "export_gguf", "ffn_layout",
           "llm_tensors", "pad_shared", "read_archive"]
