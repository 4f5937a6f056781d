"""The Xoron tokenizer: regular tokens, then the special tokens Xoron reserves from day one.

Ids ``0 .. regular_vocab_size - 1`` are regular tokens and the special tokens follow them (the table
in ``xoron_dist.special_tokens``: as many of its tiers as the model's rows hold, see
``complete_special_tokens``), so every id must stay below ``model.llm.padded_vocab_size`` (regular
vocabulary plus ``special_token_slots``, rounded up). Two sources of regular tokens:

* a local Qwen2.5 tokenizer directory (``tokenizer.path``): its ``tokenizer.json`` as is, plus those
  of our special tokens it lacks (it already has ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|image_pad|>``, ``<|video_pad|>``, the four ``<|fim_...|>`` and ``<|file_sep|>``, which keep
  their Qwen ids);
* otherwise a byte-level BPE with ``model.llm.vocab_size`` tokens trained on ``tokenizer.train_text``
  or on the corpus shipped in ``xoron_dist/assets/`` (written by
  ``xoron_dist.data.synthetic_text.write_tokenizer_corpus``), saved with the run and reused on resume.

Training, encoding and the file format are the ``tokenizers`` library's; only the special-token
layout and the checks against the model config are ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from xoron_dist.config import ConfigError, LLMConfig, XoronConfig
from xoron_dist.special_tokens import ALL_SPECIAL_TOKENS, BASE_TOKENS, SPECIAL_TOKENS, special_token_name
from xoron_dist.utils.typed_config import field_error

TOKENIZER_CORPUS_PATH = Path(__file__).parent / "assets" / "tokenizer_corpus.txt"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "xoron_tokenizer.json"

# Qwen2's pre-tokenizer split: contractions, words, single digits (so sums tokenize digit by digit),
# punctuation runs and whitespace; each piece is then mapped to byte-level symbols.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class XoronTokenizer:
    """A ``tokenizers.Tokenizer`` that holds every token of ``SPECIAL_TOKENS`` as an added token.

    ``vocab_size`` (also ``len``) counts id slots, highest id + 1: the rows the embedding needs.
    Special tokens written in the text are encoded as their single id.
    """

    def __init__(self, backend: Tokenizer) -> None:
        added = {token.content: index for index, token in backend.get_added_tokens_decoder().items()}
        missing = [token for token in BASE_TOKENS if token not in added]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}; build it with build_tokenizer()")
        self.backend = backend
        # every special token it holds, in table order (the extended tier only when it was added)
        self.special_ids: dict[str, int] = {
            special_token_name(token): added[token] for token in ALL_SPECIAL_TOKENS if token in added}
        self.regular_vocab_size: int = backend.get_vocab_size(with_added_tokens=False)
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.upgraded = 0  # special tokens ``load`` appended to a run's saved files

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_id(self) -> int:
        return self.special_ids["endoftext"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when the vocabulary holds it as one token (``<|im_start|>``), else None."""
        return self.backend.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``xoron_tokenizer.json`` (our id layout, for readers without
        ``tokenizers``). Each file is replaced atomically, so ranks that all save the same tokenizer
        into one run directory cannot leave a torn file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {
            "regular_vocab_size": self.regular_vocab_size,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_ids,
        }
        _write_atomic(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _write_atomic(directory / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, rows: int | None = None) -> XoronTokenizer:
        """Read a directory written by ``save``. With ``rows`` (the model's padded vocabulary), special
        tokens of the table that the files lack (a run started before they were added) are appended
        as ``complete_special_tokens`` does: after every id the files hold, so the ids a run trained
        with never move; ``upgraded`` counts them."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        backend = Tokenizer.from_file(str(path))
        added = complete_special_tokens(backend, rows) if rows is not None else 0
        tokenizer = cls(backend)
        tokenizer.upgraded = added
        metadata_path = directory / METADATA_FILE
        if metadata_path.is_file():
            recorded = json.loads(metadata_path.read_text(encoding="utf-8"))["special_tokens"]
            now = {name: tokenizer.special_ids.get(name) for name in recorded}
            if recorded != now:
                raise ValueError(
                    f"{path} gives the special tokens the ids {now}, but "
                    f"{metadata_path} records {recorded}: the files do not belong together"
                )
        return tokenizer

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _add_special_tokens(backend: Tokenizer, tokens: Iterable[str]) -> None:
    # normalized=False: matched on the raw text, before NFC and the byte-level mapping.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])


def complete_special_tokens(backend: Tokenizer, rows: int) -> int:
    """Append to ``backend`` the special tokens it lacks, in table order, from the largest tier whose
    ids all stay below ``rows`` (the model's padded vocabulary): every table token (411) if they fit,
    else base + seed (249, the 256 slots of the default), else the 16 base tokens (always; a model
    too small even for them is ``check_fits_model``'s error). Returns how many were appended."""
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    top = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    for tier in (ALL_SPECIAL_TOKENS, SPECIAL_TOKENS, BASE_TOKENS):
        missing = [token for token in tier if token not in present]
        if top + len(missing) <= rows:
            break
    _add_special_tokens(backend, missing)
    return len(missing)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, rows: int | None = None) -> XoronTokenizer:
    """Train a byte-level BPE with (up to) ``vocab_size`` regular tokens, then append the special tokens
    (``complete_special_tokens`` for a model of ``rows`` embedding rows; ``SPECIAL_TOKENS`` without).

    The 256 byte symbols are always in the vocabulary, so any text encodes. The result depends only
    on the text: the trainer counts words, breaks ties between equally frequent pairs by pair id,
    and numbers tokens in merge order.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added afterwards, so they take the ids after the regular tokens
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if rows is None:
        _add_special_tokens(backend, SPECIAL_TOKENS)
    else:
        complete_special_tokens(backend, rows)
    return XoronTokenizer(backend)


def load_pretrained_tokenizer(directory: str | Path, rows: int | None = None) -> XoronTokenizer:
    """A local HF tokenizer directory (Qwen2.5) plus whichever of our special tokens it lacks, appended
    in table order. Tokens Qwen2.5 already has keep its ids (``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|fim_prefix|>`` ... ``<|fim_pad|>``,
    ``<|file_sep|>``).

    Only ``tokenizer.json`` is read: it already lists the added tokens that ``tokenizer_config.json``
    repeats. Nothing is fetched from the network.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise field_error(
            "tokenizer.path",
            str(directory),
            "no such directory; give a local tokenizer directory (e.g. of a Qwen2.5 checkpoint)",
        )
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise field_error(
            "tokenizer.path",
            str(directory),
            f"the directory has no {TOKENIZER_FILE}; a Qwen2.5 checkpoint ships one next to tokenizer_config.json",
        )
    backend = Tokenizer.from_file(str(path))
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    if rows is None:
        _add_special_tokens(backend, [token for token in SPECIAL_TOKENS if token not in present])
    else:
        complete_special_tokens(backend, rows)
    return XoronTokenizer(backend)


def check_fits_model(tokenizer: XoronTokenizer, llm: LLMConfig) -> None:
    """Raise ``ConfigError`` unless every token id has a row in the model's embedding and LM head."""
    padded = llm.padded_vocab_size
    if tokenizer.vocab_size > padded:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids ({tokenizer.regular_vocab_size} regular tokens, then "
            f"special tokens up to id {tokenizer.vocab_size - 1}), but the model's padded vocabulary "
            f"(model.llm.padded_vocab_size) has only {padded} rows: vocab_size {llm.vocab_size} + "
            f"special_token_slots {llm.special_token_slots}, rounded up to a multiple of {llm.pad_vocab_multiple}. "
            f"Raise model.llm.vocab_size or model.llm.special_token_slots so that their sum is at least "
            f"{tokenizer.vocab_size}"
        )


def build_tokenizer(cfg: XoronConfig, save_dir: str | Path | None = None) -> XoronTokenizer:
    """The run's tokenizer: ``tokenizer.path`` if set, else the BPE saved in ``save_dir`` (resume),
    else a BPE trained now (and saved to ``save_dir`` when given). Checked against the model's vocabulary.
    """
    llm = cfg.model.llm
    rows = llm.padded_vocab_size
    save_dir = Path(save_dir) if save_dir is not None else None
    resuming = cfg.tokenizer.path is None and save_dir is not None and (save_dir / TOKENIZER_FILE).is_file()
    if cfg.tokenizer.path is not None:
        tokenizer = load_pretrained_tokenizer(cfg.tokenizer.path, rows)
    elif resuming:
        tokenizer = XoronTokenizer.load(save_dir, rows)
        if tokenizer.regular_vocab_size != llm.vocab_size:
            raise ConfigError(
                f"{save_dir / TOKENIZER_FILE} (the tokenizer this run was started with) has "
                f"{tokenizer.regular_vocab_size} regular tokens but model.llm.vocab_size = {llm.vocab_size}; "
                "resume with the run's original vocab_size, or start the run in a new output directory"
            )
    else:
        tokenizer = _train_from_config(cfg)
    check_fits_model(tokenizer, llm)
    if save_dir is not None and (not resuming or tokenizer.upgraded):
        tokenizer.save(save_dir)
    return tokenizer


def _train_from_config(cfg: XoronConfig) -> XoronTokenizer:
    vocab_size = cfg.model.llm.vocab_size
    if cfg.tokenizer.train_text is not None:
        path = Path(cfg.tokenizer.train_text).expanduser()
        if not path.is_file():
            raise field_error("tokenizer.train_text", cfg.tokenizer.train_text, "no such file; give a UTF-8 text file")
        source = f"tokenizer.train_text ({path})"
    else:
        path = TOKENIZER_CORPUS_PATH
        source = f"the shipped corpus ({path})"
    with path.open(encoding="utf-8") as lines:
        tokenizer = train_byte_level_bpe(lines, vocab_size, cfg.model.llm.padded_vocab_size)
    if tokenizer.regular_vocab_size < vocab_size:
        # Special ids would then start below vocab_size, where the model expects regular tokens.
        raise ConfigError(
            f"a byte-level BPE trained on {source} reaches only {tokenizer.regular_vocab_size} regular tokens, "
            f"fewer than model.llm.vocab_size = {vocab_size}. Lower model.llm.vocab_size, give a larger text in "
            "tokenizer.train_text, or use a pretrained tokenizer directory (tokenizer.path)"
        )
    return tokenizer


__all__ = [
    "ALL_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "TOKENIZER_CORPUS_PATH",
    "XoronTokenizer",
    "build_tokenizer",
    "check_fits_model",
    "complete_special_tokens",
    "load_pretrained_tokenizer",
    "special_token_name",
    "train_byte_level_bpe",
]
