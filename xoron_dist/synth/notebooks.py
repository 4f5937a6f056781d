"""Jupyter samples for ``xoron synth``: a request answered by a notebook session in the seed's Jupyter tokens.

The assistant writes the session and then the answer::

    <|jupyter|>
    <|jupyter_text|>Load the readings.<|/jupyter_text|>
    <|jupyter_code|>
    temps = [21, 19, 24]
    <|/jupyter_code|>
    <|empty_output|>
    <|jupyter_code|>
    avg = sum(temps) / len(temps)
    round(avg, 2)
    <|/jupyter_code|>
    <|jupyter_output|>21.33<|/jupyter_output|>
    <|/jupyter|>
    The average is 21.33 ...

A code cell is followed by ``<|empty_output|>``, by ``<|jupyter_output|>`` (what it printed, then the
``repr`` of a last-line expression, as Jupyter's ``Out[n]``), and/or ``<|jupyter_error|>`` (``Type: message``
of the exception it raised). Outputs are never written by hand: ``run_cells`` executes the cells in
order in one namespace at generation time, so every output is what the code really does (the seed's
own Jupyter data prints, for example, ``{x: x**2 for x in range(6)}`` with keys up to 7).

The namespace's builtins are a short allow-list (no ``open``, ``__import__``, ``eval``): the code is our
own templates, and the list keeps a template from reaching outside the process by mistake. It is not
a sandbox for untrusted code. ``check_jupyter`` parses a sample back into cells, re-executes them and
compares every output; sessions of more than one code cell must have a later cell read a name an
earlier cell assigned.
"""

from __future__ import annotations

import ast
import builtins
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

_BUILTINS = {name: getattr(builtins, name)
             for name in ("abs", "all", "any", "dict", "enumerate", "filter", "float", "int", "len", "list", "map",
                          "max", "min", "next", "range", "reversed", "round", "set", "sorted", "str", "sum", "tuple",
                          "zip",
                          "KeyError", "NameError", "ValueError", "ZeroDivisionError", "IndexError", "TypeError")}


@dataclass(frozen=True)
class CellResult:
    """What one code cell showed: printed text plus the last expression's repr ("" for none), and the
    ``Type: message`` of the exception it raised (None when it ran through)."""

    output: str
    error: str | None = None


def _printer(buffer: io.StringIO) -> Callable[..., None]:
    def print_(*args: object, sep: str = " ", end: str = "\n") -> None:
        buffer.write(sep.join(map(str, args)) + end)

    return print_


def run_cells(sources: list[str]) -> list[CellResult]:
    """Execute code cells in order in one fresh namespace; one result per cell."""
    namespace: dict = {"__builtins__": _BUILTINS}
    results = []
    for source in sources:
        buffer = io.StringIO()
        namespace["print"] = _printer(buffer)
        tree = ast.parse(source)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        error = None
        try:
            exec(compile(tree, "<cell>", "exec"), namespace)  # noqa: S102 (our own templates, see the docstring)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)  # noqa: S307
                if value is not None:
                    buffer.write(repr(value) + "\n")
        except Exception as err:  # noqa: BLE001 (any exception is the cell's shown error, as in Jupyter)
            error = f"{type(err).__name__}: {err}"
        results.append(CellResult(buffer.getvalue().rstrip("\n"), error))
    return results


# --------------------------------------------------------------------------- rendering and parsing

Cell = tuple[str, str]  # ("code" | "text", source)


def render_session(cells: list[Cell]) -> tuple[str, list[CellResult]]:
    """The ``<|jupyter|>`` block of ``cells`` (outputs from really running the code cells), and the results."""
    results = iter(run_cells([source for kind, source in cells if kind == "code"]))
    parts, shown = ["<|jupyter|>"], []
    for kind, source in cells:
        if kind == "text":
            parts.append(f"<|jupyter_text|>{source}<|/jupyter_text|>")
            continue
        result = next(results)
        shown.append(result)
        parts.append(f"<|jupyter_code|>\n{source}\n<|/jupyter_code|>")
        if result.output:
            parts.append(f"<|jupyter_output|>{result.output}<|/jupyter_output|>")
        if result.error is not None:
            parts.append(f"<|jupyter_error|>{result.error}<|/jupyter_error|>")
        if not result.output and result.error is None:
            parts.append("<|empty_output|>")
    return "\n".join(parts + ["<|/jupyter|>"]), shown


