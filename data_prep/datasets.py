"""The dataset families of the seed's Hugging Face card, as data: how to recognise a record, what it becomes.

The seed's card (``docs/huggingface/hf.md`` of Xoron-Dev) trains on ~55 public datasets. ``xoron prep``
reads LOCAL copies of them in the layout their repositories publish (JSONL, a JSON array, or Parquet
shards whose media columns hold Hugging Face ``{"bytes", "path"}`` structs); nothing is downloaded.
Datasets that share a layout share one family here: one row of ``DATASET_FORMATS`` names the family,
the fields that identify its records, the kind it becomes and the card datasets it covers. The
chat layouts of ``data_prep.formats`` (chatml, ShareGPT, Alpaca, the seed's synth files) are families
of the same registry; ``REGISTRY`` holds them all.

Auto-detection (``detect_format``): a record with a ``kind`` is ours; otherwise the family whose
``fields`` are all present wins, the family naming the MOST fields first, ties in table order
(``formats.FORMATS`` before ``DATASET_FORMATS``). So ``{question, thinking, answer}`` is ``seed_cot``
before ``qa`` (``{question, answer}``), and ``{system_prompt, question, response}`` is ``orca`` before
``seed_response``. Families whose fields are our own names minus ``kind`` (``image_text``: image +
text; ``text_only``: text) are never guessed, since such a record is more likely ours with its
``kind`` forgotten (rejected, saying so). ``xoron prep --format NAME`` skips detection and converts
every JSONL / JSON / Parquet record with NAME (tar samples are always detected).

Media: a converted record names its medium in ``image`` / ``video`` / ``audio`` (a path relative to
the input file's folder, or the bytes the Parquet reader found); the reader turns it into a ``Blob``
exactly as for our own JSONL, so a Parquet row with image bytes and a JSONL line with the same image
as a file give the same shard row.
"""

from __future__ import annotations

import json
from typing import Any

from data_prep.formats import FORMATS, FormatError, RecordFormat, chat_pair, str_field, tool_call

# --------------------------------------------------------------------------- text and chat families


def _dolly(record: dict) -> dict[str, Any]:
    context = str_field(record, "context")
    user = str_field(record, "instruction") + (f"\n\n{context}" if context else "")
    return chat_pair(user, str_field(record, "response"))


def _orca(record: dict) -> dict[str, Any]:
    native = chat_pair(str_field(record, "question"), str_field(record, "response"))
    system = str_field(record, "system_prompt")
    if system:
        native["turns"].insert(0, {"role": "system", "content": system})
    return native


def _qa(record: dict) -> dict[str, Any]:
    return chat_pair(str_field(record, "question"), str_field(record, "answer"))


def _wildchat(record: dict) -> dict[str, Any]:
    messages = record["conversation"]
    if not isinstance(messages, list):
        raise FormatError("field 'conversation' must be a list of {role, content}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise FormatError(f"conversation[{i}] must be an object with a string 'content'")
        turns.append({"role": message.get("role"), "content": message["content"]})
    return {"kind": "conversation", "turns": turns}


def _ultrachat(record: dict) -> dict[str, Any]:
    data = record["data"]
    if not isinstance(data, list) or not all(isinstance(text, str) for text in data):
        raise FormatError("field 'data' must be a list of strings (user and assistant turns alternating)")
    return {"kind": "conversation",
            "turns": [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(data)]}


def _summary(record: dict) -> dict[str, Any]:
    return chat_pair(f"Summarize this conversation:\n{str_field(record, 'dialogue')}", str_field(record, "summary"))


def _humanevalpack(record: dict) -> dict[str, Any]:
    return chat_pair(str_field(record, "instruction"),
                     str_field(record, "declaration") + str_field(record, "canonical_solution"))


def _text_column(name: str):
    def convert(record: dict) -> dict[str, Any]:
        return {"kind": "text", "text": str_field(record, name)}
    return convert


# --------------------------------------------------------------------------- tool calling


_FUNCTION_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function-call": "assistant",
                   "function-response": "tool"}


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise FormatError(f"{where} is not JSON: {err}") from None


