"""The chat template: render -> tokenize -> parse round trip, assistant-only loss through the packer,
and the seed's token-group loss weights (pipelines/xoron_full.yaml) changing the loss as configured."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xoron_dist.config import XoronConfig, load_config
from xoron_dist.data.chat import (
    ChatFormatError,
    conversation_from_json,
    conversation_to_json,
    parse,
    render,
    target_mask,
    tokenize,
)
from xoron_dist.data.packing import TokenLayout, collate
from xoron_dist.data.shards import ArrowSample
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.tokenizer import build_tokenizer
from xoron_dist.train.objectives import TokenGroups

FULL = Path(__file__).resolve().parents[2] / "pipelines" / "xoron_full.yaml"
TOOL_USE = {
    "tools": [{"name": "add", "description": "a + b", "parameters": {"a": "number", "b": "number"}}],
    "turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3? Ünïcödé 中文"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"b": 3, "a": 2}}]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "<|think|>2 + 3 = 5<|/think|>It is 5."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    cfg = XoronConfig.preset("tiny")
    cfg.model.llm.special_token_slots = 256  # the seed tier: the chat and tool tokens are single ids
    return build_tokenizer(cfg)


def test_render_tokenize_parse_round_trip(tokenizer):
    conversation = conversation_from_json(TOOL_USE)
    text = render(conversation)
    assert text.startswith("<|im_start|>system\nBe brief.<|available_tools|><|tool_def|>{")
    assert '<|function_args|>{"a": 2, "b": 3}<|/function_args|>' in text  # sorted keys: one rendering
    tokens, runs = tokenize(tokenizer.encode, conversation)
    assert tokens == tokenizer.encode(text)  # segment-wise encoding = whole-text encoding
    back = parse(tokenizer.decode(tokens))
    assert back == conversation
    assert conversation_to_json(back) == {**TOOL_USE, "turns": [
        {**t, "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]} if "tool_calls" in t else t
        for t in TOOL_USE["turns"]]}
    no_system = conversation_from_json({**TOOL_USE, "turns": TOOL_USE["turns"][1:]})
    assert parse(render(no_system)) == no_system  # the system turn made to hold the tools is dropped again


def test_loss_mask_covers_only_assistant_turns(tokenizer):
    conversation = conversation_from_json(TOOL_USE)
    tokens, runs = tokenize(tokenizer.encode, conversation)
    mask = target_mask(len(tokens), runs)
    target_text = "".join(tokenizer.decode([t]) for t, m in zip(tokens, mask, strict=True) if m)
    expected = "".join(f"{t['content']}{call}<|im_end|>" for t in TOOL_USE["turns"] if t["role"] == "assistant"
                       for call in ["<|tool_call|><|function_name|>add<|/function_name|><|function_args|>"
                                    '{"a": 2, "b": 3}<|/function_args|><|/tool_call|>' if "tool_calls" in t else ""])
    assert target_text == expected
    assert len(runs) == 2 * 3

    # through the packer: labels exist exactly at the assistant tokens (each predicted from its predecessor)
    sample = ArrowSample("d", "tool_use", "c1", np.zeros(0, np.int32), np.array(tokens, np.int32),
                         target_runs=np.array(runs, np.int32))
    layout = TokenLayout(tokenizer.special_ids, seq_len=256, image_tokens=4, video_tokens=4,
                         audio_tokens_per_second=8.0)
    (doc,) = layout.documents(sample)
    batch = collate([[doc]], 256, tokenizer.pad_id)
    labelled = (batch.labels[0] != IGNORE_INDEX).nonzero().flatten() + 1  # the target positions
    assert labelled.tolist() == [t for t, m in enumerate(mask) if m]
    assert batch.labels[0][labelled - 1].tolist() == [tokens[t] for t in labelled.tolist()]

    # cut into pieces (seq_len 40): every assistant token is still a target exactly once
    layout.seq_len = 40
    pieces = layout.documents(sample)
    assert len(pieces) > 1
    targets = [tok for piece in pieces for i, (tok, is_target) in enumerate(zip(piece.tokens, piece.targets,
                                                                                strict=True)) if is_target and i > 0]
    assert targets == [t for t, m in zip(tokens, mask, strict=True) if m]


@pytest.mark.parametrize("bad, message", [
    ({"turns": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"turns": [{"role": "robot", "content": "x"}]}, "turns\\[0\\].role is 'robot'"),
    ({"turns": [{"role": "assistant", "content": "a<|im_end|>b"}]}, "turns\\[0\\].content contains"),
    ({"turns": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}]}, "only assistant turns"),
    ({"turns": [{"role": "tool", "content": "5"}, {"role": "assistant", "content": "ok"}]}, "turns\\[0\\].name"),
])
def test_bad_conversations_name_the_field(bad, message):
    with pytest.raises(ChatFormatError, match=message):
        conversation_from_json(bad)


def test_seed_token_group_weights_change_the_loss_exactly_as_configured(tokenizer):
    cfg = load_config(FULL)
    weights = {g.name: g.weight for g in cfg.train.token_groups}
    assert weights == {"reasoning": 1.5, "tool_calling": 1.3, "anti_hallucination": 1.2, "code_execution": 1.2}
    groups = TokenGroups(cfg, tokenizer.token_id)
    answer = ("<|think|><|step|>2 + 3<|/step|><|/think|><|uncertain|>maybe 5<|/uncertain|>"
              "<|exec|><|code|>print(5)<|/code|><|/exec|> done")
    conversation = conversation_from_json({"turns": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": answer, "tool_calls": [{"name": "add", "arguments": {}}]}]})
    tokens, runs = tokenize(tokenizer.encode, conversation)
    layout = TokenLayout(tokenizer.special_ids, seq_len=128, image_tokens=4, video_tokens=4,
                         audio_tokens_per_second=8.0)
    sample = ArrowSample("d", "conversation", "c", np.zeros(0, np.int32), np.array(tokens, np.int32),
                         target_runs=np.array(runs, np.int32))
    batch = collate([layout.documents(sample)], 128, tokenizer.pad_id)
    w = groups.weights(batch.labels, batch.document_ids)[0]

    # expected weight of each label by hand: the block its target token sits in (open and close included)
    text_of = {i: tokenizer.decode([i]) for i in set(tokens)}
    expected, block = [], None
    opens = {"<|think|>": 1.5, "<|uncertain|>": 1.2, "<|tool_call|>": 1.3, "<|exec|>": 1.2}
    closes = {"<|/think|>", "<|/uncertain|>", "<|/tool_call|>", "<|/exec|>"}
    for label in batch.labels[0].tolist():
        if label == IGNORE_INDEX:
            expected.append(1.0)
            continue
        piece = text_of[label]
        block = opens.get(piece, block)
        expected.append(block or 1.0)
        if piece in closes:
            block = None
    assert w.tolist() == pytest.approx(expected)
    assert sorted(set(expected)) == [1.0, 1.2, 1.3, 1.5]

    # the weighted loss: Σ w·ce / #labelled, against the unweighted per-token cross-entropies
    torch.manual_seed(0)
    logits = torch.randn(1, 128, tokenizer.vocab_size)
    ce = F.cross_entropy(logits[0], batch.labels[0], ignore_index=IGNORE_INDEX, reduction="none")
    labelled = batch.labels[0] != IGNORE_INDEX
    weighted = (ce * w)[labelled].sum() / labelled.sum()
    plain = ce[labelled].mean()
    manual = sum(c * e for c, e, m in zip(ce.tolist(), expected, labelled.tolist(), strict=True) if m)
    assert weighted.item() == pytest.approx(manual / labelled.sum().item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item())