_ITEM = re.compile(r"<\|jupyter_text\|>(?P<text>.*?)<\|/jupyter_text\|>\n"
                   r"|<\|jupyter_code\|>\n(?P<code>.*?)\n<\|/jupyter_code\|>\n"
                   r"(?:(?P<empty><\|empty_output\|>)\n"
                   r"|(?:<\|jupyter_output\|>(?P<output>.*?)<\|/jupyter_output\|>\n)?"
                   r"(?:<\|jupyter_error\|>(?P<error>.*?)<\|/jupyter_error\|>\n)?)", re.S)
_SESSION = re.compile(r"<\|jupyter\|>\n(.*)<\|/jupyter\|>\n(.+)", re.S)


class NotebookFormatError(ValueError):
    """Assistant text that is not a ``<|jupyter|>`` session followed by an answer."""


def parse_session(text: str) -> tuple[list[Cell], list[CellResult], str]:
    """An assistant turn back to (cells, the outputs it shows per code cell, the answer after the block)."""
    match = _SESSION.fullmatch(text)
    if match is None:
        raise NotebookFormatError("not '<|jupyter|>\\n' cells '<|/jupyter|>\\n' answer")
    body, position, cells, shown = match.group(1), 0, [], []
    while position < len(body):
        item = _ITEM.match(body, position)
        if item is None or item.end() == position:
            raise NotebookFormatError(f"unexpected text in the session at {body[position:position + 40]!r}")
        position = item.end()
        if item.group("text") is not None:
            cells.append(("text", item.group("text")))
            continue
        if not (item.group("empty") or item.group("output") is not None or item.group("error") is not None):
            raise NotebookFormatError(f"code cell {len(shown) + 1} has no output, error or <|empty_output|>")
        cells.append(("code", item.group("code")))
        shown.append(CellResult(item.group("output") or "", item.group("error")))
    return cells, shown, match.group(2)


