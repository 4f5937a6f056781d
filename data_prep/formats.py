"""Record formats ``xoron prep`` reads besides its own: a registry of converters, not of downloads.

A JSONL record with a ``kind`` is ours (``xoron_dist.data.schema``) and passes unchanged. Any other
record is matched against ``FORMATS`` in order, by the fields it has; the first match converts it into
our record (a ``conversation`` or ``tool_use`` sample in the chat template, ``xoron_dist.data.chat``).
A record without an ``id`` gets ``<source stem>-<line or key>``, unique within its file.

    name          fields                               becomes
    chatml        messages [{role, content, tool_calls?}], tools?   conversation / tool_use (HF chat layout)
    sharegpt      conversations [{from, value}]        conversation (from: system|human|gpt|tool); tool_use
                                                       when gpt values hold Hermes <tool_call>{json}</tool_call>
    alpaca        instruction, output, input?          conversation
    seed_cot      question, thinking, answer           conversation; assistant = thinking + answer
    seed_response question, response                   conversation (the seed's anti-hallucination sets)
    seed_fim      prefix, middle, suffix               conversation; user <|fim_prefix|>..<|fim_suffix|>..<|fim_middle|>
    seed_commit   before, after, commit_message        conversation; assistant <|commit_msg|>..<|/commit_msg|>
    seed_exec     code, output, explanation            conversation; assistant <|exec|><|code|>..  output  explanation
    seed_shell    task, command, output                conversation; assistant <|code|>cmd<|/code|><|exec_result|>..

These are the chat layouts; ``data_prep.datasets`` adds the families of the seed card's public
datasets (caption, QA, tool-calling, speech, ...) and orders all of them into one ``REGISTRY``
(most fields first), which its ``detect_format`` searches. Conversion errors are ``FormatError``
(prep rejects the sample with the message).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class FormatError(ValueError):
    """A record that matches a format's fields but not its types."""


@dataclass(frozen=True)
class RecordFormat:
    name: str
    fields: tuple[str, ...]  # all present -> this format
    convert: Callable[[dict[str, Any]], dict[str, Any]]  # -> our record minus "id"
    kind: str = "conversation"  # what its records become (documentation; convert decides)
    covers: tuple[str, ...] = ()  # the seed card's datasets published in this layout
    auto: bool = True  # False: only by name (--format), as its fields are ours minus "kind"


