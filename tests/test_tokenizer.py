import json
import subprocess
import sys

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.special_tokens import ALL_SPECIAL_TOKENS, BASE_TOKENS, EXTENDED_TOKENS, SEED_TOKENS, id_table_markdown
from xoron_dist.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_CORPUS_PATH,
    XoronTokenizer,
    build_tokenizer,
    complete_special_tokens,
    special_token_name,
)

TEXT = "Caption: a red circle left of two blue squares.\nQ: 12 + 30 = ?\nA: 42.  Ünïcödé, 中文, emoji 🙂\n\n"


@pytest.fixture
def cfg() -> XoronConfig:
    return XoronConfig.preset("tiny")


def _seed_cfg() -> XoronConfig:
    """The tiny model with the default 256 special-token slots: room for the base and seed tiers."""
    cfg = XoronConfig.preset("tiny")
    cfg.model.llm.special_token_slots = 256
    return cfg


@pytest.fixture(scope="module")
def tokenizer() -> XoronTokenizer:
    return build_tokenizer(_seed_cfg())


def test_special_tokens_are_reserved_and_the_tiers_fit_their_slots(cfg):
    assert len(ALL_SPECIAL_TOKENS) == len(set(ALL_SPECIAL_TOKENS)) == 16 + 233 + 162
    assert SPECIAL_TOKENS == BASE_TOKENS + SEED_TOKENS and ALL_SPECIAL_TOKENS == SPECIAL_TOKENS + EXTENDED_TOKENS
    assert len(BASE_TOKENS) <= cfg.model.llm.special_token_slots
    assert len(SPECIAL_TOKENS) <= XoronConfig().model.llm.special_token_slots  # the default 256
    assert len({special_token_name(t) for t in ALL_SPECIAL_TOKENS}) == len(ALL_SPECIAL_TOKENS)
    names = {special_token_name(token) for token in SPECIAL_TOKENS}
    for modality in ("image", "video", "audio"):
        assert {f"{modality}_start", f"{modality}_end", f"{modality}_pad"} <= names
    assert {"endoftext", "pad", "im_start", "im_end", "gen_image", "gen_video", "gen_speech"} <= names


def test_bpe_layout_regular_then_special(tokenizer, cfg):
    vocab = cfg.model.llm.vocab_size
    assert tokenizer.regular_vocab_size == vocab
    assert list(tokenizer.special_ids) == [special_token_name(t) for t in SPECIAL_TOKENS]
    assert list(tokenizer.special_ids.values()) == list(range(vocab, vocab + len(SPECIAL_TOKENS)))
    rows = _seed_cfg().model.llm.padded_vocab_size
    assert len(tokenizer) == tokenizer.vocab_size == vocab + len(SPECIAL_TOKENS) <= rows
    assert tokenizer.eos_id == tokenizer.special_ids["endoftext"]
    assert tokenizer.pad_id == tokenizer.special_ids["pad"]


def test_round_trip_including_special_tokens(tokenizer):
    text = f"<|im_start|>user\n{TEXT}<|image_start|><|image_pad|><|image_end|><|im_end|><|endoftext|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert tokenizer.encode_batch([TEXT, text]) == [tokenizer.encode(TEXT), tokenizer.encode(text)]


def test_special_tokens_encode_as_single_ids_after_the_regular_ones(tokenizer):
    for token in SPECIAL_TOKENS:
        (token_id,) = tokenizer.encode(token)
        assert token_id == tokenizer.special_ids[special_token_name(token)] >= tokenizer.regular_vocab_size
        assert token_id in tokenizer.encode(f"before{token}after")
    assert all(i < tokenizer.regular_vocab_size for i in tokenizer.encode(TEXT))
    assert tokenizer.decode(tokenizer.encode("a<|gen_image|>b"), skip_special_tokens=True) == "ab"