def _functions_sharegpt(record: dict) -> dict[str, Any]:
    """Locutusque/function-calling-chatml: ShareGPT turns whose ``function-call`` values are JSON calls."""
    turns: list[dict[str, Any]] = []
    system = "\n".join(filter(None, (str_field(record, "system_message"), str_field(record, "function_description"))))
    if system:
        turns.append({"role": "system", "content": system})
    last_call = "tool"
    for i, message in enumerate(record["conversations"]):
        speaker = message.get("from") if isinstance(message, dict) else None
        if speaker not in _FUNCTION_ROLES:
            raise FormatError(f"conversations[{i}].from is {speaker!r}; expected one of {', '.join(_FUNCTION_ROLES)}")
        value = message.get("value") or ""
        if speaker == "function-call":
            call = tool_call(_parse_json(value, f"conversations[{i}].value"), f"conversations[{i}].value")
            last_call = call["name"] or last_call
            turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif speaker == "function-response":
            turns.append({"role": "tool", "name": last_call, "content": value})
        elif speaker == "system" and turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{value}\n{turns[0]['content']}"
        else:
            turns.append({"role": _FUNCTION_ROLES[speaker], "content": value})
    kind = "tool_use" if any("tool_calls" in t for t in turns) else "conversation"
    return {"kind": kind, "turns": turns}


def _apigen(record: dict) -> dict[str, Any]:
    """argilla/Synth-APIGen-v0.1: ``query``; ``tools`` and ``answers`` as JSON strings (or lists)."""
    tools = record["tools"]
    answers = record["answers"]
    tools = _parse_json(tools, "field 'tools'") if isinstance(tools, str) else tools
    answers = _parse_json(answers, "field 'answers'") if isinstance(answers, str) else answers
    if not isinstance(tools, list) or not isinstance(answers, list) or not answers:
        raise FormatError("fields 'tools' and 'answers' must be lists (JSON); 'answers' non-empty")
    calls = [tool_call(answer, f"answers[{i}]") for i, answer in enumerate(answers)]
    return {"kind": "tool_use", "tools": tools,
            "turns": [{"role": "user", "content": str_field(record, "query")},
                      {"role": "assistant", "content": "", "tool_calls": calls}]}


# --------------------------------------------------------------------------- media families


def _caption(kind: str, medium: str, media_field: str, text_field: str):
    def convert(record: dict) -> dict[str, Any]:
        return {"kind": kind, "text": str_field(record, text_field), medium: _media(record, media_field)}
    return convert


def _media(record: dict, name: str) -> Any:
    value = record.get(name)
    if value is None:
        raise FormatError(f"field '{name}' is empty: this record has no media")
    return value


def _lettered(options: Any, where: str) -> str:
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise FormatError(f"field '{where}' must be a list of strings")
    return "\n".join(o if o[:2] in {f"{c}." for c in "ABCDEFGH"} else f"{chr(65 + i)}. {o}"
                     for i, o in enumerate(options))


