"""The chat template: conversations and tool use as text, tokens and a loss mask, and back.

One function renders (``render_segments``: the text in pieces, each marked target or not), one
parses (``parse``), and ``tokenize`` turns the pieces into token ids plus the runs of target tokens
that the packer trains on. Turns, as Qwen2.5 writes them, with the seed's tool tokens::

    <|im_start|>system\\n{content}<|available_tools|><|tool_def|>{tool json}<|/tool_def|>...
        <|/available_tools|><|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|tool_call|><|function_name|>{name}<|/function_name|>
        <|function_args|>{arguments json}<|/function_args|><|/tool_call|>...<|im_end|>\\n
    <|im_start|>tool\\n<|tool_result|><|function_name|>{name}<|/function_name|>{content}<|/tool_result|><|im_end|>\\n

(the system and assistant turns are one line each; broken here for width). The available tools go into the
system turn (one with empty content is made when a sample has tools but no system turn).

**Loss**: only an assistant turn's content, its tool calls and its closing ``<|im_end|>`` are
targets; the ``<|im_start|>assistant\\n`` header, every other turn and the newline between turns
are context. JSON is written with sorted keys and no ASCII escaping, so a render is a pure function
of the turns and ``parse(render(x))`` gives ``x`` back.

Raw samples (``xoron_dist.data.schema``) of kind ``conversation`` and ``tool_use`` carry
``turns`` (and ``tools`` for tool use) instead of ``prompt``/``text``::

    {"id": "c1", "kind": "tool_use", "tools": [{"name": "add", "description": "...", "parameters": {...}}],
     "turns": [{"role": "user", "content": "2+3?"},
               {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
               {"role": "tool", "name": "add", "content": "5"},
               {"role": "assistant", "content": "5"}]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Markers content may not hold: they would end a turn or a tool field early when parsed back.
_RESERVED = (IM_START, IM_END, "<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>",
             "<|function_name|>", "<|/function_name|>", "<|function_args|>", "<|/function_args|>",
             "<|available_tools|>", "<|/available_tools|>", "<|tool_def|>", "<|/tool_def|>")


class ChatFormatError(ValueError):
    """A conversation that the template cannot render or a text it cannot parse."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None  # the function a tool turn answers


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: tuple[dict[str, Any], ...] = field(default=())


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(f"{where} must be a string, got {type(value).__name__}")
    for marker in _RESERVED:
        if marker in value:
            raise ChatFormatError(f"{where} contains the template marker {marker}; remove it from the content")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][\w.\-]*", value):
        raise ChatFormatError(f"{where} must be a function name (letters, digits, _ . -), got {value!r}")
    return value


def conversation_from_json(fields: dict[str, Any]) -> Conversation:
    """A raw sample's ``turns`` (and ``tools``) -> ``Conversation``; ``ChatFormatError`` names the bad field."""
    raw_turns = fields.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise ChatFormatError("field 'turns' must be a non-empty list of {role, content} objects")
    turns = []
    for i, raw in enumerate(raw_turns):
        where = f"turns[{i}]"
        if not isinstance(raw, dict):
            raise ChatFormatError(f"{where} must be an object with 'role' and 'content'")
        role = raw.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role is {role!r}; use one of {', '.join(ROLES)}")
        content = _text(raw.get("content", ""), f"{where}.content")
        calls = raw.get("tool_calls") or []
        if calls and role != "assistant":
            raise ChatFormatError(f"{where} has tool_calls but only assistant turns call tools")
        parsed_calls = []
        for j, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("arguments", {}), dict):
                raise ChatFormatError(f"{where}.tool_calls[{j}] must be {{name, arguments: object}}")
            _text(_dumps(call.get("arguments", {})), f"{where}.tool_calls[{j}].arguments")
            parsed_calls.append(ToolCall(_name(call.get("name"), f"{where}.tool_calls[{j}].name"),
                                         dict(call.get("arguments", {}))))
        name = _name(raw.get("name"), f"{where}.name") if role == "tool" else None
        turns.append(Turn(role, content, tuple(parsed_calls), name))
    if not any(turn.role == "assistant" for turn in turns):
        raise ChatFormatError("field 'turns' has no assistant turn: nothing to train on")
    tools = fields.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t for t in tools):
        raise ChatFormatError("field 'tools' must be a list of objects with a 'name'")
    for i, tool in enumerate(tools):
        _text(_dumps(tool), f"tools[{i}]")
    return Conversation(tuple(turns), tuple(dict(t) for t in tools))


