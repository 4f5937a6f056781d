"""The dataset registry: each family's published layout -> our record; Parquet and JSON-array input to ``xoron prep``.

Fixture rows use the field names the dataset repositories publish (values shortened). Media cells are
Hugging Face ``{"bytes", "path"}`` structs, as ``Image()``/``Audio()`` columns store them in Parquet.
"""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from data_prep import prepare
from data_prep.datasets import BY_NAME, DATASET_FORMATS, NOT_COVERED, REGISTRY, detect_format, to_native
from data_prep.errors import PrepError
from data_prep.formats import FormatError
from data_prep.sources import discover_sources
from tests.data_prep.inputs import gradient_image, png_bytes, sine, tiny_config
from xoron_dist.data.schema import REJECTS_FILE

IMG = {"bytes": b"\x89PNG...", "path": "1000268201.jpg"}
WAV = {"bytes": b"RIFF...", "path": "1272-128104-0000.flac"}


def user_assistant(user: str, assistant: str, system: str | None = None) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# (family, record in its published layout, forced?, expected native record without "id")
CASES = [
    ("dolly", {"instruction": "Who wrote Hamlet?", "context": "Hamlet is a tragedy.", "response": "Shakespeare.",
               "category": "closed_qa"}, False,
     {"kind": "conversation", "turns": user_assistant("Who wrote Hamlet?\n\nHamlet is a tragedy.", "Shakespeare.")}),
    ("orca", {"id": "niv.242684", "system_prompt": "You are an AI assistant.", "question": "2+2?",
              "response": "4"}, False,
     {"kind": "conversation", "turns": user_assistant("2+2?", "4", "You are an AI assistant.")}),
    ("qa", {"question": "How do I sort a list in Python?", "answer": "Use sorted(xs)."}, False,
     {"kind": "conversation", "turns": user_assistant("How do I sort a list in Python?", "Use sorted(xs).")}),
    ("wildchat", {"conversation_hash": "c0ffee", "model": "gpt-3.5-turbo", "turn": 1, "language": "English",
                  "conversation": [{"role": "user", "content": "hi", "language": "English", "toxic": False},
                                   {"role": "assistant", "content": "Hello!", "language": "English"}]}, False,
     {"kind": "conversation", "turns": user_assistant("hi", "Hello!")}),
    ("ultrachat", {"id": "0", "data": ["What is rain?", "Water falling.", "Why?", "Gravity."]}, False,
     {"kind": "conversation", "turns": user_assistant("What is rain?", "Water falling.")
      + user_assistant("Why?", "Gravity.")}),
    ("dialogue_summary", {"dialogue": "A: lunch?\nB: sure", "summary": "They agree to have lunch."}, False,
     {"kind": "conversation", "turns": user_assistant("Summarize this conversation:\nA: lunch?\nB: sure",
                                                      "They agree to have lunch.")}),
    ("humanevalpack", {"task_id": "Python/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n",
                       "declaration": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
                       "buggy_solution": "    return x\n", "bug_type": "missing logic", "entry_point": "inc",
                       "test": "assert inc(1) == 2", "instruction": "Write a Python function `inc(x)`."}, False,
     {"kind": "conversation", "turns": user_assistant("Write a Python function `inc(x)`.",
                                                      "def inc(x):\n    return x + 1\n")}),
    ("code_files", {"repo_name": "a/b", "path": "src/x.py", "copies": "2", "size": "9", "content": "print(1)\n",
                    "license": "mit", "hash": "1f", "line_mean": 9.0}, False, {"kind": "text", "text": "print(1)\n"}),
    ("function_calling_sharegpt", {
        "system_message": "You are a helpful assistant with access to functions.",
        "function_description": '{"name": "get_weather", "parameters": {"city": "string"}}',
        "conversations": [{"from": "human", "value": "Weather in Paris?"},
                          {"from": "function-call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                          {"from": "function-response", "value": '{"temp": 20}'},
                          {"from": "gpt", "value": "It is 20 degrees."}]}, False,
     {"kind": "tool_use", "turns": [
         {"role": "system", "content": "You are a helpful assistant with access to functions.\n"
                                       '{"name": "get_weather", "parameters": {"city": "string"}}'},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
         {"role": "tool", "name": "get_weather", "content": '{"temp": 20}'},
         {"role": "assistant", "content": "It is 20 degrees."}]}),
    ("apigen", {"query": "What is 5 factorial?", "func_name": "factorial", "func_desc": "n!",
                "tools": '[{"name": "factorial", "description": "n!", "parameters": {"n": {"type": "int"}}}]',
                "answers": '[{"name": "factorial", "arguments": {"n": 5}}]'}, False,
     {"kind": "tool_use", "tools": [{"name": "factorial", "description": "n!", "parameters": {"n": {"type": "int"}}}],
      "turns": [{"role": "user", "content": "What is 5 factorial?"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "factorial", "arguments": {"n": 5}}]}]}),
    ("image_text", {"image": IMG, "text": "A dog runs on grass."}, True,
     {"kind": "image_caption", "text": "A dog runs on grass.", "image": IMG}),
    ("image_description", {"image": IMG, "contest_number": 1, "image_location": "an office",
                           "image_description": "A man sits at a desk.", "caption_choices": ["a", "b"]}, False,
     {"kind": "image_caption", "text": "A man sits at a desk.", "image": IMG}),
    ("scienceqa", {"image": IMG, "question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1,
                   "hint": "Look closely.", "task": "closed choice", "grade": "grade2", "subject": "natural science",
                   "lecture": "Mammals have fur.", "solution": "A dog has fur."}, False,
     {"kind": "image_caption", "prompt": "Look closely.\nWhich is a mammal?\nA. frog\nB. dog",
      "text": "B. dog\nA dog has fur.", "image": IMG}),
    ("video_instruct", {"video_id": "v_k_ZXmr8pmrs", "q": "What happens?", "a": "A man juggles."}, False,
     {"kind": "video_caption", "prompt": "What happens?", "text": "A man juggles.", "video": "v_k_ZXmr8pmrs.mp4"}),
    ("video_mme", {"video_id": "001", "duration": "short", "domain": "Knowledge", "url": "https://youtu.be/x",
                   "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
                   "question": "How many apples?", "options": ["A. One.", "B. Two."], "answer": "B"}, False,
     {"kind": "video_caption", "prompt": "How many apples?\nA. One.\nB. Two.", "text": "B",
      "video": "fFjv93ACGo8.mp4"}),
    ("instructpix2pix", {"original_prompt": "a house", "original_image": IMG, "edit_prompt": "make it snowy",
                         "edited_prompt": "a snowy house", "edited_image": IMG}, False,
     {"kind": "text_to_image", "text": "a snowy house", "image": IMG}),
    ("sd_prompts", {"Prompt": "a castle, highly detailed"}, False,
     {"kind": "text", "text": "a castle, highly detailed"}),
    ("text_only", {"text": "a cat in a hat --v 5"}, True, {"kind": "text", "text": "a cat in a hat --v 5"}),
    ("tts", {"audio": WAV, "text_normalized": "Hello there.", "text_original": "Hello there.", "speaker_id": "19",
             "path": "19_198.wav", "chapter_id": "198", "id": "19_198_000000_000000"}, False,
     {"kind": "text_to_speech", "text": "Hello there.", "audio": WAV}),
    ("asr", {"file": "1272-128104-0000.flac", "audio": WAV, "text": "MISTER QUILTER", "speaker_id": 1272,
             "chapter_id": 128104, "id": "1272-128104-0000"}, False,
     {"kind": "audio_transcript", "text": "MISTER QUILTER", "audio": WAV}),
    ("asr_transcript", {"audio": WAV, "original_path": "x.flac", "begin_time": 0.0, "end_time": 1.5,
                        "transcript": "it was a dark night", "audio_duration": 1.5, "speaker_id": "10214",
                        "book_id": "10071"}, False,
     {"kind": "audio_transcript", "text": "it was a dark night", "audio": WAV}),
]


