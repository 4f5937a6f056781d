"""Deterministic English-like text for the CPU smoke run, and the text the tokenizer is trained on.

Documents are short instruction/caption texts with structure a tiny model can learn in a few dozen
steps: captions of procedural scenes ("A red circle is left of two blue squares.") followed by
questions the scene answers, arithmetic, counting, sorting and lists, small fact tables, word
problems and comparisons. Every answer is computed, so it is always right. Each document is drawn
from ``random.Random`` seeded by ``(seed, index)`` only: the same seed gives the same text in every
process and Python run (no global RNG, no ``hash()``, no iteration over sets).

The shipped tokenizer corpus ``xoron_dist/assets/tokenizer_corpus.txt`` is exactly what
``write_tokenizer_corpus()`` writes: the project notes below, then
``generate_documents(CORPUS_DOCUMENTS, CORPUS_SEED)``. After changing anything here, regenerate it:

    python -c "from xoron_dist.data.synthetic_text import write_tokenizer_corpus; write_tokenizer_corpus()"

(``tests/data/test_synthetic_text.py`` fails until the shipped file matches.)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from xoron_dist.tokenizer import TOKENIZER_CORPUS_PATH, XoronTokenizer

CORPUS_SEED = 20_250_101
CORPUS_DOCUMENTS = 1200

# Word tables, packed for reading.
# fmt: off
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "gray", "pink", "brown")
SHAPES = (
    ("circle", "circles"), ("square", "squares"), ("triangle", "triangles"), ("star", "stars"),
    ("cube", "cubes"), ("ring", "rings"), ("diamond", "diamonds"), ("hexagon", "hexagons"),
    ("cross", "crosses"), ("heart", "hearts"),
)
NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Yuki", "Ravi", "Ana", "Tom", "Ines")
ITEMS = ("apples", "pencils", "books", "marbles", "cookies", "stickers", "coins", "cards", "shells", "eggs")
WORDS = (
    "apple", "banana", "kiwi", "grape", "lemon", "mango", "pear", "plum", "fig", "melon",
    "cat", "dog", "owl", "fox", "bear", "horse", "mouse", "tiger", "zebra", "eagle",
    "hammer", "spoon", "chair", "lamp", "window", "garden", "river", "cloud", "stone", "bread",
)
GROCERIES = ("milk", "eggs", "bread", "rice", "butter", "cheese", "apples", "tea", "soap", "beans", "flour", "salt")
# (animal, legs, sound, where it lives)
ANIMALS = (
    ("cow", 4, "moo", "on a farm"), ("dog", 4, "woof", "in a house"), ("cat", 4, "meow", "in a house"),
    ("duck", 2, "quack", "on a pond"), ("sheep", 4, "baa", "on a farm"), ("owl", 2, "hoot", "in the forest"),
    ("frog", 4, "ribbit", "near a pond"), ("bee", 6, "buzz", "in a hive"), ("lion", 4, "roar", "on the savanna"),
    ("horse", 4, "neigh", "on a farm"), ("spider", 8, "nothing", "in a web"), ("snake", 0, "hiss", "in the grass"),
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"), ("open", "closed"),
    ("full", "empty"), ("early", "late"), ("happy", "sad"), ("wet", "dry"), ("loud", "quiet"), ("old", "new"),
    ("left", "right"), ("high", "low"), ("hard", "soft"),
)
THING_COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a tomato", "red"), ("a carrot", "orange"), ("a plum", "purple"), ("chocolate", "brown"), ("milk", "white"),
    ("a lemon", "yellow"), ("a leaf", "green"),
)
# fmt: on
# How a question and its answer are introduced; one frame per document.
FRAMES = (("Q: ", "A: "), ("Question: ", "Answer: "), ("User: ", "Assistant: "))


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _qa(frame: tuple[str, str], question: str, answer: str) -> str:
    return f"{frame[0]}{question}\n{frame[1]}{answer}"


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _ShapeGroup:
    """``count`` shapes of one color and kind, standing in one cell of a 3x3 grid."""

    color: str
    shape: str
    plural: str
    count: int
    column: int
    row: int

    @property
    def name(self) -> str:  # "red circle" / "blue squares"
        return f"{self.color} {self.shape if self.count == 1 else self.plural}"

    @property
    def phrase(self) -> str:  # "a red circle" / "an orange cube" / "two blue squares"
        if self.count == 1:
            return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.name}"
        return f"{_number(self.count)} {self.name}"

    @property
    def verb(self) -> str:
        return "is" if self.count == 1 else "are"


def _relation(a: _ShapeGroup, b: _ShapeGroup) -> str:
    """Where ``a`` stands relative to ``b`` (cells are distinct, so one of these holds)."""
    if a.column != b.column:
        return "left of" if a.column < b.column else "right of"
    return "above" if a.row < b.row else "below"


def _scene_document(rng: random.Random) -> str:
    cells = [(column, row) for column in range(3) for row in range(3)]
    rng.shuffle(cells)
    shapes = list(SHAPES)
    rng.shuffle(shapes)  # distinct kinds, so "the circle" names one group
    num_groups = rng.randint(2, 3)
    groups = [
        _ShapeGroup(rng.choice(COLORS), shape, plural, rng.randint(1, 4), column, row)
        for (shape, plural), (column, row) in zip(shapes[:num_groups], cells[:num_groups], strict=True)
    ]
    a, b = groups[0], groups[1]
    sentences = [f"{_capitalize(a.phrase)} {a.verb} {_relation(a, b)} {b.phrase}."]
    if len(groups) == 3:
        c = groups[2]
        sentences.append(f"{_capitalize(c.phrase)} {c.verb} {_relation(c, a)} the {a.name}.")
    caption = " ".join(sentences)
    header = rng.choice(("Caption: {}", "Describe the scene.\n{}", "Scene: {}", "Image description: {}"))

    frame = rng.choice(FRAMES)
    questions = []
    for kind in rng.sample(("count", "color", "where", "total", "exists"), rng.randint(1, 3)):
        g, other = rng.sample(groups, 2)
        if kind == "count":
            answer = _capitalize(_number(g.count))
            questions.append(_qa(frame, f"How many {g.color} {g.plural} are there?", f"{answer}."))
        elif kind == "color":
            noun = f"is the {g.shape}" if g.count == 1 else f"are the {g.plural}"
            questions.append(_qa(frame, f"What color {noun}?", f"{_capitalize(g.color)}."))
        elif kind == "where":
            questions.append(
                _qa(
                    frame,
                    f"Where {g.verb} the {g.name} relative to the {other.name}?",
                    f"{_capitalize(_relation(g, other))} the {other.name}.",
                )
            )
        elif kind == "total":
            total = sum(group.count for group in groups)
            questions.append(_qa(frame, "How many shapes are there in total?", f"{_capitalize(_number(total))}."))
        else:
            if rng.random() < 0.5:
                color, shape, present = g.color, g.shape, True
            else:
                shape = rng.choice(SHAPES)[0]
                color = rng.choice(COLORS)
                present = any(group.color == color and group.shape == shape for group in groups)
            article = "an" if color[0] in "aeiou" else "a"
            questions.append(_qa(frame, f"Is there {article} {color} {shape}?", "Yes." if present else "No."))
    return "\n".join([header.format(caption), *questions])


# --------------------------------------------------------------------------- numbers


def _arithmetic_line(rng: random.Random, style: str, frame: tuple[str, str]) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        result, word = a * b, "times"
    elif op == "+":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        result, word = a + b, "plus"
    else:
        a = rng.randint(0, 50)
        b = rng.randint(0, a)
        result, word = a - b, "minus"
    if style == "symbols":
        return f"{a} {op} {b} = {result}"
    if style == "words":
        return f"{a} {word} {b} is {result}."
    return _qa(frame, f"What is {a} {word} {b}?", f"{result}")


def _arithmetic_document(rng: random.Random) -> str:
    style = rng.choice(("symbols", "words", "qa"))
    frame = rng.choice(FRAMES)
    header = rng.choice(("Arithmetic practice.", "Solve each one.", "Math facts:", "Some sums and products."))
    return "\n".join([header, *(_arithmetic_line(rng, style, frame) for _ in range(rng.randint(3, 6)))])


def _counting_document(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(("up", "down", "by", "letters", "items"))
        if kind == "up":
            start = rng.randint(0, 30)
            numbers = range(start, start + rng.randint(3, 10))
            parts.append(f"Count from {start} to {numbers[-1]}: {', '.join(map(str, numbers))}.")
        elif kind == "down":
            start = rng.randint(5, 40)
            numbers = range(start, max(start - rng.randint(3, 10), -1), -1)
            parts.append(f"Count down from {start} to {numbers[-1]}: {', '.join(map(str, numbers))}.")
        elif kind == "by":
            step = rng.choice((2, 3, 5, 10))
            start = step * rng.randint(0, 5)
            numbers = range(start, start + step * rng.randint(4, 8), step)
            parts.append(f"Count by {_number(step)}s from {start}: {', '.join(map(str, numbers))}.")
        elif kind == "letters":
            word = rng.choice(WORDS)
            parts.append(f'The word "{word}" has {_number(len(word))} letters: {", ".join(word)}.')
        else:
            fruit, other = rng.sample(WORDS[:10], 2)
            basket = [fruit] * rng.randint(1, 6) + [other] * rng.randint(1, 6)
            rng.shuffle(basket)
            parts.append(
                f"In the basket: {', '.join(basket)}. How many {fruit}s? {_capitalize(_number(basket.count(fruit)))}."
            )
    return "\n".join(parts)


def _comparison_document(rng: random.Random) -> str:
    frame = rng.choice(FRAMES)
    lines = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("larger", "smaller", "parity", "after", "before", "alphabet"))
        if kind in ("larger", "smaller"):
            a, b = rng.sample(range(100), 2)
            answer = max(a, b) if kind == "larger" else min(a, b)
            lines.append(_qa(frame, f"Which is {kind}, {a} or {b}?", f"{answer}."))
        elif kind == "parity":
            n = rng.randint(0, 99)
            lines.append(_qa(frame, f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
        elif kind == "after":
            n = rng.randint(0, 98)
            lines.append(_qa(frame, f"What number comes after {n}?", f"{n + 1}."))
        elif kind == "before":
            n = rng.randint(1, 99)
            lines.append(_qa(frame, f"What number comes before {n}?", f"{n - 1}."))
        else:
            a, b = rng.sample(WORDS, 2)
            lines.append(_qa(frame, f"Which word comes first in the alphabet, {a} or {b}?", f"{min(a, b)}."))
    return "\n".join(lines)


def _word_problem_document(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(("more", "gives", "bags"))
    if kind == "more":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        problem = f"{name} has {a} {item}. {friend} gives {name} {b} more. How many {item} does {name} have now?"
        answer = f"{a} + {b} = {a + b}, so {name} has {a + b} {item}."
    elif kind == "gives":
        a = rng.randint(2, 30)
        b = rng.randint(1, a)
        problem = f"{name} has {a} {item} and gives {b} to {friend}. How many {item} are left?"
        answer = f"{a} - {b} = {a - b}, so {a - b} {item} are left."
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        problem = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that?"
        answer = f"{a} * {b} = {a * b}, so that is {a * b} {item}."
    return _qa(rng.choice(FRAMES), problem, answer)


# --------------------------------------------------------------------------- lists and facts


def _list_document(rng: random.Random) -> str:
    kind = rng.choice(("shopping", "sort_words", "sort_numbers", "reverse", "ends"))
    if kind == "shopping":
        items = rng.sample(GROCERIES, rng.randint(2, 6))
        lines = [f"{i}. {item}" for i, item in enumerate(items, start=1)]
        return "\n".join(["Shopping list:", *lines, f"That is {_number(len(items))} items."])
    if kind == "sort_words":
        words = rng.sample(WORDS, rng.randint(3, 6))
        return f"Sort these words alphabetically: {', '.join(words)}.\nSorted: {', '.join(sorted(words))}."
    if kind == "sort_numbers":
        numbers = rng.sample(range(100), rng.randint(3, 7))
        return (
            f"Sort from smallest to largest: {', '.join(map(str, numbers))}.\n"
            f"Answer: {', '.join(map(str, sorted(numbers)))}."
        )
    words = rng.sample(WORDS, rng.randint(3, 6))
    if kind == "reverse":
        return f"Reverse the list: {', '.join(words)}.\nReversed: {', '.join(reversed(words))}."
    return (
        f"In the list {', '.join(words)}, the first item is {words[0]} "
        f"and the last item is {words[-1]}. The list has {_number(len(words))} items."
    )


def _facts_document(rng: random.Random) -> str:
    frame = rng.choice(FRAMES)
    table = rng.choice(("animals", "opposites", "colors"))
    lines = []
    for _ in range(rng.randint(2, 4)):
        if table == "animals":
            animal, legs, sound, home = rng.choice(ANIMALS)
            kind = rng.choice(("legs", "sound", "home"))
            if kind == "legs":
                lines.append(
                    _qa(frame, f"How many legs does a {animal} have?", f"A {animal} has {_number(legs)} legs.")
                )
            elif kind == "sound":
                lines.append(_qa(frame, f"What sound does a {animal} make?", f"A {animal} says {sound}."))
            else:
                lines.append(_qa(frame, f"Where does a {animal} live?", f"{_capitalize(home)}."))
        elif table == "opposites":
            word, opposite = rng.choice(OPPOSITES)
            if rng.random() < 0.5:
                word, opposite = opposite, word
            lines.append(_qa(frame, f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
        else:
            thing, color = rng.choice(THING_COLORS)
            lines.append(_qa(frame, f"What color is {thing}?", f"{_capitalize(thing)} is {color}."))
    return "\n".join(lines)


# Kinds of document and how often each is drawn; scenes (the captioning task) weigh most.
_DOCUMENT_KINDS: tuple[tuple[Callable[[random.Random], str], int], ...] = (
    (_scene_document, 3),
    (_arithmetic_document, 2),
    (_counting_document, 1),
    (_comparison_document, 1),
    (_word_problem_document, 1),
    (_list_document, 1),
    (_facts_document, 1),
)


def generate_documents(num_documents: int, seed: int) -> list[str]:
    """``num_documents`` short texts; document ``i`` depends only on ``(seed, i)``.

    Seeding each document on its own makes a longer list extend a shorter one with the same seed.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    kinds = [kind for kind, _ in _DOCUMENT_KINDS]
    weights = [weight for _, weight in _DOCUMENT_KINDS]
    documents = []
    for index in range(num_documents):
        rng = random.Random(f"xoron-synthetic-text/{seed}/{index}")  # str seeds hash with SHA-512: stable
        documents.append(rng.choices(kinds, weights)[0](rng))
    return documents


