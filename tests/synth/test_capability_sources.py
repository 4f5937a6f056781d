"""The document, sysadmin and Jupyter capability sources: every sample parses and its facts check out (the
checks fail on a broken sample), no near duplicates, same seed -> same bytes, and through xoron prep the
loss covers exactly the assistant turns."""

import argparse
import json
import re

import pyarrow as pa
import pytest

from data_prep import prepare
from tests.data_prep.inputs import tiny_config
from xoron_dist.config import ConfigError, SynthConfig
from xoron_dist.data.chat import conversation_from_json, parse, render, target_mask
from xoron_dist.synth import cli, synthesize
from xoron_dist.synth.capability import STRUCTURE_CHECKS, capability_samples, jaccard, quality_problem, shingles
from xoron_dist.synth.documents import check_document, parse_fields, snake, typed
from xoron_dist.synth.notebooks import check_jupyter, parse_session, run_cells
from xoron_dist.synth.sysadmin import check_sysadmin
from xoron_dist.tokenizer import XoronTokenizer

THRESHOLD = 0.9
SOURCES = {"document": 150, "sysadmin": 90, "jupyter": 90}


@pytest.fixture(scope="module")
def samples():
    return {source: capability_samples(0, source, count, THRESHOLD) for source, count in SOURCES.items()}


def _by_category(samples, prefix):
    return {s["category"]: s for s in samples if s["category"].startswith(prefix)}


def test_every_sample_parses_and_passes_its_check(samples):
    categories = {s["category"].split(":")[1] for group in samples.values() for s in group}
    assert categories >= {"qa", "missing", "summary", "extract", "table", "compare",  # documents
                          "nginx", "docker", "disk", "cron", "systemd", "logs", "packages",  # sysadmin
                          "stats", "word_counts", "primes", "inventory", "names", "error_then_fix", "grades",
                          "running_total"}  # jupyter
    for source, group in samples.items():
        assert len(group) == SOURCES[source]
        for sample in group:
            assert sample["category"].startswith(source + ":")
            conversation = conversation_from_json(sample)
            assert parse(render(conversation)) == conversation
            assert quality_problem(sample) is None
            assert STRUCTURE_CHECKS[source](sample) is None


def test_document_answers_come_from_the_document(samples):
    extracted = 0
    for sample in samples["document"]:
        user, answer = sample["turns"][0]["content"], sample["turns"][1]["content"]
        body = re.search(r"<\|doc\|>\n(.*?)\n<\|/doc\|>", user, re.S).group(1)
        if sample["category"].startswith("document:extract"):  # JSON whose values are the document's fields
            fields = {snake(label): typed(value) for label, value in parse_fields(body).items()}
            got = json.loads(answer)
            assert got and all(fields[key] == value for key, value in got.items())
            extracted += 1
        if sample["category"].startswith("document:qa"):
            quote = re.search(r"<\|quote\|>(.+)<\|/quote\|>", answer).group(1)
            assert quote in body.splitlines()
    assert extracted >= 10


def test_jupyter_outputs_are_what_the_code_prints(samples):
    errors = 0
    for sample in samples["jupyter"]:
        cells, shown, answer = parse_session(sample["turns"][1]["content"])
        code = [source for kind, source in cells if kind == "code"]
        assert run_cells(code) == shown and len(code) >= 3 and answer.strip()
        errors += sum(result.error is not None for result in shown)
    assert errors >= 5  # error cells (<|jupyter_error|>) followed by a fix
    results = run_cells(["x = 2\nprint('a', x)\nx * 21", "y = [x] * 2", "y", "print(z)", "open('f')",
                         "__import__('os')"])
    assert [r.output for r in results[:3]] == ["a 2\n42", "", "[2, 2]"]
    assert results[3].error == "NameError: name 'z' is not defined"
    assert results[4].error.startswith("NameError") and results[5].error.startswith("NameError")  # no open/import