@pytest.mark.parametrize("name, record, forced, expected", CASES, ids=[case[0] for case in CASES])
def test_each_family_converts_its_published_layout(name, record, forced, expected):
    found = detect_format(record)
    assert found is None if forced else found.name == name  # families of our own field names are never guessed
    native = to_native(record, "src-7", BY_NAME[name] if forced else None)
    given_id = record.get("id") if isinstance(record.get("id"), str) else None
    assert native == {**expected, "id": given_id or "src-7"}


def test_every_family_has_a_case_and_more_specific_families_win():
    assert {f.name for f in DATASET_FORMATS} == {case[0] for case in CASES}
    for i, earlier in enumerate(REGISTRY):  # no family is shadowed by one that names fewer of its fields
        for later in REGISTRY[i + 1:]:
            assert not set(earlier.fields) < set(later.fields), (earlier.name, later.name)
    assert detect_format({"question": "q", "thinking": "t", "answer": "a"}).name == "seed_cot"
    assert detect_format({"id": "x", "text": "ours, kind forgotten"}) is None


def test_sharegpt_with_hermes_tool_calls_is_tool_use():
    """interstellarninja/tool-calls-*: Hermes calls inside ShareGPT values (layout as NousResearch documents it)."""
    record = {"conversations": [
        {"from": "system", "value": "<tools> [{\"name\": \"get_stock\"}] </tools>"},
        {"from": "human", "value": "Price of AAPL?"},
        {"from": "gpt", "value": '<tool_call>\n{"name": "get_stock", "arguments": {"s": "AAPL"}}\n</tool_call>'},
        {"from": "tool", "value": "<tool_response>{\"price\": 1}</tool_response>"},
        {"from": "gpt", "value": "It is 1."}]}
    native = to_native(record, "x")
    assert native["kind"] == "tool_use"
    assert native["turns"][2] == {"role": "assistant", "content": "",
                                  "tool_calls": [{"name": "get_stock", "arguments": {"s": "AAPL"}}]}
    assert native["turns"][3]["name"] == "get_stock"
    with pytest.raises(FormatError, match="conversations\\[0\\] has a <tool_call> that is not JSON"):
        to_native({"conversations": [{"from": "gpt", "value": "<tool_call>{oops</tool_call>"}]}, "x")