def str_field(record: dict, name: str) -> str:
    """A string field; absent or null (Parquet's missing value) is ``""``."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def chat_pair(user: str, assistant: str) -> dict[str, Any]:
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
            turn["tool_calls"] = [tool_call(call, f"messages[{i}].tool_calls") for call in calls]
        if message.get("role") == "tool":
            turn["name"] = message.get("name")
        turns.append(turn)
    tools = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    kind = "tool_use" if tools or any("tool_calls" in t for t in turns) else "conversation"
    return {"kind": kind, "turns": turns, **({"tools": tools} if tools else {})}


def tool_call(call: Any, where: str) -> dict[str, Any]:
    """``{"name", "arguments"}`` from an OpenAI call (``{"function": {...}}``, arguments as a JSON string) or ours."""
    if not isinstance(call, dict):
        raise FormatError(f"{where} holds a {type(call).__name__}, not an object")
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as err:
            raise FormatError(f"{where} arguments are not JSON: {err}") from None
    return {"name": function.get("name"), "arguments": arguments}


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "tool": "tool", "observation": "tool"}


# Hermes function calling (NousResearch's layout, used by ShareGPT-style tool sets): a call is a JSON
# object between tags inside the assistant's text.
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _sharegpt(record: dict) -> dict[str, Any]:
    turns: list[dict[str, Any]] = []
    last_call = "tool"
    for i, message in enumerate(record["conversations"]):
        speaker = message.get("from") if isinstance(message, dict) else None
        if speaker not in _SHAREGPT_ROLES:
            raise FormatError(f"conversations[{i}].from is {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}")
        turn = {"role": _SHAREGPT_ROLES[speaker], "content": message.get("value") or ""}
        if turn["role"] == "assistant" and _HERMES_CALL.search(turn["content"]):
            calls = []
            for raw in _HERMES_CALL.findall(turn["content"]):
                try:
                    parsed = json.loads(raw)
                except ValueError as err:
                    raise FormatError(f"conversations[{i}] has a <tool_call> that is not JSON: {err}") from None
                calls.append(tool_call(parsed, f"conversations[{i}] <tool_call>"))
            turn["tool_calls"] = calls
            turn["content"] = _HERMES_CALL.sub("", turn["content"]).strip()
            last_call = calls[-1]["name"] or last_call
        if turn["role"] == "tool":
            turn["name"] = message.get("name", last_call)
        turns.append(turn)
    kind = "tool_use" if any("tool_calls" in turn for turn in turns) else "conversation"
    return {"kind": kind, "turns": turns}


def _alpaca(record: dict) -> dict[str, Any]:
    extra = str_field(record, "input")
    return chat_pair(str_field(record, "instruction") + (f"\n\n{extra}" if extra else ""), str_field(record, "output"))


def _seed_cot(record: dict) -> dict[str, Any]:
    return chat_pair(str_field(record, "question"), f"{str_field(record, 'thinking')}\n{str_field(record, 'answer')}")


def _seed_response(record: dict) -> dict[str, Any]:
    return chat_pair(str_field(record, "question"), str_field(record, "response"))


def _seed_fim(record: dict) -> dict[str, Any]:
    prefix, middle, suffix = str_field(record, "prefix"), str_field(record, "middle"), str_field(record, "suffix")
    return chat_pair(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>", middle)


def _seed_commit(record: dict) -> dict[str, Any]:
    user = (f"<|commit_before|>{str_field(record, 'before')}<|/commit_before|>"
            f"<|commit_after|>{str_field(record, 'after')}<|/commit_after|>")
    return chat_pair(user, f"<|commit_msg|>{str_field(record, 'commit_message')}<|/commit_msg|>")


def _seed_exec(record: dict) -> dict[str, Any]:
    code = str_field(record, "code")
    output = str_field(record, "output")
    if "<|exec_error|>" not in output and "<|exec_result|>" not in output:
        output = f"<|exec_result|>{output}<|/exec_result|>"
    return chat_pair(f"Run this:\n{code}", f"<|exec|><|code|>{code}<|/code|><|/exec|>\n{output}\n"
                                       f"{str_field(record, 'explanation')}")


def _seed_shell(record: dict) -> dict[str, Any]:
    command, output = str_field(record, "command"), str_field(record, "output")
    return chat_pair(str_field(record, "task"), f"<|code|>{command}<|/code|>\n<|exec_result|>{output}<|/exec_result|>")


FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("chatml", ("messages",), _chatml, "conversation | tool_use",
                 ("m-a-p/Code-Feedback", "HuggingFaceH4/no_robots")),
    RecordFormat("sharegpt", ("conversations",), _sharegpt, "conversation | tool_use",
                 ("THUDM/AgentInstruct", "RyokoAI/ShareGPT52K", "interstellarninja/tool-calls-singleturn",
                  "interstellarninja/tool-calls-multiturn")),
    RecordFormat("seed_cot", ("question", "thinking", "answer"), _seed_cot),
    RecordFormat("seed_response", ("question", "response"), _seed_response),
    RecordFormat("seed_fim", ("prefix", "middle", "suffix"), _seed_fim),
    RecordFormat("seed_commit", ("before", "after", "commit_message"), _seed_commit),
    RecordFormat("seed_exec", ("code", "output", "explanation"), _seed_exec),
    RecordFormat("seed_shell", ("task", "command", "output"), _seed_shell),
    RecordFormat("alpaca", ("instruction", "output"), _alpaca, "conversation",
                 ("iamtarun/python_code_instructions_18k_alpaca",)),
)


__all__ = ["FORMATS", "FormatError", "RecordFormat", "chat_pair", "str_field", "tool_call"]
