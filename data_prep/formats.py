"""Record formats ``xoron prep`` reads besides its own: a registry of converters, not of downloads.

A JSONL record with a ``kind`` is ours (``xoron_dist.data.schema``) and passes unchanged. Any other
record is matched against ``FORMATS`` in order, by the fields it has; the first match converts it into
our record (a ``conversation`` or ``tool_use`` sample in the chat template, ``xoron_dist.data.chat``).
A record without an ``id`` gets ``<source stem>-<line or key>``, unique within its file.

    name          fields                               becomes
    chatml        messages [{role, content, tool_calls?}], tools?   conversation / tool_use (HF chat layout)
    sharegpt      conversations [{from, value}]        conversation (from: system|human|gpt|tool)
    alpaca        instruction, output, input?          conversation
    seed_cot      question, thinking, answer           conversation; assistant = thinking + answer
    seed_response question, response                   conversation (the seed's anti-hallucination sets)
    seed_fim      prefix, middle, suffix               conversation; user <|fim_prefix|>..<|fim_suffix|>..<|fim_middle|>
    seed_commit   before, after, commit_message        conversation; assistant <|commit_msg|>..<|/commit_msg|>
    seed_exec     code, output, explanation            conversation; assistant <|exec|><|code|>..  output  explanation
    seed_shell    task, command, output                conversation; assistant <|code|>cmd<|/code|><|exec_result|>..

Conversion errors are ``FormatError`` (prep rejects the sample with the message).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class FormatError(ValueError):
    """A record that matches a format's fields but not its types."""


@dataclass(frozen=True)
class RecordFormat:
    name: str
    fields: tuple[str, ...]  # all present -> this format
    convert: Callable[[dict[str, Any]], dict[str, Any]]  # -> {"kind", "turns", "tools"?}


def _str(record: dict, name: str) -> str:
    value = record.get(name, "")
    if not isinstance(value, str):
        raise FormatError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _pair(user: str, assistant: str) -> dict[str, Any]:
    return {"kind": "conversation", "turns": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": assistant}]}


def _chatml(record: dict) -> dict[str, Any]:
    messages, tools = record["messages"], record.get("tools") or []
    if not isinstance(messages, list):
        raise FormatError("field 'messages' must be a list of {role, content}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FormatError(f"messages[{i}] must be an object")
        turn = {"role": message.get("role"), "content": message.get("content") or ""}
        calls = message.get("tool_calls") or []
        if calls:  # OpenAI layout: {"function": {"name", "arguments": json string}} or ours
            turn["tool_calls"] = [_call(call, i) for call in calls]
        if message.get("role") == "tool":
            turn["name"] = message.get("name")
        turns.append(turn)
    tools = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    kind = "tool_use" if tools or any("tool_calls" in t for t in turns) else "conversation"
    return {"kind": kind, "turns": turns, **({"tools": tools} if tools else {})}


def _call(call: Any, index: int) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise FormatError(f"messages[{index}].tool_calls holds a {type(call).__name__}, not an object")
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as err:
            raise FormatError(f"messages[{index}].tool_calls arguments are not JSON: {err}") from None
    return {"name": function.get("name"), "arguments": arguments}


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "tool": "tool", "observation": "tool"}


def _sharegpt(record: dict) -> dict[str, Any]:
    turns = []
    for i, message in enumerate(record["conversations"]):
        speaker = message.get("from") if isinstance(message, dict) else None
        if speaker not in _SHAREGPT_ROLES:
            raise FormatError(f"conversations[{i}].from is {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}")
        turn = {"role": _SHAREGPT_ROLES[speaker], "content": message.get("value") or ""}
        if turn["role"] == "tool":
            turn["name"] = message.get("name", "tool")
        turns.append(turn)
    return {"kind": "conversation", "turns": turns}


def _alpaca(record: dict) -> dict[str, Any]:
    extra = _str(record, "input")
    return _pair(_str(record, "instruction") + (f"\n\n{extra}" if extra else ""), _str(record, "output"))


def _seed_cot(record: dict) -> dict[str, Any]:
    return _pair(_str(record, "question"), f"{_str(record, 'thinking')}\n{_str(record, 'answer')}")


def _seed_response(record: dict) -> dict[str, Any]:
    return _pair(_str(record, "question"), _str(record, "response"))


def _seed_fim(record: dict) -> dict[str, Any]:
    prefix, middle, suffix = _str(record, "prefix"), _str(record, "middle"), _str(record, "suffix")
    return _pair(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>", middle)


def _seed_commit(record: dict) -> dict[str, Any]:
    user = (f"<|commit_before|>{_str(record, 'before')}<|/commit_before|>"
            f"<|commit_after|>{_str(record, 'after')}<|/commit_after|>")
    return _pair(user, f"<|commit_msg|>{_str(record, 'commit_message')}<|/commit_msg|>")


def _seed_exec(record: dict) -> dict[str, Any]:
    code = _str(record, "code")
    output = _str(record, "output")
    if "<|exec_error|>" not in output and "<|exec_result|>" not in output:
        output = f"<|exec_result|>{output}<|/exec_result|>"
    return _pair(f"Run this:\n{code}", f"<|exec|><|code|>{code}<|/code|><|/exec|>\n{output}\n"
                                       f"{_str(record, 'explanation')}")


def _seed_shell(record: dict) -> dict[str, Any]:
    return _pair(_str(record, "task"),
                 f"<|code|>{_str(record, 'command')}<|/code|>\n<|exec_result|>{_str(record, 'output')}<|/exec_result|>")


FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("chatml", ("messages",), _chatml),
    RecordFormat("sharegpt", ("conversations",), _sharegpt),
    RecordFormat("seed_cot", ("question", "thinking", "answer"), _seed_cot),
    RecordFormat("seed_response", ("question", "response"), _seed_response),
    RecordFormat("seed_fim", ("prefix", "middle", "suffix"), _seed_fim),
    RecordFormat("seed_commit", ("before", "after", "commit_message"), _seed_commit),
    RecordFormat("seed_exec", ("code", "output", "explanation"), _seed_exec),
    RecordFormat("seed_shell", ("task", "command", "output"), _seed_shell),
    RecordFormat("alpaca", ("instruction", "output"), _alpaca),
)


def detect_format(record: dict[str, Any]) -> RecordFormat | None:
    """The first format whose fields the record has; None for our own records (with ``kind``) and unknown ones."""
    if "kind" in record:
        return None
    return next((f for f in FORMATS if all(name in record for name in f.fields)), None)


def to_native(record: dict[str, Any], default_id: str) -> dict[str, Any]:
    """``record`` in our layout (unchanged when it is ours or of no known format)."""
    found = detect_format(record)
    if found is None:
        return record
    native = found.convert(record)
    native["id"] = record["id"] if isinstance(record.get("id"), str) and record["id"] else default_id
    return native


__all__ = ["FORMATS", "FormatError", "RecordFormat", "detect_format", "to_native"]