# The ``datasets:`` list of the seed's card (docs/huggingface/hf.md of nigfuapp-web/Xoron-Dev).
CARD = """m-a-p/Code-Feedback iamtarun/python_code_instructions_18k_alpaca codeparrot/codeparrot-clean
bigcode/humanevalpack loubnabnl/github-jupyter-code-to-text saurabh5/rlvr-code-data-Swift
finbarr/rlvr-code-data-swift-code-edit ExAi/Code-Golang-QA-2k smcleod/golang-coder databricks/databricks-dolly-15k
OpenAssistant/oasst1 HuggingFaceH4/no_robots Open-Orca/OpenOrca abhi227070/conversation-to-summarization-dataset
allenai/WildChat-1M THUDM/AgentInstruct glaiveai/glaive-code-assistant-v2 stingning/ultrachat RyokoAI/ShareGPT52K
AlicanKiraz0/Agentic-Chain-of-Thought-Coding-SFT-Dataset Locutusque/function-calling-chatml
driaforall/pythonic-function-calling argilla/Synth-APIGen-v0.1 interstellarninja/tool-calls-singleturn
interstellarninja/tool-calls-multiturn Naveengo/flickr8k ybelkada/football-dataset jmhessel/newyorker_caption_contest
derek-thomas/ScienceQA HuggingFaceM4/WebSight lmms-lab/Video-MME MBZUAI/VideoInstruct-100K
Gustavosta/Stable-Diffusion-Prompts FredZhang7/stable-diffusion-prompts-2.47M succinctly/midjourney-prompts
osunlp/MagicBrush timbrooks/instructpix2pix-clip-filtered Rapidata/sora-video-generation-physics-likert-scoring
Rapidata/sora-video-generation-style-likert-scoring Rapidata/sora-video-generation-alignment-likert-scoring
Rapidata/text-2-video-human-preferences Rapidata/text-2-video-human-preferences-sora-2 TempoFunk/webvid-10M
multimodalart/panda-70m nkp37/OpenVid-1M WenhaoWang/VidProM WenhaoWang/TIP-I2V jovianzm/img2vid-pexels-350k
TencentARC/MiraData APRIL-AIGC/UltraVideo Mutonix/Vript Rapidata/image-to-video-human-preference-seedance-1-pro
openslr/librispeech_asr blabble-io/libritts_r parler-tts/mls_eng_10k MikhailT/hifi-tts
renjiepi/medium_20000-file_operations_n100k1""".split()


def test_every_card_dataset_is_covered_once_or_listed_as_not_covered():
    covered = [name for family in REGISTRY for name in family.covers]
    assert len(covered) == len(set(covered)) and not set(covered) & set(NOT_COVERED)
    assert sorted(covered + list(NOT_COVERED)) == sorted(CARD)
    assert len(CARD) == 57 and len(set(covered)) == 33