def _scienceqa(record: dict) -> dict[str, Any]:
    """derek-thomas/ScienceQA: ``answer`` is the index into ``choices``; the image is optional."""
    choices, answer = record["choices"], record["answer"]
    if not isinstance(choices, list) or not choices:
        raise FormatError("field 'choices' must be a non-empty list of strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FormatError(f"field 'answer' must index 'choices' (0..{len(choices) - 1}), got {answer!r}")
    hint = str_field(record, "hint")
    prompt = (f"{hint}\n" if hint else "") + f"{str_field(record, 'question')}\n{_lettered(choices, 'choices')}"
    solution = str_field(record, "solution")
    text = f"{chr(65 + answer)}. {choices[answer]}" + (f"\n{solution}" if solution else "")
    if record.get("image") is None:
        return chat_pair(prompt, text)
    return {"kind": "image_caption", "prompt": prompt, "text": text, "image": record["image"]}


def _video_question(id_field: str, question: str, answer: str, options: str | None = None):
    """Video QA rows that name their clip by id: the clip is ``<id>.mp4`` beside the input file."""
    def convert(record: dict) -> dict[str, Any]:
        prompt = str_field(record, question)
        if options is not None:
            prompt += "\n" + _lettered(record.get(options), options)
        clip = record.get(id_field)
        if not isinstance(clip, str) or not clip:
            raise FormatError(f"field '{id_field}' must name the clip (a non-empty string), got {clip!r}")
        return {"kind": "video_caption", "prompt": prompt, "text": str_field(record, answer), "video": f"{clip}.mp4"}
    return convert


def _pix2pix(record: dict) -> dict[str, Any]:
    return {"kind": "text_to_image", "text": str_field(record, "edited_prompt"),
            "image": _media(record, "edited_image")}


def _family(name: str, fields: tuple[str, ...], kind: str, covers: tuple[str, ...], convert,
            auto: bool = True) -> RecordFormat:
    return RecordFormat(name, fields, convert, kind, covers, auto)


DATASET_FORMATS: tuple[RecordFormat, ...] = (
    # instruction / chat
    _family("dolly", ("instruction", "context", "response"), "conversation",
            ("databricks/databricks-dolly-15k",), _dolly),
    _family("orca", ("system_prompt", "question", "response"), "conversation", ("Open-Orca/OpenOrca",), _orca),
    _family("qa", ("question", "answer"), "conversation", ("glaiveai/glaive-code-assistant-v2",), _qa),
    _family("wildchat", ("conversation",), "conversation", ("allenai/WildChat-1M",), _wildchat),
    _family("ultrachat", ("id", "data"), "conversation", ("stingning/ultrachat",), _ultrachat),
    _family("dialogue_summary", ("dialogue", "summary"), "conversation",
            ("abhi227070/conversation-to-summarization-dataset",), _summary),
    # code
    _family("humanevalpack", ("task_id", "instruction", "declaration", "canonical_solution"), "conversation",
            ("bigcode/humanevalpack",), _humanevalpack),
    _family("code_files", ("repo_name", "path", "content"), "text",
            ("codeparrot/codeparrot-clean", "loubnabnl/github-jupyter-code-to-text"), _text_column("content")),
    # tool calling
    _family("function_calling_sharegpt", ("function_description", "conversations"), "tool_use",
            ("Locutusque/function-calling-chatml",), _functions_sharegpt),
    _family("apigen", ("query", "answers", "tools"), "tool_use", ("argilla/Synth-APIGen-v0.1",), _apigen),
    # vision
    _family("image_text", ("image", "text"), "image_caption",
            ("Naveengo/flickr8k", "ybelkada/football-dataset", "HuggingFaceM4/WebSight"),
            _caption("image_caption", "image", "image", "text"), auto=False),
    _family("image_description", ("image", "image_description"), "image_caption",
            ("jmhessel/newyorker_caption_contest",), _caption("image_caption", "image", "image", "image_description")),
    _family("scienceqa", ("question", "choices", "answer", "solution"), "image_caption",
            ("derek-thomas/ScienceQA",), _scienceqa),
    _family("video_instruct", ("video_id", "q", "a"), "video_caption", ("MBZUAI/VideoInstruct-100K",),
            _video_question("video_id", "q", "a")),
    _family("video_mme", ("videoID", "question", "options", "answer"), "video_caption", ("lmms-lab/Video-MME",),
            _video_question("videoID", "question", "answer", "options")),
    # generation
    _family("instructpix2pix", ("edited_image", "edited_prompt"), "text_to_image",
            ("timbrooks/instructpix2pix-clip-filtered",), _pix2pix),
    _family("sd_prompts", ("Prompt",), "text", ("Gustavosta/Stable-Diffusion-Prompts",), _text_column("Prompt")),
    _family("text_only", ("text",), "text",
            ("FredZhang7/stable-diffusion-prompts-2.47M", "succinctly/midjourney-prompts"), _text_column("text"),
            auto=False),
    # audio
    _family("tts", ("audio", "text_normalized"), "text_to_speech", ("blabble-io/libritts_r", "MikhailT/hifi-tts"),
            _caption("text_to_speech", "audio", "audio", "text_normalized")),
    _family("asr", ("audio", "text", "speaker_id", "chapter_id"), "audio_transcript", ("openslr/librispeech_asr",),
            _caption("audio_transcript", "audio", "audio", "text")),
    _family("asr_transcript", ("audio", "transcript"), "audio_transcript", ("parler-tts/mls_eng_10k",),
            _caption("audio_transcript", "audio", "audio", "transcript")),
)

# Most fields first (a family that extends another's fields must win), ties in table order.
REGISTRY: tuple[RecordFormat, ...] = tuple(sorted(FORMATS + DATASET_FORMATS, key=lambda f: -len(f.fields)))
BY_NAME: dict[str, RecordFormat] = {f.name: f for f in REGISTRY}

# Card datasets no family reads, and why (the README table lists them).
_URL_VIDEOS = "CSV/JSON metadata with video URLs (CSV is no input format); fetch the clips and write our JSONL"
_PREFERENCE = "human preference scores over generated media named by URL: no preference kind, media not local"
_UNVERIFIED = ("layout not checked against the published files (no network); read when its rows use a registered "
               "layout (messages, conversations, instruction/output, question/answer)")
NOT_COVERED: dict[str, str] = {
    "OpenAssistant/oasst1": "one message per row; a conversation is a tree across rows (parent_id), not a record",
    "osunlp/MagicBrush": "image editing (source + mask -> target image): no editing kind",
    **dict.fromkeys(("Rapidata/sora-video-generation-physics-likert-scoring",
                     "Rapidata/sora-video-generation-style-likert-scoring",
                     "Rapidata/sora-video-generation-alignment-likert-scoring",
                     "Rapidata/text-2-video-human-preferences", "Rapidata/text-2-video-human-preferences-sora-2",
                     "Rapidata/image-to-video-human-preference-seedance-1-pro"), _PREFERENCE),
    **dict.fromkeys(("TempoFunk/webvid-10M", "multimodalart/panda-70m", "nkp37/OpenVid-1M", "WenhaoWang/VidProM",
                     "WenhaoWang/TIP-I2V", "jovianzm/img2vid-pexels-350k", "TencentARC/MiraData",
                     "APRIL-AIGC/UltraVideo", "Mutonix/Vript"), _URL_VIDEOS),
    **dict.fromkeys(("saurabh5/rlvr-code-data-Swift", "finbarr/rlvr-code-data-swift-code-edit",
                     "ExAi/Code-Golang-QA-2k", "smcleod/golang-coder", "driaforall/pythonic-function-calling",
                     "AlicanKiraz0/Agentic-Chain-of-Thought-Coding-SFT-Dataset",
                     "renjiepi/medium_20000-file_operations_n100k1"), _UNVERIFIED),
}


def detect_format(record: dict[str, Any]) -> RecordFormat | None:
    """The registered format of ``record`` (``data_prep.datasets.REGISTRY``: most fields first, ties in
    table order; formats with ``auto=False`` only by name); None for our own records (with ``kind``)
    and unknown ones."""
    if "kind" in record:
        return None
    return next((f for f in REGISTRY if f.auto and all(name in record for name in f.fields)), None)


def to_native(record: dict[str, Any], default_id: str, forced: RecordFormat | None = None) -> dict[str, Any]:
    """``record`` in our layout (unchanged when it is ours or of no known format). ``forced``: convert
    with that format whatever the record looks like (``xoron prep --format``); missing fields are an error."""
    found = forced or detect_format(record)
    if found is None:
        return record
    missing = [name for name in found.fields if name not in record]
    if missing:
        raise FormatError(f"the record has no {', '.join(repr(m) for m in missing)}, which format "
                          f"'{found.name}' needs (it has {', '.join(map(repr, record)) or 'no fields'})")
    native = found.convert(record)
    native["id"] = record["id"] if isinstance(record.get("id"), str) and record["id"] else default_id
    return native


def resolve(name: str) -> RecordFormat:
    """The registered format called ``name``; an unknown name is an error listing the known ones."""
    if name not in BY_NAME:
        raise ValueError(f"unknown dataset format '{name}'; known formats: {', '.join(sorted(BY_NAME))}")
    return BY_NAME[name]


__all__ = ["BY_NAME", "DATASET_FORMATS", "NOT_COVERED", "REGISTRY", "detect_format", "resolve", "to_native"]