def _assigned(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def _read(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def check_jupyter(sample: dict) -> str | None:
    """Why a Jupyter sample's session is wrong, or None: it parses, re-running its code cells gives exactly
    the outputs and errors it shows, the last code cell runs and shows what the answer quotes, and (with
    several code cells) a later cell reads an earlier one's name.

    It runs the sample's code (``run_cells``): meant for samples this module made, not for foreign data."""
    try:
        cells, shown, answer = parse_session(sample["turns"][-1]["content"])
    except NotebookFormatError as err:
        return str(err)
    sources = [source for kind, source in cells if kind == "code"]
    if not sources or not answer.strip():
        return "no code cell, or no answer after the session"
    for index, (ran, seen) in enumerate(zip(run_cells(sources), shown, strict=True)):
        if ran != seen:
            return f"code cell {index + 1} shows {seen} but running it gives {ran}"
    if shown[-1].error is not None or not shown[-1].output or shown[-1].output not in answer:
        return "the last code cell fails or shows nothing, or the answer does not give its output"
    trees = [ast.parse(source) for source in sources]
    uses_earlier = any(_read(tree) & set().union(*map(_assigned, trees[:k])) for k, tree in enumerate(trees) if k)
    if len(trees) > 1 and not uses_earlier:
        return "no later cell uses a name an earlier cell assigned"
    return None


# --------------------------------------------------------------------------- sessions

Program = tuple[str, list[Cell], Callable[[list[CellResult]], str]]  # (request, cells, answer from results)

CITIES = ("Oslo", "Lima", "Accra", "Hanoi", "Quito", "Perth", "Tunis", "Riga", "Cusco", "Dakar")
WORDS = ("data", "model", "train", "loss", "batch", "token", "layer", "graph", "cache", "node", "queue", "shard")
FRUIT = ("apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "melon", "peach", "pear", "plum")
PEOPLE = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira")


def _stats(rng: random.Random) -> Program:
    name = rng.choice(("temps", "readings", "values", "samples"))
    metric, city = rng.choice(("temperature", "rainfall", "humidity", "wind speed")), rng.choice(CITIES)
    data = [rng.randint(5, 40) for _ in range(rng.randint(5, 12))]
    cells: list[Cell] = [("text", f"Daily {metric} in {city}."), ("code", f"{name} = {data}"),
                         ("code", f"avg = sum({name}) / len({name})\nround(avg, 2)"),
                         ("code", f"above = [day for day, v in enumerate({name}, 1) if v > avg]\n"
                                  "print(len(above), 'days above average:', above)")]
    request = (f"These are {len(data)} days of {metric} readings from {city}: {data}. Use a notebook to find "
               "the average and the days above it.")
    return request, cells, lambda r: f"The average {metric} is {r[1].output}; {r[2].output}."


def _word_counts(rng: random.Random) -> Program:
    text = " ".join(rng.choice(WORDS[: rng.randint(5, len(WORDS))]) for _ in range(rng.randint(10, 22)))
    top = rng.randint(2, 4)
    cells: list[Cell] = [("code", f"text = {text!r}"),
                         ("code", "counts = {}\nfor word in text.split():\n    counts[word] = counts.get(word, 0) + 1\n"
                                  "len(counts)"),
                         ("text", f"The {top} most frequent words (ties in alphabetical order)."),
                         ("code", f"sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:{top}]")]
    request = f"Count the words of this text in a notebook and show the {top} most frequent: \"{text}\""
    return request, cells, lambda r: f"There are {r[1].output} distinct words; the top {top} are {r[2].output}."


def _primes(rng: random.Random) -> Program:
    low = rng.randint(2, 60)
    high = low + rng.randint(15, 60)
    cells: list[Cell] = [("code", "def is_prime(n):\n    if n < 2:\n        return False\n"
                                  "    return all(n % d for d in range(2, int(n ** 0.5) + 1))"),
                         ("code", f"primes = [n for n in range({low}, {high}) if is_prime(n)]\nprimes"),
                         ("code", "print('count:', len(primes), 'sum:', sum(primes))")]
    request = f"In a notebook, list the primes from {low} up to {high - 1} and give their count and sum."
    return request, cells, lambda r: f"The primes are {r[1].output}; {r[2].output}."


def _inventory(rng: random.Random) -> Program:
    stock = {fruit: rng.randint(0, 30) for fruit in sorted(rng.sample(FRUIT, rng.randint(3, 6)))}
    threshold, target = rng.randint(5, 15), rng.randint(30, 50)
    cells: list[Cell] = [("code", f"stock = {stock}\nthreshold = {threshold}"),
                         ("code", "low = {k: v for k, v in stock.items() if v < threshold}\nlow"),
                         ("text", f"Order enough to bring each low item to {target}."),
                         ("code", f"order = {{k: {target} - v for k, v in low.items()}}\nprint(order)")]
    request = (f"Stock levels: {stock}. In a notebook, find the items under {threshold} and how many of each "
               f"to order to reach {target}.")
    return request, cells, lambda r: f"Low items: {r[1].output or '{}'}. Order: {r[2].output}."


def _names(rng: random.Random) -> Program:
    people = rng.sample(PEOPLE, rng.randint(3, 7))
    cells: list[Cell] = [("code", f"team = {people}"),
                         ("code", "initials = ''.join(name[0] for name in team)\ninitials"),
                         ("code", "longest = max(team, key=len)\nprint(longest, len(longest))")]
    request = f"Team: {', '.join(people)}. Use a notebook to make their initials and find the longest name."
    return request, cells, lambda r: f"The initials are {r[1].output}; the longest name and its length: {r[2].output}."


def _error_then_fix(rng: random.Random) -> Program:
    """A cell raises (a typo, a missing key, an empty average, a unit in a number); the next one fixes it."""
    prices = {fruit: rng.randint(1, 9) for fruit in sorted(rng.sample(FRUIT, rng.randint(3, 5)))}
    case = rng.randrange(4)
    setup: Cell = ("code", f"prices = {prices}")
    if case == 0:
        broken, note, fixed = "total = sum(prices.values())\nprint(totl)", "Typo: the name is total.", "print(total)"
    elif case == 1:
        missing = rng.choice([f for f in FRUIT if f not in prices])
        broken = f"prices[{missing!r}]"
        note, fixed = f"{missing} is not in the table: default to 0.", f"prices.get({missing!r}, 0)"
    elif case == 2:
        limit = min(prices.values())
        broken = f"cheap = [p for p in prices.values() if p < {limit}]\nsum(cheap) / len(cheap)"
        note, fixed = "No price is that low: guard the empty list.", "sum(cheap) / len(cheap) if cheap else 0.0"
    else:
        weight = rng.randint(2, 40)
        broken = f"weight = int('{weight} kg')"
        note, fixed = "Take the number before the unit.", f"weight = int('{weight} kg'.split()[0])\nweight * 2"
    cells: list[Cell] = [setup, ("code", broken), ("text", note), ("code", fixed)]
    request = f"Prices: {prices}. Work through this in a notebook and fix any error you hit."
    return request, cells, lambda r: f"The first try failed ({r[1].error}); after the fix the result is {r[2].output}."


def _grades(rng: random.Random) -> Program:
    students = sorted(rng.sample(PEOPLE, rng.randint(3, 5)))
    scores = {name: [rng.randint(40, 100) for _ in range(rng.randint(2, 4))] for name in students}
    cells: list[Cell] = [("code", f"scores = {scores}"),
                         ("code", "averages = {name: round(sum(s) / len(s), 1) for name, s in scores.items()}\n"
                                  "averages"),
                         ("text", "Best average (ties: first in alphabetical order)."),
                         ("code", "best = max(sorted(averages), key=averages.get)\nprint(best, averages[best])")]
    request = f"Test scores per student: {scores}. In a notebook, average each student's scores and find the best."
    return request, cells, lambda r: f"Averages: {r[1].output}. Best: {r[2].output}."


def _running_total(rng: random.Random) -> Program:
    sales = [rng.randint(5, 120) for _ in range(rng.randint(4, 9))]
    goal = rng.randint(sales[0], sum(sales))  # reached on some day
    cells: list[Cell] = [("code", f"sales = {sales}"),
                         ("code", "totals = []\nrunning = 0\nfor s in sales:\n    running += s\n"
                                  "    totals.append(running)\ntotals"),
                         ("code", f"first = next(day for day, t in enumerate(totals, 1) if t >= {goal})\nfirst")]
    request = (f"Daily sales: {sales}. In a notebook, compute the running total and the first day it reaches "
               f"{goal}.")
    return request, cells, lambda r: f"Running totals: {r[1].output}; the total first reaches {goal} on day " \
                                     f"{r[2].output}."


PROGRAMS: tuple[Callable[[random.Random], Program], ...] = (_stats, _word_counts, _primes, _inventory, _names,
                                                             _error_then_fix, _grades, _running_total)


def jupyter(rng: random.Random) -> dict:
    """One Jupyter sample (a ``conversation`` in the chat template)."""
    program = rng.choice(PROGRAMS)
    request, cells, answer = program(rng)
    block, results = render_session(cells)
    turns = [{"role": "user", "content": request},
             {"role": "assistant", "content": f"{block}\n{answer(results)}"}]
    return {"turns": turns, "category": f"jupyter:{program.__name__.lstrip('_')}"}


GENERATORS = (jupyter,)

__all__ = ["CellResult", "GENERATORS", "NotebookFormatError", "check_jupyter", "jupyter", "parse_session",
           "render_session", "run_cells"]