def test_bad_records_are_format_errors():
    with pytest.raises(FormatError, match="field 'answer' must index 'choices' \\(0..1\\), got 2"):
        to_native({"question": "q", "choices": ["a", "b"], "answer": 2, "solution": ""}, "x")
    with pytest.raises(FormatError, match="conversations\\[0\\].from is 'robot'"):
        to_native({"function_description": "", "conversations": [{"from": "robot", "value": "?"}]}, "x")
    with pytest.raises(FormatError, match="the record has no 'image', which format 'image_text' needs"):
        to_native({"text": "no picture"}, "x", BY_NAME["image_text"])
    with pytest.raises(PrepError, match="--format: unknown dataset format 'flickr'; known formats: .*image_text"):
        discover_sources([], dataset_format="flickr")


# --------------------------------------------------------------------------- Parquet and JSON input


def _rows(out, manifest) -> dict[str, list[dict]]:
    rows = {}
    for kind, info in sorted(manifest.datasets.items()):
        for shard in info.shards:
            with pa.memory_map(str(out / shard.path)) as f:
                rows.setdefault(kind, []).extend(pa.ipc.open_file(f).read_all().to_pylist())
    return rows


def _rejects(out) -> list[dict]:
    return [json.loads(line) for line in (out / REJECTS_FILE).read_text().splitlines()]


CAPTIONS = ["a red square", "a wide gradient", "broken bytes", "a tall gradient", "a small tile"]


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    """The same five flickr8k rows (image, text) as Parquet with image-bytes cells (row groups of 2, so
    units of 3 start inside a group) and as JSONL + image files; row 3's image is not an image."""
    root = tmp_path_factory.mktemp("flickr")
    images = [png_bytes(gradient_image(w, h, seed)) for seed, (w, h) in enumerate([(8, 8), (40, 24), (8, 8),
                                                                                   (24, 40), (16, 16)])]
    images[2] = b"not an image"
    (root / "pq").mkdir()
    cells = [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)]
    pq.write_table(pa.table({"image": cells, "text": CAPTIONS}), root / "pq" / "captions.parquet", row_group_size=2)
    (root / "jsonl" / "img").mkdir(parents=True)
    for i, data in enumerate(images):
        (root / "jsonl" / "img" / f"{i}.png").write_bytes(data)
    (root / "jsonl" / "captions.jsonl").write_text(
        "".join(json.dumps({"image": f"img/{i}.png", "text": t}) + "\n" for i, t in enumerate(CAPTIONS)))
    return root


def test_parquet_image_bytes_prep_like_jsonl_and_files(flickr_like, tmp_path):
    cfg = tiny_config()
    from_parquet = prepare([flickr_like / "pq" / "captions.parquet"], tmp_path / "pq", cfg, progress=False,
                           dataset_format="image_text")
    from_jsonl = prepare([flickr_like / "jsonl" / "captions.jsonl"], tmp_path / "jsonl", cfg, progress=False,
                         dataset_format="image_text")
    rows = _rows(tmp_path / "pq", from_parquet)
    assert rows == _rows(tmp_path / "jsonl", from_jsonl)
    assert [r["id"] for r in rows["image_caption"]] == ["captions-1", "captions-2", "captions-4", "captions-5"]
    assert (rows["image_caption"][1]["image_height"], rows["image_caption"][1]["image_width"]) == (32, 32)
    assert from_parquet.datasets["image_caption"].stats == from_jsonl.datasets["image_caption"].stats
    (bad,) = _rejects(tmp_path / "pq")
    assert bad["row"] == 3 and bad["reason"].startswith("cannot decode image 'captions.parquet:row 3.image'")
    (same,) = _rejects(tmp_path / "jsonl")
    assert same["line"] == 3 and same["reason"].startswith("cannot decode image 'img/2.png'")


