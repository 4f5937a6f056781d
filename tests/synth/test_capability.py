"""Capability samples: every one parses into its structure, no near duplicates, same seed -> same bytes."""

import json
import re

import pytest

from xoron_dist.config import SynthConfig
from xoron_dist.data.chat import conversation_from_json, parse, render
from xoron_dist.synth import synthesize
from xoron_dist.synth.capability import NearDuplicateFilter, capability_samples, jaccard, quality_problem, shingles

THRESHOLD = 0.9


@pytest.fixture(scope="module")
def conversations():
    return capability_samples(0, "conversation", 360, THRESHOLD)


@pytest.fixture(scope="module")
def tool_uses():
    return capability_samples(0, "tool_use", 80, THRESHOLD)


def _assistant(sample) -> str:
    return "".join(t["content"] for t in sample["turns"] if t["role"] == "assistant")


def test_every_sample_parses_into_its_structure(conversations):
    categories = {s["category"] for s in conversations}
    assert categories == {"arithmetic", "word_problem", "algebra", "idk", "cutoff", "fact_check", "citation", "fim",
                          "commit", "exec", "shell", "followup"}
    for sample in conversations:
        conversation = conversation_from_json(sample)
        assert parse(render(conversation)) == conversation
        assert quality_problem(sample) is None
        text, category = _assistant(sample), sample["category"]
        if category in ("arithmetic", "word_problem", "algebra", "followup"):
            match = re.fullmatch(r"<\|think\|>\n<\|plan\|>\n(.+?)\n<\|/plan\|>\n((?:<\|step\|>.+?<\|/step\|>\n)+)"
                                 r"<\|verify\|>(.+?)<\|/verify\|>\n<\|/think\|>\n(.+)", text, re.S)
            assert match, text
            assert re.fullmatch(r"(\d+\. .+\n?)+", match.group(1))
            assert match.group(4).strip()  # an answer after the reasoning
        if category == "arithmetic":  # the answer is right
            question = sample["turns"][-2]["content"].removeprefix("Calculate: ")
            assert match.group(4) == f"The answer is {eval(question)}."  # noqa: S307 (our own digits and + - *)
        if category in ("idk", "cutoff"):
            assert text.startswith("<|uncertain|>") and "<|/uncertain|>" in text
            assert ("<|unknown|>" in text) == (category == "idk")
        if category == "citation":
            assert re.search(r"<\|cite\|>.+<\|/cite\|>$", text)
        if category == "fim":  # the pieces reassemble to one of the programs
            user = sample["turns"][-2]["content"]
            prefix, rest = user.removeprefix("<|fim_prefix|>").split("<|fim_suffix|>")
            suffix = rest.removesuffix("<|fim_middle|>")
            code = prefix + text + suffix
            compile(code, "fim", "exec")
            assert text and text in code
        if category == "exec":
            code = re.search(r"<\|code\|>(.+?)<\|/code\|>", text, re.S).group(1)
            values, index = re.fullmatch(r"x = (\[.*\])\nprint\(x\[(\d+)\]\)", code).groups()
            values, index = json.loads(values), int(index)
            if index < len(values):
                assert f"<|exec_result|>{values[index]}<|/exec_result|>" in text
            else:
                assert "<|exec_error|>IndexError: list index out of range<|/exec_error|>" in text


def test_tool_calls_are_valid_json_and_answer_the_call(tool_uses):
    for sample in tool_uses:
        rendered = render(conversation_from_json(sample))
        for args in re.findall(r"<\|function_args\|>(.*?)<\|/function_args\|>", rendered):
            assert isinstance(json.loads(args), dict)
        call, result = sample["turns"][1]["tool_calls"][0], sample["turns"][2]
        assert result["name"] == call["name"] in {t["name"] for t in sample["tools"]}
        if call["name"] == "calculator":
            a, b = call["arguments"]["a"], call["arguments"]["b"]
            assert int(result["content"]) == (a + b if call["arguments"]["op"] == "add" else a * b)


def test_no_near_duplicates_above_the_threshold(conversations, tool_uses):
    for samples in (conversations, tool_uses):
        grams = [shingles(render(conversation_from_json(s))) for s in samples]
        worst = max(jaccard(a, b) for i, a in enumerate(grams) for b in grams[:i])
        assert worst <= THRESHOLD
    near = NearDuplicateFilter(0.5)
    assert near.add("one two three four five six seven eight")
    assert not near.add("one two three four five six seven eight")  # exact
    assert not near.add("one two three four five six seven nine")  # 5 of 7 grams shared: 5/7 > 0.5
    assert near.add("something else entirely, nothing shared at all")


def test_same_seed_same_bytes_and_larger_counts_extend(tmp_path):
    cfg = SynthConfig(seed=3, text=0, image_caption=0, video_caption=0, audio_transcript=0, text_to_image=0,
                      text_to_video=0, text_to_speech=0, conversation=40, tool_use=10)
    synthesize(cfg, tmp_path / "a", progress=False)
    synthesize(cfg, tmp_path / "b", progress=False)
    for name in ("conversation.jsonl", "tool_use.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lines = (tmp_path / "a" / "conversation.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"conversation-{i:06d}" for i in range(1, 41)]
    assert capability_samples(3, "conversation", 20, 0.9) == [
        {k: v for k, v in json.loads(line).items() if k not in ("id", "kind")} for line in lines[:20]]
    assert capability_samples(4, "conversation", 20, 0.9) != capability_samples(3, "conversation", 20, 0.9)


def test_an_impossible_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"data.synth.tool_use = 60: .* raise data.synth.dedup_threshold"):
        capability_samples(0, "tool_use", 60, 0.2)