def test_the_checks_catch_wrong_samples(samples):
    docs, admin, notebooks = (_by_category(samples[s], s) for s in ("document", "sysadmin", "jupyter"))

    def edited(sample, old, new, turn=-1):
        out = json.loads(json.dumps(sample))
        assert old in out["turns"][turn]["content"]
        out["turns"][turn]["content"] = out["turns"][turn]["content"].replace(old, new, 1)
        return out

    stats = next(s for c, s in notebooks.items() if c == "jupyter:stats")
    out = re.search(r"<\|jupyter_output\|>(.*?)<\|/jupyter_output\|>", stats["turns"][1]["content"]).group(1)
    assert "shows" in check_jupyter(edited(stats, f">{out}<", f">{out}0<"))
    answer = stats["turns"][1]["content"].rsplit("\n", 1)[1]
    assert "answer does not give" in check_jupyter(edited(stats, "\n" + answer, "\nThe average is high."))
    extract = next(s for c, s in docs.items() if c.startswith("document:extract"))
    key, value = next(iter(json.loads(extract["turns"][1]["content"]).items()))
    assert "not in the document" in check_document(edited(extract, json.dumps(key) + ": " + json.dumps(value),
                                                          json.dumps(key) + ': "something else"'))
    compare = next(s for c, s in docs.items() if c.startswith("document:compare"))
    winner, loser = re.fullmatch(r"(\S+) has .* in (\S+)\.", compare["turns"][1]["content"]).groups()
    swapped = edited(compare, winner, "@")
    swapped["turns"][1]["content"] = swapped["turns"][1]["content"].replace(loser, winner).replace("@", loser)
    assert "expected" in check_document(swapped)
    nginx = admin["sysadmin:nginx"]
    line = re.search(r"sites-enabled/\w+:(\d+)", nginx["turns"][1]["content"]).group(1)
    assert "does not start with" in check_sysadmin(edited(nginx, f":{line}\n", f":{int(line) % 9 + 1}\n"))
    cron = admin["sysadmin:cron"]
    written = re.search(r"`crontab -e`:\n<\|code\|>(\S+) ", cron["turns"][1]["content"]).group(1)
    assert check_sysadmin(edited(cron, f"<|code|>{written} ", "<|code|>7,8 ")) is not None
    assert quality_problem({"turns": [{"role": "user", "content": "x"}, {"role": "assistant", "content":
                            "<|jupyter|><|jupyter_code|>1<|/jupyter|><|/jupyter_code|>"}]}) is not None


def test_no_near_duplicates_and_same_seed_same_samples(samples):
    for group in samples.values():
        grams = [shingles(render(conversation_from_json(s))) for s in group]
        assert max(jaccard(a, b) for i, a in enumerate(grams) for b in grams[:i]) <= THRESHOLD
    assert capability_samples(0, "jupyter", 30, THRESHOLD) == samples["jupyter"][:30]  # a larger count extends
    assert capability_samples(1, "document", 30, THRESHOLD) != samples["document"][:30]


def test_synth_writes_the_sources_and_prep_trains_only_the_assistant(tmp_path):
    cfg = SynthConfig(seed=5, text=0, image_caption=0, video_caption=0, audio_transcript=0, text_to_image=0,
                      text_to_video=0, text_to_speech=0, conversation=2, document=4, sysadmin=3, jupyter=3)
    written = synthesize(cfg, tmp_path / "a", progress=False)
    synthesize(cfg, tmp_path / "b", progress=False)
    assert [p.name for p in written] == ["conversation.jsonl", "document.jsonl", "sysadmin.jsonl", "jupyter.jsonl"]
    for path in written:
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a" / "jupyter.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["jupyter-000001", "jupyter-000002", "jupyter-000003"]
    assert {r["kind"] for r in records} == {"conversation"}
    info = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert info["counts"] == {"conversation": 12}
    assert info["jsonl_counts"] == {"conversation": 2, "document": 4, "sysadmin": 3, "jupyter": 3}

    run = tiny_config(max_text_tokens=8192)
    run.model.llm.special_token_slots = 256  # the seed tier: the document, exec and Jupyter tokens are single ids
    manifest = prepare([tmp_path / "a"], tmp_path / "prepared", run, progress=False)
    assert {name: info.rows for name, info in manifest.datasets.items()} == {"conversation": 12}
    tokenizer = XoronTokenizer.load(tmp_path / "prepared" / "tokenizer")
    for token in ("<|doc|>", "<|filename|>", "<|quote|>", "<|exec_error|>", "<|jupyter_code|>", "<|empty_output|>"):
        assert tokenizer.encode(token) == [tokenizer.special_ids[token[2:-2]]]
    raw = {r["id"]: r for p in written[1:] for r in map(json.loads, p.read_text().splitlines())}
    for shard in manifest.datasets["conversation"].shards:
        with pa.memory_map(str(tmp_path / "prepared" / shard.path)) as f:
            rows = pa.ipc.open_file(f).read_all().to_pylist()
        for row in rows:
            if row["id"] not in raw:
                continue
            mask = target_mask(len(row["text_tokens"]), row["target_runs"])
            target = tokenizer.decode([t for t, m in zip(row["text_tokens"], mask, strict=True) if m])
            assistant = "".join(t["content"] + "<|im_end|>" for t in raw.pop(row["id"])["turns"]
                                if t["role"] == "assistant")
            assert target == assistant
    assert not raw  # every document / sysadmin / jupyter sample was checked


def test_counts_from_the_command_line_and_bad_counts():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.synth_config_from_args(parser.parse_args(["--out", "x", "--document", "3", "--jupyter", "2",
                                                        "sysadmin=4"]))
    assert (cfg.document, cfg.sysadmin, cfg.jupyter) == (3, 4, 2)
    with pytest.raises(ConfigError, match="data.synth.jupyter"):
        cli.synth_config_from_args(parser.parse_args(["--out", "x", "--jupyter", "-1"]))
    with pytest.raises(ValueError, match="unknown capability source 'notes'; known: conversation, tool_use, document"):
        capability_samples(0, "notes", 1, THRESHOLD)
