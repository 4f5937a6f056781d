"""xoron prep reads conversation/tool_use JSONL and the registry's foreign formats (the seed's synth files)."""

import json

import pyarrow as pa

from data_prep import prepare
from data_prep.datasets import detect_format
from data_prep.formats import FORMATS
from tests.data_prep.inputs import tiny_config
from xoron_dist.data.chat import parse, target_mask
from xoron_dist.data.schema import REJECTS_FILE
from xoron_dist.tokenizer import XoronTokenizer

RECORDS = [
    {"id": "ours-1", "kind": "conversation", "turns": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]},
    {"id": "ours-2", "kind": "tool_use", "tools": [{"name": "add"}],
     "turns": [{"role": "user", "content": "1+1?"},
               {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]},
               {"role": "tool", "name": "add", "content": "2"}, {"role": "assistant", "content": "2"}]},
    {"question": "Calculate: 2 + 2", "thinking": "<|think|><|step|>2 + 2 = 4<|/step|><|/think|>",
     "answer": "The answer is 4."},
    {"question": "Who won in 2090?", "response": "<|uncertain|>I cannot know.<|/uncertain|>"},
    {"prefix": "def f(x):\n", "middle": "    return x + 1", "suffix": "\n"},
    {"before": "a=1", "after": "a = 1", "commit_message": "Format"},
    {"code": "print(1/0)", "output": "<|exec_error|>ZeroDivisionError<|/exec_error|>", "explanation": "No."},
    {"task": "List files", "command": "ls", "output": "a.txt"},
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{\"c\": 1}"}}]},
                  {"role": "tool", "name": "weather", "content": "sun"}, {"role": "assistant", "content": "Sunny."}],
     "tools": [{"type": "function", "function": {"name": "weather"}}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
    {"conversations": [{"from": "martian", "value": "?"}]},  # rejected: unknown speaker
    {"id": "ours-3", "kind": "conversation", "turns": [{"role": "user", "content": "only a question"}]},  # rejected
]


def test_every_format_is_detected_by_its_fields():
    detected = [detect_format(r).name if detect_format(r) else None for r in RECORDS]
    assert detected == [None, None, "seed_cot", "seed_response", "seed_fim", "seed_commit", "seed_exec", "seed_shell",
                        "chatml", "sharegpt", "alpaca", "sharegpt", None]
    assert {f.name for f in FORMATS} == set(filter(None, detected))


def test_prep_ingests_conversations_tool_use_and_foreign_formats(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "out"
    manifest = prepare([source], out, tiny_config(max_text_tokens=512), progress=False)
    assert {name: info.rows for name, info in manifest.datasets.items()} == {"conversation": 9, "tool_use": 2}
    reasons = [json.loads(line)["reason"] for line in (out / REJECTS_FILE).read_text().splitlines()]
    assert len(reasons) == 2 and "martian" in reasons[0] and "no assistant turn" in reasons[1]
    tokenizer = XoronTokenizer.load(out / "tokenizer")
    rows = {}
    for info in manifest.datasets.values():
        for shard in info.shards:
            with pa.memory_map(str(out / shard.path)) as f:
                rows |= {r["id"]: r for r in pa.ipc.open_file(f).read_all().to_pylist()}
    assert set(rows) >= {"ours-1", "ours-2", "mixed-3", "mixed-5", "mixed-9"}  # ids: <source>-<line> when absent
    fim = parse(tokenizer.decode(rows["mixed-5"]["text_tokens"]))
    assert fim.turns[1].content == "    return x + 1"
    user = fim.turns[0].content
    assert user == "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n<|fim_middle|>"
    weather = parse(tokenizer.decode(rows["mixed-9"]["text_tokens"]))
    assert weather.tools == ({"name": "weather"},) and weather.turns[1].tool_calls[0].arguments == {"c": 1}
    for row in rows.values():  # the trained tokens decode to the assistant turns and their <|im_end|>
        mask = target_mask(len(row["text_tokens"]), row["target_runs"])
        trained = tokenizer.decode([t for t, m in zip(row["text_tokens"], mask, strict=True) if m])
        turns = parse(tokenizer.decode(row["text_tokens"])).turns
        assert trained.count("<|im_end|>") == sum(t.role == "assistant" for t in turns)