def test_bpe_training_is_deterministic_within_and_across_processes(tokenizer):
    again = build_tokenizer(_seed_cfg())
    assert again.backend.to_str() == tokenizer.backend.to_str()
    script = (
        "from xoron_dist.config import XoronConfig; from xoron_dist.tokenizer import build_tokenizer; "
        "import sys; c = XoronConfig.preset('tiny'); c.model.llm.special_token_slots = 256; "
        "sys.stdout.write(build_tokenizer(c).backend.to_str())"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert other == tokenizer.backend.to_str()


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    metadata = json.loads((tmp_path / "xoron_tokenizer.json").read_text())
    assert metadata["special_tokens"] == tokenizer.special_ids
    loaded = XoronTokenizer.load(tmp_path)
    assert loaded.backend.to_str() == tokenizer.backend.to_str()
    assert loaded.special_ids == tokenizer.special_ids
    assert loaded.encode(TEXT) == tokenizer.encode(TEXT)
    assert (loaded.vocab_size, loaded.regular_vocab_size) == (tokenizer.vocab_size, tokenizer.regular_vocab_size)


def test_load_refuses_mismatched_metadata(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    metadata = json.loads((tmp_path / "xoron_tokenizer.json").read_text())
    metadata["special_tokens"]["pad"] += 1
    (tmp_path / "xoron_tokenizer.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="do not belong together"):
        XoronTokenizer.load(tmp_path)


def test_build_saves_then_reuses_the_run_tokenizer(cfg, tmp_path, monkeypatch, tokenizer):
    first = build_tokenizer(cfg, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run must reuse its saved tokenizer")

    monkeypatch.setattr("xoron_dist.tokenizer.train_byte_level_bpe", no_training)
    assert build_tokenizer(cfg, tmp_path).backend.to_str() == first.backend.to_str()

    cfg.model.llm.vocab_size = 512
    with pytest.raises(ConfigError, match="1024 regular tokens but model.llm.vocab_size = 512"):
        build_tokenizer(cfg, tmp_path)


def test_train_text_is_used_and_too_small_a_text_is_an_error(cfg, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 50 + "\n", encoding="utf-8")
    cfg.tokenizer.train_text = str(text)
    with pytest.raises(ConfigError, match=r"tokenizer\.train_text .* reaches only \d+ regular tokens"):
        build_tokenizer(cfg)
    cfg.model.llm.vocab_size = 260
    tokenizer = build_tokenizer(cfg)
    assert tokenizer.regular_vocab_size == 260
    assert tokenizer.decode(tokenizer.encode("the mat")) == "the mat"

    cfg.tokenizer.train_text = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="tokenizer.train_text"):
        build_tokenizer(cfg)


# Qwen2.5's added tokens, in its id order (151643 ...).
QWEN25_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]


def _write_qwen_style_directory(directory, qwen_specials=None):
    """A small stand-in for a Qwen2.5 tokenizer dir: byte-level BPE with Qwen's own special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(TOKENIZER_CORPUS_PATH.read_text(encoding="utf-8").splitlines()[:200], trainer)
    qwen_specials = qwen_specials or ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                      "<|image_pad|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in qwen_specials])
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return {t: backend.token_to_id(t) for t in qwen_specials}


def test_qwen_style_directory_keeps_its_ids_and_gains_the_missing_specials(cfg, tmp_path):
    qwen_ids = _write_qwen_style_directory(tmp_path / "qwen")
    cfg.tokenizer.path = str(tmp_path / "qwen")
    tokenizer = build_tokenizer(cfg, tmp_path / "run")
    assert tokenizer.regular_vocab_size == 300
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"):
        assert tokenizer.special_ids[special_token_name(token)] == qwen_ids[token]
    added = [token for token in ALL_SPECIAL_TOKENS if token not in qwen_ids]  # 300 regular ids: every tier fits
    first_new = max(qwen_ids.values()) + 1
    assert [tokenizer.special_ids[special_token_name(t)] for t in added] == list(
        range(first_new, first_new + len(added))
    )
    assert tokenizer.vocab_size == first_new + len(added)
    text = "<|im_start|>user\nwhat is 2 + 3?<|video_start|><|video_pad|><|video_end|><|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert XoronTokenizer.load(tmp_path / "run").special_ids == tokenizer.special_ids


def test_qwen_directory_errors_name_the_field(cfg, tmp_path):
    cfg.tokenizer.path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="tokenizer.path.*no such directory"):
        build_tokenizer(cfg)
    (tmp_path / "empty").mkdir()
    cfg.tokenizer.path = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="tokenizer.path.*has no tokenizer.json"):
        build_tokenizer(cfg)


def test_too_small_padded_vocab_is_a_config_error(cfg, tmp_path):
    cfg.model.llm.special_token_slots = 0
    cfg.model.llm.pad_vocab_multiple = 1
    with pytest.raises(ConfigError) as err:
        build_tokenizer(cfg, tmp_path / "run")
    message = str(err.value)
    ids = 1024 + len(BASE_TOKENS)  # no tier beyond the base fits: the base tokens alone are the error
    assert f"has {ids} ids" in message
    assert "model.llm.padded_vocab_size) has only 1024 rows" in message
    assert "model.llm.vocab_size" in message and "model.llm.special_token_slots" in message
    assert f"at least {ids}" in message
    assert not (tmp_path / "run").exists()


def test_qwen_sized_tokenizer_does_not_fit_the_tiny_model(cfg, tmp_path):
    _write_qwen_style_directory(tmp_path / "qwen")
    cfg.tokenizer.path = str(tmp_path / "qwen")
    cfg.model.llm.vocab_size = 64
    cfg.model.llm.special_token_slots = 64
    with pytest.raises(ConfigError, match=r"only 128 rows"):
        build_tokenizer(cfg)


def test_the_tier_follows_the_model_rows_and_ids_never_move():
    ids = {}
    for slots, count in ((64, 16), (256, 249), (512, 411)):
        cfg = XoronConfig.preset("tiny")
        cfg.model.llm.special_token_slots = slots
        tokenizer = build_tokenizer(cfg)
        assert len(tokenizer.special_ids) == count
        ids[slots] = tokenizer.special_ids
    assert ids[64].items() <= ids[256].items() <= ids[512].items()  # a larger tier only appends
    assert ids[512]["/think"] == 1024 + ALL_SPECIAL_TOKENS.index("<|/think|>")


def test_a_run_saved_with_the_base_tokens_resumes_and_gains_the_seed_tier(tmp_path):
    old = build_tokenizer(XoronConfig.preset("tiny"), tmp_path)  # what a run made before the seed tier saved
    assert len(old.special_ids) == len(BASE_TOKENS)
    saved = (tmp_path / "tokenizer.json").read_text()
    assert build_tokenizer(XoronConfig.preset("tiny"), tmp_path).special_ids == old.special_ids  # same slots
    assert (tmp_path / "tokenizer.json").read_text() == saved  # resumed as it was: nothing rewritten

    resumed = build_tokenizer(_seed_cfg(), tmp_path)
    assert resumed.upgraded == len(SEED_TOKENS)
    assert {name: resumed.special_ids[name] for name in old.special_ids} == old.special_ids
    assert resumed.special_ids == build_tokenizer(_seed_cfg()).special_ids  # as a fresh run lays them out
    assert resumed.encode("two <|think|> words") == build_tokenizer(_seed_cfg()).encode("two <|think|> words")
    again = XoronTokenizer.load(tmp_path)  # the upgrade was saved with the run
    assert again.special_ids == resumed.special_ids and again.upgraded == 0


def test_qwen25_layout_keeps_qwen_ids_and_appends_the_table_in_order(tmp_path):
    qwen_ids = _write_qwen_style_directory(tmp_path / "qwen", QWEN25_SPECIALS)
    backend = Tokenizer.from_file(str(tmp_path / "qwen" / "tokenizer.json"))
    # the full preset's proportions: Qwen2.5's 151643 regular tokens -> 151936 rows (293 for specials)
    full = XoronConfig().model.llm
    complete_special_tokens(backend, 300 + full.padded_vocab_size - full.vocab_size)
    tokenizer = XoronTokenizer(backend)
    assert len(tokenizer.special_ids) == len(SPECIAL_TOKENS)  # the seed tier fits Qwen2.5 as it fits our BPE
    first_new = 300 + len(QWEN25_SPECIALS)
    appended = [t for t in SPECIAL_TOKENS if t not in qwen_ids]
    assert [tokenizer.special_ids[special_token_name(t)] for t in appended] == list(
        range(first_new, first_new + len(appended)))
    for token in set(SPECIAL_TOKENS) & set(qwen_ids):  # <|endoftext|>, <|im_start|>, the FIM tokens ...
        assert tokenizer.special_ids[special_token_name(token)] == qwen_ids[token]
    bpe = build_tokenizer(_seed_cfg())
    text = "<|im_start|>assistant\n<|think|><|step|>2 + 3 = 5<|/step|><|/think|>5<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text == bpe.decode(bpe.encode(text))
    def specials(tok: XoronTokenizer) -> list[str]:  # the special tokens of the text, by name, in order
        by_id = {i: name for name, i in tok.special_ids.items()}
        return [by_id[i] for i in tok.encode(text) if i in by_id]

    assert specials(tokenizer) == specials(bpe) == ["im_start", "think", "step", "/step", "/think", "im_end"]


def test_id_table_lists_every_special_token_in_id_order(tokenizer):
    table = id_table_markdown(tokenizer.special_ids).splitlines()
    assert len(table) == 2 + len(SPECIAL_TOKENS)
    assert table[2] == f"| {tokenizer.eos_id} | `<|endoftext|>` | base |"
    assert table[-1].endswith("| `" + SEED_TOKENS[-1] + "` | seed |")