# --------------------------------------------------------------------------- dataset


class SyntheticTextDataset:
    """Fixed-length training samples cut from ``generate_documents(num_documents, seed)``.

    Token stream: each document encoded, followed by ``tokenizer.eos_id``: ``doc0 EOS doc1 EOS ...``.
    Sample ``i`` (``0 <= i < num_samples``, ``num_samples = (len(tokens) - 1) // seq_len``) is
    ``tokens[i * seq_len : i * seq_len + seq_len + 1]``; the model input is ``sample[:-1]`` and the
    labels ``sample[1:]`` (next token). Consecutive samples share one boundary token.

    Batch contract of ``batch(step, micro_step, dp_rank, dp_size, micro_batch_size, grad_accum_steps=A)``:

    * The step's global micro batch has ``B = dp_size * micro_batch_size`` rows; row ``j`` sits at
      global position ``g = (step * A + micro_step) * B + j`` and rank ``r`` gets rows
      ``[r * micro_batch_size, (r + 1) * micro_batch_size)``.
    * Position ``g`` reads sample ``perm(epoch)[g % num_samples]`` with ``epoch = g // num_samples``
      and ``perm(epoch)`` a permutation of all samples seeded by ``(seed, epoch)``: every epoch visits
      every sample once, in a new order, and the stream wraps around forever.

    So a batch is a pure function of its arguments: a run resumed at step ``k`` gets exactly the
    batches an uninterrupted run would; the ``dp_size`` shards of a step concatenate to the batch of
    one rank with ``micro_batch_size * dp_size`` rows; and only the global batch size ``B`` and ``A``
    fix the data order, so a resume with another ``dp_size`` but the same ``B`` sees the same data.
    """

    def __init__(self, tokenizer: XoronTokenizer, num_documents: int, seed: int, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seed = seed
        self.seq_len = seq_len
        self.documents = generate_documents(num_documents, seed)
        stream: list[int] = []
        for ids in tokenizer.encode_batch(self.documents):
            stream.extend(ids)
            stream.append(tokenizer.eos_id)
        self.tokens = torch.tensor(stream, dtype=torch.long)  # (total_tokens,)
        self.num_samples = (len(stream) - 1) // seq_len
        if self.num_samples == 0:
            raise ValueError(
                f"{num_documents} documents give {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "generate more documents (data.num_documents) or shorten the sequence (train.seq_len)"
            )
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def batch(
        self,
        step: int,
        micro_step: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum_steps: int = 1,
    ) -> torch.Tensor:
        """This rank's rows of micro step ``micro_step`` of optimizer step ``step``: (micro_batch_size, seq_len + 1).

        ``grad_accum_steps`` must be the run's value whenever it is > 1; a ``micro_step`` beyond it is
        an error rather than a silent overlap with the next step's samples.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= micro_step < grad_accum_steps:
            raise ValueError(
                f"micro_step {micro_step} is outside [0, grad_accum_steps = {grad_accum_steps}); "
                "pass the run's grad_accum_steps"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size = {dp_size})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        first = (step * grad_accum_steps + micro_step) * dp_size * micro_batch_size + dp_rank * micro_batch_size
        samples = torch.stack([self._sample_at(g) for g in range(first, first + micro_batch_size)])
        index = samples[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # (micro_batch_size, seq_len + 1)
        return self.tokens[index]

    def _sample_at(self, position: int) -> torch.Tensor:
        epoch, offset = divmod(position, self.num_samples)
        return self._permutation(epoch)[offset]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:  # a batch rarely spans more than two epochs
                self._permutations.pop(next(iter(self._permutations)))
            order = list(range(self.num_samples))
            random.Random(f"xoron-synthetic-order/{self.seed}/{epoch}").shuffle(order)
            self._permutations[epoch] = torch.tensor(order, dtype=torch.long)
        return self._permutations[epoch]


# --------------------------------------------------------------------------- tokenizer corpus

# Prose written for the tokenizer corpus, so that the BPE also sees ordinary sentences, not only
# the templates above.
PROJECT_NOTES = (
    "Xoron is a multimodal model. It reads text, images, video and audio, and it can answer in text, "
    "draw an image, make a short video or speak. At its core sits a decoder in the style of DeepSeek-V3: "
    "multi-head latent attention, a mixture of experts in every layer, RMSNorm and SwiGLU.",
    "In a mixture-of-experts layer a small router looks at each token and picks two of eight routed experts. "
    "One shared expert sees every token. The router does not need an auxiliary loss to keep the experts busy: "
    "a bias on each expert's score moves a little after every step, up when the expert was starved and down "
    "when it was crowded, and the bias only changes which experts are chosen, never how much they count.",
    "Multi-head latent attention stores a compressed latent for the keys and values instead of the full heads. "
    "The cache that a long conversation needs becomes several times smaller. A few dimensions of every head "
    "carry rotary position information, and YaRN stretches those rotations so that a model trained on short "
    "sequences can read very long ones.",
    "Training runs on many machines at once. Data parallelism gives each rank its own slice of the batch; "
    "ZeRO splits the optimizer state, the gradients and, at stage three, the weights themselves across the ranks. "
    "Tensor parallelism cuts each large matrix into columns or rows, pipeline parallelism gives each group of "
    "ranks a run of layers, and expert parallelism places different experts on different ranks, so that tokens "
    "travel to their experts and back with an all-to-all exchange.",
    "A checkpoint holds the weights, the optimizer state, the step, the state of every random generator and the "
    "position in the data. A run that stops at step one thousand and resumes must see exactly the batches it "
    "would have seen, and its loss curve must continue as if nothing had happened.",
    "The tokenizer turns text into numbers. A byte-level BPE starts from the 256 possible bytes and merges the "
    "pairs that appear most often, until the vocabulary is full. Special tokens mark the end of a document, the "
    "turns of a chat, and where an image, a video clip or a piece of audio begins and ends.",
    "Before a large run, a tiny copy of the model trains for a few dozen steps on a laptop. Its loss should fall "
    "quickly on simple captions, sums and lists. If it does not, something is wrong with the data, the labels, "
    "the learning rate or the model, and it is much cheaper to find out here than on a cluster of GPUs.",
    "Good training code is boring to read. The loop is short and visible, every setting lives in one config tree, "
    "every error names the field that is wrong and says how to fix it, and every test compares a parallel run "
    "with a single process that uses the same seed, the same weights and the same data.",
)


def tokenizer_corpus_text() -> str:
    """The text of the shipped tokenizer corpus: project notes, then the synthetic documents."""
    parts = [*PROJECT_NOTES, *generate_documents(CORPUS_DOCUMENTS, CORPUS_SEED)]
    return "\n\n".join(parts) + "\n"


def write_tokenizer_corpus(path: Path = TOKENIZER_CORPUS_PATH) -> Path:
    """(Re)write the tokenizer corpus, by default the file shipped in ``xoron_dist/assets/``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokenizer_corpus_text(), encoding="utf-8")
    return path