def conversation_to_json(conversation: Conversation) -> dict[str, Any]:
    """The inverse of ``conversation_from_json`` (the fields ``turns`` and, when present, ``tools``)."""
    turns = []
    for turn in conversation.turns:
        raw: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            raw["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
        if turn.name is not None:
            raw["name"] = turn.name
        turns.append(raw)
    out: dict[str, Any] = {"turns": turns}
    if conversation.tools:
        out["tools"] = [dict(t) for t in conversation.tools]
    return out


def render_segments(conversation: Conversation) -> list[tuple[str, bool]]:
    """The rendered text in pieces ``(text, is_target)``; their concatenation is ``render``."""
    turns = list(conversation.turns)
    if conversation.tools and (not turns or turns[0].role != "system"):
        turns.insert(0, Turn("system", ""))
    segments: list[tuple[str, bool]] = []
    for index, turn in enumerate(turns):
        head = f"{IM_START}{turn.role}\n"
        if turn.role == "assistant":
            calls = "".join(f"<|tool_call|><|function_name|>{c.name}<|/function_name|><|function_args|>"
                            f"{_dumps(c.arguments)}<|/function_args|><|/tool_call|>" for c in turn.tool_calls)
            segments += [(head, False), (turn.content + calls + IM_END, True), ("\n", False)]
            continue
        body = turn.content
        if turn.role == "tool":
            body = f"<|tool_result|><|function_name|>{turn.name}<|/function_name|>{body}<|/tool_result|>"
        if turn.role == "system" and index == 0 and conversation.tools:
            defs = "".join(f"<|tool_def|>{_dumps(tool)}<|/tool_def|>" for tool in conversation.tools)
            body += f"<|available_tools|>{defs}<|/available_tools|>"
        segments.append((head + body + IM_END + "\n", False))
    return segments


def render(conversation: Conversation) -> str:
    return "".join(text for text, _ in render_segments(conversation))


_TURN = re.compile(re.escape(IM_START) + r"(system|user|assistant|tool)\n(.*?)" + re.escape(IM_END) + r"\n?", re.S)
_CALL = re.compile(r"<\|tool_call\|><\|function_name\|>(.*?)<\|/function_name\|><\|function_args\|>(.*?)"
                   r"<\|/function_args\|><\|/tool_call\|>", re.S)
_RESULT = re.compile(r"<\|tool_result\|><\|function_name\|>(.*?)<\|/function_name\|>(.*)<\|/tool_result\|>", re.S)
_TOOLS = re.compile(r"<\|available_tools\|>(.*)<\|/available_tools\|>$", re.S)
_DEF = re.compile(r"<\|tool_def\|>(.*?)<\|/tool_def\|>", re.S)


def parse(text: str) -> Conversation:
    """A rendered conversation back to turns and tools (``ChatFormatError`` where it is not one)."""
    turns, tools, position = [], [], 0
    for match in _TURN.finditer(text):
        if match.start() != position:
            raise ChatFormatError(f"text outside a turn at character {position}: {text[position:match.start()]!r}")
        position = match.end()
        role, body = match.group(1), match.group(2)
        if role == "assistant":
            calls = [ToolCall(name, json.loads(args)) for name, args in _CALL.findall(body)]
            first = _CALL.search(body)
            turns.append(Turn(role, body[: first.start()] if first else body, tuple(calls)))
        elif role == "tool":
            result = _RESULT.fullmatch(body)
            if result is None:
                raise ChatFormatError(f"tool turn {len(turns)} is not <|tool_result|><|function_name|>...")
            turns.append(Turn(role, result.group(2), (), result.group(1)))
        else:
            defs = _TOOLS.search(body) if role == "system" and not turns else None
            if defs is not None:
                tools = [json.loads(d) for d in _DEF.findall(defs.group(1))]
                body = body[: defs.start()]
            turns.append(Turn(role, body))
    if position != len(text):
        raise ChatFormatError(f"text outside a turn at character {position}: {text[position:position + 40]!r}")
    if tools and turns[0] == Turn("system", ""):
        turns = turns[1:]  # the system turn render made to hold the tools
    return Conversation(tuple(turns), tuple(tools))


def tokenize(encode: Callable[[str], list[int]], conversation: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of ``render(conversation)`` and the target runs as flat ``[start, end, start, end ...]``
    offsets into them (each segment is encoded alone, so a run's edges are exact)."""
    tokens: list[int] = []
    runs: list[int] = []
    for text, is_target in render_segments(conversation):
        ids = encode(text)
        if is_target:
            runs += [len(tokens), len(tokens) + len(ids)]
        tokens += ids
    return tokens, runs


def target_mask(length: int, runs: Sequence[int]) -> list[bool]:
    """(length,) per token: inside a target run."""
    mask = [False] * length
    for start, end in zip(runs[::2], runs[1::2], strict=True):
        mask[start:end] = [True] * (end - start)
    return mask


__all__ = ["ChatFormatError", "Conversation", "ROLES", "ToolCall", "Turn", "conversation_from_json",
           "conversation_to_json", "parse", "render", "render_segments", "target_mask", "tokenize"]