def test_parquet_units_resume_and_strict(flickr_like, tmp_path, monkeypatch):
    import data_prep.convert as convert

    out, cfg = tmp_path / "out", tiny_config()
    first = prepare([flickr_like / "pq"], out, cfg, progress=False, dataset_format="image_text")
    (out / "manifest.json").unlink()
    (out / "units" / "captions-u00001.json").unlink()  # the unit that starts inside row group 2
    handled = []
    original = convert.convert_unit

    def tracked(unit, job, builder):
        result = original(unit, job, builder)
        handled.append((unit.name, result.reused))
        return result

    monkeypatch.setattr(convert, "convert_unit", tracked)
    again = prepare([flickr_like / "pq"], out, cfg, progress=False, dataset_format="image_text")
    assert again.to_json() == first.to_json()
    assert handled == [("captions-u00000", True), ("captions-u00001", False)]
    with pytest.raises(PrepError, match="different dataset_format"):
        prepare([flickr_like / "pq"], out, cfg, progress=False, resume=True)
    with pytest.raises(PrepError, match="captions.parquet:row 3 \\(id captions-3\\): cannot decode image"):
        prepare([flickr_like / "pq"], tmp_path / "strict", cfg, progress=False, strict=True,
                dataset_format="image_text")


def test_json_arrays_json_lines_and_parquet_rows_auto_detected(tmp_path):
    """A folder of dataset files, no --format: each record's family is detected; audio bytes decode."""
    data = tmp_path / "data"
    data.mkdir()
    dolly = [json.dumps({"instruction": f"Say [{w}], {{{w}}}.", "context": "", "response": w, "category": "open_qa"})
             for w in "abcd"]
    dolly.insert(1, '{"instruction": oops}')
    (data / "dolly.json").write_text("[\n " + ",\n ".join(dolly) + "\n]\n")  # a JSON array, 2 units of 3
    (data / "chat.json").write_text(json.dumps({"id": "u1", "data": ["hi", "hello"]}) + "\n")  # JSON Lines as .json
    orca = {"id": ["o1", "o2", "o1"], "system_prompt": ["", "Be brief.", ""], "question": ["1+1?", "2+2?", "3+3?"],
            "response": ["2", "4", "6"]}
    pq.write_table(pa.table(orca), data / "orca.parquet")
    wav = io.BytesIO()
    soundfile.write(wav, sine(440, 8000, 0.25), 8000, format="WAV", subtype="PCM_16")
    librispeech = {"file": ["84-121123-0000.flac"], "audio": [{"bytes": wav.getvalue(), "path": "84-121123-0000.wav"}],
                   "text": ["GO DO YOU HEAR"], "speaker_id": [84], "chapter_id": [121123], "id": ["84-121123-0000"]}
    pq.write_table(pa.table(librispeech), data / "speech.parquet")
    (data / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    manifest = prepare([data], tmp_path / "out", tiny_config(), progress=False)
    rows = _rows(tmp_path / "out", manifest)
    assert sorted(r["id"] for r in rows["conversation"]) == ["dolly-1", "dolly-3", "dolly-4", "dolly-5", "o1", "o2",
                                                             "u1"]
    (speech,) = rows["audio_transcript"]
    assert speech["id"] == "84-121123-0000" and speech["audio_samples"] == 4000  # 0.25 s at 16 kHz
    assert [s.rsplit("/", 1)[-1] for s in manifest.sources] == ["broken.parquet", "chat.json", "dolly.json",
                                                                 "orca.parquet", "speech.parquet"]
    broken, malformed, dup = _rejects(tmp_path / "out")
    assert broken["row"] is None and broken["reason"].startswith("not a readable Parquet file")
    assert malformed["row"] == 2 and malformed["reason"].startswith("malformed JSON: Expecting value")
    assert dup["row"] == 3 and dup["reason"] == "duplicate id 'o1' (first seen at row 1)"


def test_a_folder_skips_its_metadata_json_but_reads_json_lines_and_arrays(tmp_path):
    """A pretty-printed object (synth.json, dataset_info.json) describes the data: a folder scan skips it;
    JSON Lines and arrays under .json are data. Named explicitly, a file is read whatever it holds."""
    from data_prep.sources import discover_sources

    (tmp_path / "info.json").write_text(json.dumps({"counts": {"text": 2}}, indent=2))
    (tmp_path / "lines.json").write_text('{"id": "a", "kind": "text", "text": "x"}\n')
    (tmp_path / "array.json").write_text('[\n  {"id": "b", "kind": "text", "text": "y"}\n]\n')
    assert [s.source for s in discover_sources([tmp_path], cwd=tmp_path)] == ["array", "lines"]
    assert [s.source for s in discover_sources([tmp_path / "info.json"], cwd=tmp_path)] == ["info"]
