"""Capability samples for ``xoron synth``: the seed's chain-of-thought, anti-hallucination, agentic and
tool-use data, as ``conversation`` / ``tool_use`` samples in the chat template (``xoron_dist.data.chat``).

    generator        what the assistant writes (the seed's tokens)
    arithmetic       <|think|><|plan|>..<|/plan|><|step|>..<|/step|>*<|verify|>..<|/verify|><|/think|> answer
    word_problem     the same structure over a shopping story
    algebra          a x + b = c solved in steps, checked by substitution
    idk              <|uncertain|><|unknown|>I don't know ...<|/uncertain|> (future, private, real-time facts)
    cutoff           <|uncertain|><|knowledge_cutoff|>...<|need_verify|>...<|/uncertain|>
    fact_check       <|think|><|verify|>a myth checked<|/verify|><|/think|> the correction
    citation         a constant with <|cite|>its source<|/cite|>
    fim              user: <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>, assistant: the middle M (P+M+S = code)
    commit           user: <|commit_before|>..<|commit_after|>.., assistant: <|commit_msg|>..<|/commit_msg|>
    exec             <|exec|><|code|>..<|/code|><|/exec|> then <|exec_result|> or <|exec_error|> (the real
                     outcome of running the snippet's rule here, e.g. IndexError) and an explanation
    shell            a task, <|code|>command<|/code|><|exec_result|>its output<|/exec_result|>
    followup         two user/assistant rounds (multi-turn)
    tool_use kind    available tools; the assistant calls one, the tool answers, the assistant replies

Three more sources write ``conversation`` samples into files of their own (``SOURCES``; each has its
``data.synth`` count and its structure check, which ``quality_problem`` applies):

    document         a file in <|filename|>..<|/filename|><|doc|>..<|/doc|>: questions answered from it
                     with <|quote|>, <|summary|>, JSON extraction, <|unknown|> for what it lacks (documents.py)
    sysadmin         nginx, docker, disk, cron, systemd and log diagnostics in <|exec|>/<|exec_result|>/
                     <|exec_error|> (sysadmin.py)
    jupyter          notebook sessions in <|jupyter|> cells whose outputs come from running them (notebooks.py)

Sample ``i`` of a kind is a pure function of ``(seed, kind, i)``: candidates are drawn in order, each
from its own ``random.Random``, and kept unless a quality filter rejects it or it is a near duplicate
of a kept one (Jaccard similarity of word 3-grams above ``dedup_threshold``; exact repeats always).
So the output is byte-identical for a seed, and a larger count extends a smaller one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from xoron_dist.data.chat import ChatFormatError, conversation_from_json, render
from xoron_dist.synth import documents, notebooks, sysadmin

Sample = dict  # {"turns": [...], "tools"?: [...], "category": str}

NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")
ITEMS = (("apples", "apple"), ("pencils", "pencil"), ("tickets", "ticket"), ("books", "book"), ("cups", "cup"))
SYSTEMS = ("You are Xoron, a careful assistant.", "You are a helpful assistant. Think before you answer.", "")


def _turns(user: str, assistant: str, system: str = "") -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _reasoning(plan: list[str], steps: list[str], check: str, answer: str) -> str:
    plan_text = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(plan))
    step_text = "".join(f"<|step|>{s}<|/step|>\n" for s in steps)
    return (f"<|think|>\n<|plan|>\n{plan_text}\n<|/plan|>\n{step_text}<|verify|>{check}<|/verify|>\n<|/think|>\n"
            f"{answer}")


def arithmetic(rng: random.Random) -> Sample:
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 60)
    op = rng.choice(("+", "-", "*"))
    first = {"+": a + b, "-": a - b, "*": a * b}[op]
    total = first + c
    text = _reasoning([f"Compute {a} {op} {b}", f"Add {c}"],
                      [f"{a} {op} {b} = {first}", f"{first} + {c} = {total}"],
                      f"{total} - {c} = {first} and {first} is {a} {op} {b}", f"The answer is {total}.")
    return {"turns": _turns(f"Calculate: {a} {op} {b} + {c}", text, rng.choice(SYSTEMS)), "category": "arithmetic"}


def word_problem(rng: random.Random) -> Sample:
    name, (items, _) = rng.choice(NAMES), rng.choice(ITEMS)
    quantity, price, paid = rng.randint(2, 12), rng.randint(1, 9), 0
    cost = quantity * price
    paid = cost + rng.randint(1, 20)
    text = _reasoning([f"Find the cost of the {items}", "Subtract it from what was paid"],
                      [f"{quantity} x {price} = {cost} coins", f"{paid} - {cost} = {paid - cost} coins"],
                      f"{cost} + {paid - cost} = {paid}", f"{name} gets {paid - cost} coins back.")
    question = (f"{name} buys {quantity} {items} at {price} coins each and pays with {paid} coins. "
                "How much change does " + name + " get?")
    return {"turns": _turns(question, text), "category": "word_problem"}


def algebra(rng: random.Random) -> Sample:
    a, x, b = rng.randint(2, 9), rng.randint(-20, 20), rng.randint(1, 50)
    c = a * x + b
    text = _reasoning(["Move the constant to the right side", "Divide by the coefficient"],
                      [f"{a}x = {c} - {b} = {c - b}", f"x = {c - b} / {a} = {x}"],
                      f"{a} * {x} + {b} = {c}", f"x = {x}")
    return {"turns": _turns(f"Solve for x: {a}x + {b} = {c}", text), "category": "algebra"}


_IDK = (("What will the price of {thing} be on {date}?", "I cannot predict future prices"),
        ("What is {name}'s home address?", "I have no access to private information about people"),
        ("What is the temperature in {city} right now?", "I have no access to real-time data"),
        ("Who will win the {year} chess olympiad?", "Nobody can know the outcome of a future event"))
_THINGS, _CITIES = ("gold", "bread", "a train ticket", "copper"), ("Oslo", "Lima", "Accra", "Hanoi", "Quito")


def idk(rng: random.Random) -> Sample:
    question, reason = rng.choice(_IDK)
    question = question.format(thing=rng.choice(_THINGS), date=f"{rng.randint(1, 28)} March {rng.randint(2031, 2060)}",
                               name=rng.choice(NAMES), city=rng.choice(_CITIES), year=rng.randint(2031, 2060))
    answer = (f"<|uncertain|>{reason}. <|unknown|>I don't know, and I would only be guessing.<|/uncertain|> "
              "A source with current, verified information is the place to look.")
    return {"turns": _turns(question, answer), "category": "idk"}


def cutoff(rng: random.Random) -> Sample:
    event = rng.choice(("the election in", "the football final in", "the science prize of", "the budget of"))
    year = rng.randint(2031, 2070)
    answer = (f"<|uncertain|><|knowledge_cutoff|>My knowledge stops at a cutoff date, before {year}. "
              f"<|need_verify|>Please check a current news source for {event} {year}.<|/uncertain|>")
    return {"turns": _turns(f"What happened at {event} {year}?", answer), "category": "cutoff"}


_MYTHS = (("the Great Wall of China is visible from space with the naked eye", "it is only a few metres wide"),
          ("goldfish remember things for only three seconds", "experiments show they remember for months"),
          ("lightning never strikes the same place twice", "tall towers are struck many times a year"),
          ("humans use only ten percent of their brains", "imaging shows activity across the whole brain"))


def fact_check(rng: random.Random) -> Sample:
    claim, evidence = rng.choice(_MYTHS)
    opener = rng.choice(("Is it true that", "I read that", "My friend says that"))
    answer = (f"<|think|>Let me check this claim.\n<|verify|>The claim is a common myth: {evidence}.<|/verify|>\n"
              f"<|/think|>\nNo. It is not true that {claim}: {evidence}.")
    return {"turns": _turns(f"{opener} {claim}?", answer), "category": "fact_check"}


_FACTS = (("the speed of light in vacuum", "299,792,458 metres per second", "the SI definition of the metre"),
          ("the boiling point of water at sea level", "100 degrees Celsius", "standard atmospheric pressure tables"),
          ("the number of bones in an adult human", "206", "standard anatomy references"),
          ("the atomic number of carbon", "6", "the periodic table of IUPAC"))


def citation(rng: random.Random) -> Sample:
    what, value, source = rng.choice(_FACTS)
    ask = rng.choice(("What is {}?", "Tell me {}.", "Do you know {}?")).format(what)
    answer = f"It is {value}. <|cite|>{source}<|/cite|>"
    return {"turns": _turns(ask, answer), "category": "citation"}


_PROGRAMS = (
    "def mean(values):\n    if not values:\n        return 0\n    total = sum(values)\n"
    "    return total / len(values)\n",
    "def clamp(x, low, high):\n    if x < low:\n        return low\n    if x > high:\n        return high\n"
    "    return x\n",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n"
    "        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "def is_even(n):\n    return n % 2 == 0\n\n\ndef evens(values):\n    return [v for v in values if is_even(v)]\n",
)


def fim(rng: random.Random) -> Sample:
    code = rng.choice(_PROGRAMS)
    lines = code.split("\n")
    start = rng.randint(1, len(lines) - 3)
    end = rng.randint(start + 1, len(lines) - 2)
    prefix, middle, suffix = "\n".join(lines[:start]) + "\n", "\n".join(lines[start:end]), "\n" + "\n".join(lines[end:])
    user = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    return {"turns": _turns(user, middle), "category": "fim"}


_EDITS = (("add type hints", lambda name: (f"def {name}(a, b):\n    return a + b\n",
                                           f"def {name}(a: int, b: int) -> int:\n    return a + b\n")),
          ("add a docstring", lambda name: (f"def {name}(a, b):\n    return a + b\n",
                                            f"def {name}(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n")),
          ("use an f-string", lambda name: (f"def {name}(who):\n    return 'Hello ' + who\n",
                                            f"def {name}(who):\n    return f'Hello {{who}}'\n")))


def commit(rng: random.Random) -> Sample:
    message, edit = rng.choice(_EDITS)
    name = rng.choice(("add", "combine", "greet", "join", "merge", "total")) + rng.choice(("", "_two", "_pair"))
    before, after = edit(name)
    removed = [f"-{line}" for line in before.splitlines() if line not in after.splitlines()]
    added = [f"+{line}" for line in after.splitlines() if line not in before.splitlines()]
    user = (f"Write the commit message and diff.\n<|commit_before|>{before}<|/commit_before|>"
            f"<|commit_after|>{after}<|/commit_after|>")
    answer = (f"<|commit_msg|>{message.capitalize()} to {name}<|/commit_msg|>\n<|diff|>\n"
              + "\n".join(removed + added) + "\n<|/diff|>")
    return {"turns": _turns(user, answer), "category": "commit"}


def exec_code(rng: random.Random) -> Sample:
    values = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
    index = rng.randint(0, 7)
    code = f"x = {values}\nprint(x[{index}])"
    if index < len(values):
        outcome = f"<|exec_result|>{values[index]}<|/exec_result|>"
        note = f"Index {index} is within the {len(values)} elements, so it prints {values[index]}."
    else:
        outcome = "<|exec_error|>IndexError: list index out of range<|/exec_error|>"
        note = f"The list has {len(values)} elements (indices 0 to {len(values) - 1}), so index {index} fails."
    answer = f"<|exec|><|code|>{code}<|/code|><|/exec|>\n{outcome}\n{note}"
    return {"turns": _turns("Run this and tell me what happens:\n" + code, answer), "category": "exec"}


_SHELL = (("Find all Python files under {d}", "find {d} -name '*.py' -type f", "{d}/main.py\n{d}/util.py"),
          ("Count the lines of {d}/log.txt", "wc -l {d}/log.txt", "{n} {d}/log.txt"),
          ("Show the disk usage of {d}", "du -sh {d}", "{n}M\t{d}"),
          ("List the files in {d}, newest first", "ls -t {d}", "notes.md\nreport.csv"))


def shell(rng: random.Random) -> Sample:
    task, command, output = rng.choice(_SHELL)
    folder, n = rng.choice(("src", "logs", "data", "build", "docs")), rng.randint(2, 900)
    task, command, output = (s.format(d=folder, n=n) for s in (task, command, output))
    answer = f"<|code|>{command}<|/code|>\n<|exec_result|>{output}<|/exec_result|>"
    return {"turns": _turns(task, answer), "category": "shell"}


def followup(rng: random.Random) -> Sample:
    first = arithmetic(rng)["turns"]
    double = int(first[-1]["content"].rsplit(" ", 1)[1].rstrip(".")) * 2
    more = [{"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"Twice that is {double}."}]
    return {"turns": first + more, "category": "followup"}


CONVERSATION_GENERATORS: tuple[Callable[[random.Random], Sample], ...] = (
    arithmetic, word_problem, algebra, idk, cutoff, fact_check, citation, fim, commit, exec_code, shell, followup)

TOOLS = (
    {"name": "calculator", "description": "Evaluate a + b or a * b.",
     "parameters": {"a": "number", "b": "number", "op": "add | multiply"}},
    {"name": "get_weather", "description": "Current weather of a city.", "parameters": {"city": "string"}},
    {"name": "search_files", "description": "Files whose name matches a pattern.", "parameters": {"pattern": "string"}},
)


def tool_use(rng: random.Random) -> Sample:
    tool = rng.choice(TOOLS)
    if tool["name"] == "calculator":
        a, b, op = rng.randint(2, 999), rng.randint(2, 999), rng.choice(("add", "multiply"))
        args, result = {"a": a, "b": b, "op": op}, str(a + b if op == "add" else a * b)
        user, reply = f"What is {a} {'plus' if op == 'add' else 'times'} {b}?", f"It is {result}."
    elif tool["name"] == "get_weather":
        city, degrees = rng.choice(_CITIES), rng.randint(-10, 35)
        args, result = {"city": city}, f'{{"celsius": {degrees}, "sky": "{rng.choice(("clear", "cloudy", "rain"))}"}}'
        user, reply = f"How warm is it in {city}?", f"It is {degrees} degrees Celsius in {city}."
    else:
        ext = rng.choice(("py", "md", "csv", "json"))
        found = [f"{rng.choice(('src', 'docs', 'data'))}/{rng.choice(('a', 'b', 'c', 'main'))}{i}.{ext}"
                 for i in range(rng.randint(1, 3))]
        args, result = {"pattern": f"*.{ext}"}, "\n".join(found)
        user, reply = f"Which .{ext} files are there?", "I found: " + ", ".join(found) + "."
    tools = sorted(rng.sample(TOOLS, 2) + [tool], key=lambda t: t["name"]) if rng.random() < 0.5 else [tool]
    tools = list({t["name"]: t for t in tools}.values())
    turns = [{"role": "user", "content": user},
             {"role": "assistant", "content": "", "tool_calls": [{"name": tool["name"], "arguments": args}]},
             {"role": "tool", "name": tool["name"], "content": result},
             {"role": "assistant", "content": reply}]
    return {"turns": turns, "tools": tools, "category": f"tool:{tool['name']}"}


# --------------------------------------------------------------------------- filters and deduplication

_PAIRED_NAMES = ("think", "plan", "step", "verify", "uncertain", "cite", "exec", "code", "exec_result", "exec_error",
                 "diff", "commit_msg", "commit_before", "commit_after", "jupyter", "jupyter_code", "jupyter_output",
                 "jupyter_text", "jupyter_error", "doc", "filename", "summary", "quote")
_PAIRED = re.compile(r"<\|(/?)(" + "|".join(_PAIRED_NAMES) + r")\|>")
# category prefix -> the structure check of that source's samples (None: the sample is right)
STRUCTURE_CHECKS: dict[str, Callable[[Sample], str | None]] = {
    "document": documents.check_document, "sysadmin": sysadmin.check_sysadmin, "jupyter": notebooks.check_jupyter}


def _unbalanced(text: str) -> str | None:
    """The first paired token that is not closed in order (``<|a|><|b|><|/a|><|/b|>`` is wrong), or None."""
    open_names: list[str] = []
    for closing, name in _PAIRED.findall(text):
        if not closing:
            open_names.append(name)
        elif not open_names or open_names.pop() != name:
            return f"<|/{name}|> closes nothing open"
    return f"<|{open_names[-1]}|> is not closed" if open_names else None


def quality_problem(sample: Sample) -> str | None:
    """Why ``sample`` fails the quality filters, or None: it must render in the chat template, every
    assistant turn must say something, paired tokens must close in order, no line may repeat 4 times,
    and a sample of a checked source (``STRUCTURE_CHECKS``) must pass its structure check."""
    try:
        text = render(conversation_from_json(sample))
    except ChatFormatError as err:
        return f"not a valid conversation: {err}"
    for turn in sample["turns"]:
        if turn["role"] == "assistant" and not (turn["content"].strip() or turn.get("tool_calls")):
            return "an assistant turn is empty"
    if (problem := _unbalanced(text)) is not None:
        return problem
    lines = [line for line in text.splitlines() if line.strip()]
    if any(lines.count(line) >= 4 for line in set(lines)):
        return "a line repeats 4 or more times"
    if "[PLACEHOLDER]" in text:
        return "placeholder text"
    check = STRUCTURE_CHECKS.get(str(sample.get("category", "")).split(":")[0])
    return check(sample) if check is not None else None


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Word n-grams of ``text`` (the whole text when it has fewer than n words)."""
    words = text.split()
    return frozenset(" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateFilter:
    """Keeps a text unless its word-3-gram Jaccard similarity to a kept one exceeds ``threshold``.

    Candidates are found through an inverted index of the shingles; only kept texts sharing a shingle
    are compared (templated data shares many, so this is quadratic in the worst case: meant for the
    synthetic corpus sizes, tens of thousands of samples)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.kept: list[frozenset[str]] = []
        self.index: dict[str, list[int]] = {}

    def add(self, text: str) -> bool:
        """True (and remembered) if ``text`` is not a near duplicate of a kept text."""
        grams = shingles(text)
        overlap: dict[int, int] = {}
        for gram in grams:
            for k in self.index.get(gram, ()):
                overlap[k] = overlap.get(k, 0) + 1
        for k, common in overlap.items():
            if common / (len(grams) + len(self.kept[k]) - common) > self.threshold or grams == self.kept[k]:
                return False
        for gram in grams:
            self.index.setdefault(gram, []).append(len(self.kept))
        self.kept.append(grams)
        return True


# source (its JSONL file's stem and its data.synth count) -> (the schema kind of its samples, its generators)
SOURCES: dict[str, tuple[str, tuple[Callable[[random.Random], Sample], ...]]] = {
    "conversation": ("conversation", CONVERSATION_GENERATORS),
    "tool_use": ("tool_use", (tool_use,)),
    "document": ("conversation", documents.GENERATORS),
    "sysadmin": ("conversation", sysadmin.GENERATORS),
    "jupyter": ("conversation", notebooks.GENERATORS),
}


def capability_samples(seed: int, kind: str, count: int, threshold: float) -> list[Sample]:
    """``count`` samples of the source ``kind`` (a key of ``SOURCES``), filtered and deduplicated (see the
    module docstring). Raises ``ValueError`` when the generators cannot give that many distinct ones."""
    if kind not in SOURCES:
        raise ValueError(f"unknown capability source '{kind}'; known: {', '.join(SOURCES)}")
    generators = SOURCES[kind][1]
    dedup, out, attempts = NearDuplicateFilter(threshold), [], 0
    limit = 50 * count + 100
    while len(out) < count:
        if attempts >= limit:
            raise ValueError(f"data.synth.{kind} = {count}: after {attempts} candidates only {len(out)} passed the "
                             f"quality filters and deduplication (dedup_threshold {threshold}); ask for fewer "
                             "samples or raise data.synth.dedup_threshold")
        rng = random.Random(f"xoron-synth/{seed}/{kind}/{attempts}")
        sample = generators[attempts % len(generators)](rng)
        attempts += 1
        if quality_problem(sample) is None and dedup.add(render(conversation_from_json(sample))):
            out.append(sample)
    return out


__all__ = ["CONVERSATION_GENERATORS", "NearDuplicateFilter", "SOURCES", "STRUCTURE_CHECKS", "TOOLS",
           "capability_samples", "jaccard", "quality_problem", "shingles", "tool_use"]
