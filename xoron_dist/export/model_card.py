"""The model card (``README.md``) of an HF export: HF metadata, architecture, sizes, training, use and limits.

Everything in it comes from the run: the config, the checkpoint's step, and the consolidated tensors
(parameter counts). The license is a placeholder (``other``): the run config has no license field,
and the data's licenses are the user's to state.
"""

from __future__ import annotations

from dataclasses import asdict

from xoron_dist.data.schema import KINDS
from xoron_dist.synth.corpus import EXTRA_SOURCES
from xoron_dist.train.consolidation import ConsolidatedCheckpoint, parameter_counts


def _front_matter(ckpt: ConsolidatedCheckpoint) -> str:
    tags = ["xoron", "deepseek_v3", "mixture-of-experts", "multi-head-latent-attention"]
    if ckpt.multimodal:
        tags.append("multimodal")
    lines = ["---", "library_name: transformers", "license: other", "pipeline_tag: text-generation", "tags:"]
    return "\n".join(lines + [f"  - {tag}" for tag in tags] + ["---", ""])


def _architecture(ckpt: ConsolidatedCheckpoint) -> list[str]:
    llm = ckpt.cfg.llm
    moe = llm.moe
    return [
        "## Architecture", "",
        "A DeepSeek-V3-style decoder (transformers' `DeepseekV3ForCausalLM` loads it):", "",
        f"- {llm.num_layers} layers, hidden size {llm.hidden_size}, {llm.num_heads} heads; multi-head latent "
        f"attention (q rank {llm.q_lora_rank}, kv rank {llm.kv_lora_rank}, rope head dim {llm.qk_rope_head_dim})",
        f"- MoE on layers {', '.join(map(str, llm.moe_layers)) or 'none'}: {moe.num_experts} routed experts "
        f"(top-{moe.top_k}, sigmoid scores with a per-expert bias) + {moe.num_shared_experts} shared, "
        f"expert FFN width {moe.expert_intermediate_size}",
        f"- vocabulary {llm.vocab_size} + {llm.special_token_slots} special-token slots ({llm.padded_vocab_size} "
        f"rows), {llm.max_position_embeddings} positions, RoPE {llm.rope.type} (theta {llm.rope.theta:g})",
        "",
    ]


def _sizes(ckpt: ConsolidatedCheckpoint) -> list[str]:
    counts = parameter_counts(ckpt.state, ckpt.multimodal)
    rows = [f"| {part} | {count:,} | {'model-*.safetensors' if part == 'llm' else 'xoron_multimodal.safetensors'} |"
            for part, count in counts.items()]
    return ["## Parameters", "", "| part | tensor elements | file |", "| --- | ---: | --- |", *rows,
            f"| total | {sum(counts.values()):,} | |", ""]


def _training(ckpt: ConsolidatedCheckpoint) -> list[str]:
    cfg = ckpt.cfg
    data = cfg.data
    if data.source == "arrow" and data.synth is not None:
        counts = asdict(data.synth)
        kinds = ", ".join(f"{kind} ({counts[kind]:,})" for kind in (*KINDS, *EXTRA_SOURCES) if counts.get(kind))
        source = f"Arrow shards prepared from the synthetic multimodal corpus: {kinds}"
    elif data.source == "arrow":
        source = f"Arrow shards from `{data.path}`" + (f", blend {dict(data.mix)}" if data.mix else "")
    else:
        source = "the built-in synthetic text (no files)"
    stages = [f"- stage `{s.name}`: {s.steps} steps" + (f", kinds {', '.join(s.kinds)}" if s.kinds else "")
              + (f", frozen {', '.join(s.freeze)}" if s.freeze else "") for s in cfg.stages]
    return ["## Training", "",
            f"Trained with xoron_dist to step {ckpt.step} ({cfg.train.steps} steps configured, sequence length "
            f"{cfg.train.seq_len}, peak learning rate {cfg.train.lr:g}) on {source}.",
            f"Consolidated from a checkpoint of {ckpt.source or 'this process'}.", "",
            *(stages + [""] if stages else [])]


def _use(ckpt: ConsolidatedCheckpoint) -> list[str]:
    lines = [
        "## Use", "",
        "```python",
        "from transformers import AutoTokenizer, DeepseekV3ForCausalLM",
        "model = DeepseekV3ForCausalLM.from_pretrained(path)      # the LLM",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "",
        "from xoron_dist.export import from_pretrained",
        "model = from_pretrained(path)                            # the whole Xoron model, our modules",
        "```", "",
        "## Intended use and limits", "",
        "A research checkpoint of the Xoron architecture. Its quality is what its training run made it: a "
        "short or synthetic-data run (such as the smoke run) gives a model that exercises the code, not "
        "one for any real task. It has not been evaluated for safety, bias or factual accuracy; do not "
        "deploy it where its output matters without that evaluation.",
    ]
    if ckpt.multimodal:
        lines += ["", "transformers loads the LLM only; the encoders, projectors, fusion layers and generators "
                  "(`xoron_multimodal.safetensors`) load with `xoron_dist.export.from_pretrained`."]
    return lines + [""]


def model_card(ckpt: ConsolidatedCheckpoint) -> str:
    title = f"# Xoron{' (multimodal)' if ckpt.multimodal else ''}, step {ckpt.step}"
    return "\n".join([_front_matter(ckpt), title, "", *_architecture(ckpt), *_sizes(ckpt), *_training(ckpt),
                      *_use(ckpt)])


__all__ = ["model_card"]
