"""Document samples for ``xoron synth``: a file attached in the seed's document tokens, and a task on it.

The user turn carries the file as ``<|filename|>name<|/filename|>\\n<|doc|>\\n...\\n<|/doc|>`` (the seed's
``_wrap_file`` for types without a file-type token of the seed tier) and a request; the assistant
answers from the document alone::

    task        the assistant writes
    qa          "The <field> is <value>." and <|quote|>the document's line<|/quote|>
    missing     <|uncertain|><|unknown|>the file does not give it; what it does give<|/uncertain|>
    summary     <|summary|>"The <field> is <value>." for several fields<|/summary|>
    extract     the requested fields as a JSON object (keys in snake case, numbers as numbers)
    table       a question on a CSV file (total cost, largest quantity, rows over a price), computed
    compare     two files of one kind joined by <|file_sep|>: which has the larger total, weight, later date

A record document is a title, a line of prose and field lines in one of three layouts (``Label: value``,
``- **Label**: value``, a markdown table), with one or two optional fields left out (what ``missing``
asks about). ``parse_fields`` reads the fields back from the text, so ``check_document`` verifies every
answer against the document the sample shows, not against generator state.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable

COMPANIES = ("Acme Ltd", "Borealis AG", "Cobalt Systems", "Delta Foods", "Everline Co", "Fjord Labs", "Granite Inc",
             "Helix Media", "Ion Works", "Juniper GmbH", "Kestrel SA", "Lumen Partners")
PEOPLE = ("Ada Lovel", "Ben Okafor", "Chen Wei", "Dara Quinn", "Eli Navarro", "Fatima Zahra", "Goran Ilic",
          "Hana Sato", "Ivan Petrov", "Jun Park", "Kofi Mensah", "Lena Berg")
CITIES = ("Oslo", "Lima", "Accra", "Hanoi", "Quito", "Perth", "Tunis", "Riga", "Cusco", "Dakar", "Porto", "Turku")
SERVICES = ("checkout-api", "search", "auth-gateway", "billing-worker", "image-resizer", "notifications")
CAUSES = ("an expired TLS certificate", "a full disk on the database host", "a bad configuration push",
          "connection pool exhaustion", "a DNS record pointing at an old host", "a memory leak in the worker")
DECISIONS = ("move the launch by two weeks", "hire a second on-call engineer", "drop the legacy export",
             "switch the nightly job to hourly", "freeze the schema until review", "buy two more build servers")


def _date(rng: random.Random) -> str:
    return f"20{rng.randint(30, 45)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _money(rng: random.Random) -> str:
    return f"{rng.randint(20, 98000) + rng.choice((0, 0.5, 0.25, 0.99)):.2f}"


# kind -> (title, file stem, [(label, value maker, optional)])
Field = tuple[str, Callable[[random.Random], str], bool]
RECORDS: dict[str, tuple[str, str, list[Field]]] = {
    "invoice": ("Invoice", "invoice", [
        ("Invoice number", lambda r: f"INV-{r.randint(1000, 99999)}", False),
        ("Customer", lambda r: r.choice(COMPANIES), False), ("Issue date", _date, False),
        ("Due date", _date, True), ("Line items", lambda r: str(r.randint(1, 40)), True),
        ("Total", _money, False), ("Currency", lambda r: r.choice(("EUR", "USD", "GBP", "NOK", "JPY")), True),
        ("Purchase order", lambda r: f"PO-{r.randint(100, 9999)}", True)]),
    "meeting": ("Meeting notes", "meeting_notes", [
        ("Date", _date, False), ("Organizer", lambda r: r.choice(PEOPLE), False),
        ("Attendees", lambda r: str(r.randint(3, 25)), True),
        ("Room", lambda r: f"{r.choice('ABCDE')}{r.randint(1, 40)}", True),
        ("Decision", lambda r: r.choice(DECISIONS), False), ("Next meeting", _date, True),
        ("Budget", _money, True)]),
    "incident": ("Incident report", "incident", [
        ("Incident ID", lambda r: f"INC-{r.randint(100, 9999)}", False),
        ("Service", lambda r: r.choice(SERVICES), False), ("Severity", lambda r: f"SEV{r.randint(1, 4)}", False),
        ("Duration minutes", lambda r: str(r.randint(3, 480)), True),
        ("Root cause", lambda r: r.choice(CAUSES), False), ("Owner", lambda r: r.choice(PEOPLE), True),
        ("Users affected", lambda r: str(r.randint(10, 90000)), True)]),
    "shipment": ("Shipping note", "shipment", [
        ("Order ID", lambda r: f"ORD-{r.randint(10000, 999999)}", False),
        ("Destination", lambda r: r.choice(CITIES), False),
        ("Weight kg", lambda r: f"{r.uniform(0.5, 900):.2f}", False),
        ("Packages", lambda r: str(r.randint(1, 60)), True),
        ("Carrier", lambda r: r.choice(("DHL", "UPS", "FedEx", "Posten")), True),
        ("Ship date", _date, False), ("Insured value", _money, True)]),
    "job": ("Job posting", "job_posting", [
        ("Position", lambda r: r.choice(("Data engineer", "Site reliability engineer", "Product designer",
                                         "ML researcher", "Support lead")), False),
        ("Team", lambda r: r.choice(("Platform", "Search", "Payments", "Growth", "Infra")), False),
        ("Location", lambda r: r.choice(CITIES), False), ("Salary", lambda r: str(r.randint(40, 190) * 1000), True),
        ("Start date", _date, True), ("Hiring manager", lambda r: r.choice(PEOPLE), True),
        ("Openings", lambda r: str(r.randint(1, 6)), True)]),
}
PROSE = ("This file was exported from the records system.", "Prepared for the quarterly review.",
         "Please keep this document for your records.", "Generated automatically; do not edit by hand.",
         "Shared with the team for reference.")


def _layout(title: str, fields: dict[str, str], style: int, rng: random.Random) -> str:
    if style == 0:
        lines = [title.upper(), rng.choice(PROSE), ""] + [f"{label}: {value}" for label, value in fields.items()]
    elif style == 1:
        lines = [f"# {title}", "", rng.choice(PROSE), ""]
        lines += [f"- **{label}**: {value}" for label, value in fields.items()]
    else:
        lines = [f"## {title}", "", "| Field | Value |", "| --- | --- |"]
        lines += [f"| {label} | {value} |" for label, value in fields.items()] + ["", rng.choice(PROSE)]
    return "\n".join(lines)


_FIELD_LINE = re.compile(r"(?:- \*\*(?P<md>[A-Z][A-Za-z ]*)\*\*: |(?P<plain>[A-Z][A-Za-z ]*): "
                         r"|\| (?P<cell>[A-Z][A-Za-z ]*) \| )(?P<value>.+?)(?: \|)?")


def parse_fields(document: str) -> dict[str, str]:
    """The ``label -> value`` lines of a record document, in order (the table's header row is skipped)."""
    fields = {}
    for line in document.splitlines():
        match = _FIELD_LINE.fullmatch(line)
        if match and match.group("cell") != "Field":
            fields[match.group("md") or match.group("plain") or match.group("cell")] = match.group("value")
    return fields


def typed(value: str) -> int | float | str:
    """A document value as JSON extraction writes it: integers and decimals as numbers, the rest as text."""
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d+", value):
        return float(value)
    return value


def snake(label: str) -> str:
    return label.lower().replace(" ", "_")


def _attach(rng: random.Random, filename: str, document: str, request: str) -> str:
    attached = f"<|filename|>{filename}<|/filename|>\n<|doc|>\n{document}\n<|/doc|>"
    intro = rng.choice(("", "I attached a file.\n", "Here is the document.\n", "See the file below.\n"))
    return f"{intro}{attached}\n{request}" if rng.random() < 0.6 else f"{request}\n{intro}{attached}"


_QUESTIONS = ("What is the {l} in {f}?", "According to the document, what is the {l}?", "Which {l} does {f} give?",
              "Tell me the {l} from the attached file.")
_SUMMARY = ("Summarize {f} in a few sentences.", "Give me a short summary of this document.",
            "What are the key points of {f}?")
_EXTRACT = ("Extract {names} from {f} as JSON with the keys {keys}.",
            "Return a JSON object with {keys} taken from the document ({names}).")


def _record(rng: random.Random, kind: str) -> tuple[str, dict[str, str], str, set[str]]:
    """(filename, fields, document text, the optional fields left out) of a record document of ``kind``."""
    title, stem, spec = RECORDS[kind]
    optional = [label for label, _, opt in spec if opt]
    dropped = set(rng.sample(optional, rng.randint(1, 2)))
    fields = {label: make(rng) for label, make, _ in spec if label not in dropped}
    for before, after in (("Issue date", "Due date"), ("Date", "Next meeting")):  # ISO dates sort as text
        if before in fields and after in fields and fields[after] < fields[before]:
            fields[before], fields[after] = fields[after], fields[before]
    style = rng.randrange(3)
    filename = f"{stem}_{rng.randint(1, 999):03d}.{('txt', 'md', 'md')[style]}"
    return filename, fields, _layout(title, fields, style, rng), dropped


def _record_task(rng: random.Random, kind: str) -> tuple[str, str, str, str, str]:
    """(filename, document, request, task, answer) for a record document."""
    title = RECORDS[kind][0]
    filename, fields, document, dropped = _record(rng, kind)
    task = rng.choice(("qa", "qa", "missing", "summary", "extract", "extract"))
    if task == "missing":
        label = rng.choice(sorted(dropped))
        request = rng.choice(_QUESTIONS).format(l=label.lower(), f=filename)
        answer = (f"<|uncertain|><|unknown|>{filename} does not give the {label.lower()}; it lists "
                  f"{', '.join(f.lower() for f in fields)}.<|/uncertain|>")
    elif task == "qa":
        label = rng.choice(list(fields))
        request = rng.choice(_QUESTIONS).format(l=label.lower(), f=filename)
        line = next(line for line in document.splitlines() if parse_fields(line).get(label) == fields[label])
        answer = f"The {label.lower()} is {fields[label]}.\n<|quote|>{line}<|/quote|>"
    elif task == "summary":
        picked = set(rng.sample(list(fields), rng.randint(3, min(5, len(fields)))))
        chosen = [label for label in fields if label in picked]  # in the document's order
        sentences = " ".join(f"The {label.lower()} is {fields[label]}." for label in chosen)
        request, answer = rng.choice(_SUMMARY).format(f=filename), f"<|summary|>{title}. {sentences}<|/summary|>"
    else:
        chosen = rng.sample(list(fields), rng.randint(2, min(4, len(fields))))
        request = rng.choice(_EXTRACT).format(names=", ".join(c.lower() for c in chosen), f=filename,
                                              keys=", ".join(snake(c) for c in chosen))
        answer = json.dumps({snake(c): typed(fields[c]) for c in chosen}, indent=2, ensure_ascii=False)
    return filename, document, request, f"{task}:{kind}", answer


def _table_task(rng: random.Random) -> tuple[str, str, str, str, str]:
    """A CSV of items (quantity, unit price) and a question whose answer is computed from the rows."""
    items = rng.sample(("bolts", "cables", "chairs", "desks", "fans", "lamps", "mugs", "pens", "plugs", "routers",
                        "screens", "tapes"), rng.randint(3, 7))
    rows = [(item, rng.randint(1, 90), rng.randint(1, 400) + rng.choice((0, 0.5, 0.25))) for item in items]
    document = "item,quantity,unit_price\n" + "\n".join(f"{i},{q},{p:.2f}" for i, q, p in rows)
    filename = f"{rng.choice(('order', 'stock', 'purchase', 'inventory'))}_{rng.randint(1, 999):03d}.csv"
    question = rng.randrange(3)
    if question == 0:
        total = sum(q * p for _, q, p in rows)
        request = "What is the total cost (quantity times unit price, summed over all rows)?"
        steps = "".join(f"<|step|>{i}: {q} x {p:.2f} = {q * p:.2f}<|/step|>\n" for i, q, p in rows)
        answer = f"<|think|>\n{steps}<|/think|>\nThe total cost is {total:.2f}."
    elif question == 1:
        item, quantity, _ = max(rows, key=lambda row: (row[1], row[0]))
        request, answer = "Which item has the largest quantity?", f"The largest quantity is {item}, with {quantity}."
    else:
        limit = rng.choice([p for _, _, p in rows])
        over = [i for i, _, p in rows if p > limit]
        request = f"Which items cost more than {limit:.2f} per unit?"
        answer = (f"{len(over)} item{'s' * (len(over) > 1)} cost{'s' * (len(over) == 1)} more than {limit:.2f}: "
                  f"{', '.join(over)}." if over
                  else f"No item costs more than {limit:.2f}.")
    return filename, document, request, f"table:{question}", answer


# record kind -> the field two documents of that kind are compared on (a number or an ISO date), and its words
COMPARED = {"invoice": ("Total", "the larger total"), "shipment": ("Weight kg", "the heavier shipment"),
            "meeting": ("Date", "the later meeting")}


def _compare_task(rng: random.Random) -> tuple[str, str, str]:
    """Two files of one kind separated by <|file_sep|>: which one has more of a field (user, task, answer)."""
    kind = rng.choice(sorted(COMPARED))
    label, words = COMPARED[kind]
    first, second = _record(rng, kind), _record(rng, kind)
    while (second[0] == first[0] or second[1][label] == first[1][label]
           or second[1].get("Currency") != first[1].get("Currency")):  # totals compare in one currency
        second = _record(rng, kind)
    files = "\n<|file_sep|>\n".join(f"<|filename|>{name}<|/filename|>\n<|doc|>\n{body}\n<|/doc|>"
                                     for name, _, body, _ in (first, second))
    request = f"Which of these two files has {words}?"
    winner, loser = sorted((first, second), key=lambda record: _order(record[1][label]), reverse=True)
    answer = (f"{winner[0]} has {words}: its {label.lower()} is {winner[1][label]}, against "
              f"{loser[1][label]} in {loser[0]}.")
    return f"{request}\n{files}", f"compare:{kind}", answer


def _order(value: str) -> float | str:
    """Comparable form of a field value: numbers by value, ISO dates (and other text) as text."""
    number = typed(value)
    return float(number) if isinstance(number, int | float) else value


def document(rng: random.Random) -> dict:
    """One document sample (a ``conversation`` in the chat template)."""
    draw = rng.random()
    if draw < 0.15:
        user, task, answer = _compare_task(rng)
    else:
        filename, body, request, task, answer = _table_task(rng) if draw < 0.35 else _record_task(
            rng, rng.choice(sorted(RECORDS)))
        user = _attach(rng, filename, body, request)
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"turns": turns, "category": f"document:{task}"}


# --------------------------------------------------------------------------- checking a sample


_ATTACHED = re.compile(r"<\|filename\|>(.+?)<\|/filename\|>\n<\|doc\|>\n(.*?)\n<\|/doc\|>", re.S)


def _label_asked(request: str) -> str | None:
    for question in _QUESTIONS:
        pattern = re.escape(question).replace(r"\{l\}", "(?P<l>[a-z ]+?)").replace(r"\{f\}", r"\S+")
        match = re.search(pattern, request)
        if match:
            return match.group("l")
    return None


def _check_table(document: str, request: str, answer: str) -> str | None:
    rows = [(r["item"], int(r["quantity"]), float(r["unit_price"])) for r in csv.DictReader(io.StringIO(document))]
    if "What is the total cost" in request:
        expected = f"The total cost is {sum(q * p for _, q, p in rows):.2f}."
        return None if answer.endswith("\n" + expected) else f"the total is not {expected!r}"
    if "Which item has the largest quantity?" in request:
        item, quantity, _ = max(rows, key=lambda row: (row[1], row[0]))
        return None if answer == f"The largest quantity is {item}, with {quantity}." else "wrong largest quantity"
    asked = re.search(r"Which items cost more than (\d+\.\d\d) per unit\?", request)
    if asked is None:
        return "the request is none of the table questions"
    limit = float(asked.group(1))
    over = [i for i, _, p in rows if p > limit]
    return None if (", ".join(over) in answer and answer.startswith(str(len(over)) if over else "No")) else \
        f"items over {limit}: expected {over}"


def _check_compare(user: str, answer: str) -> str | None:
    files = [(name, parse_fields(body)) for name, body in _ATTACHED.findall(user)]
    words = re.search(r"Which of these two files has (.+)\?", user)
    labels = [label for label, phrase in COMPARED.values() if words and phrase == words.group(1)]
    if len(files) != 2 or len(labels) != 1 or user.count("<|file_sep|>") != 1:
        return "a comparison needs two attached files, one <|file_sep|> and a known question"
    label = labels[0]
    if files[0][1].get("Currency") != files[1][1].get("Currency"):
        return "the two files' amounts are in different currencies"
    (winner, fields), (loser, other) = sorted(files, key=lambda f: _order(f[1][label]), reverse=True)
    expected = (f"{winner} has {words.group(1)}: its {label.lower()} is {fields[label]}, against {other[label]} "
                f"in {loser}.")
    return None if answer == expected else f"expected {expected!r}"


def check_document(sample: dict) -> str | None:
    """Why a document sample's answer does not follow from its document, or None."""
    user, answer = sample["turns"][0]["content"], sample["turns"][-1]["content"]
    if "<|file_sep|>" in user:
        return _check_compare(user, answer)
    attached = _ATTACHED.search(user)
    if attached is None:
        return "no <|filename|>..<|/filename|>\\n<|doc|>..<|/doc|> attachment in the user turn"
    filename, body = attached.groups()
    request = user.replace(attached.group(0), "")
    if filename.endswith(".csv"):
        return _check_table(body, request, answer)
    fields = {label.lower(): value for label, value in parse_fields(body).items()}
    if not fields:
        return "the document has no field lines"
    if answer.startswith("<|uncertain|><|unknown|>"):
        label = _label_asked(request)
        if label is None:
            return "the request asks for no field"
        return f"'{label}' is in the document" if label in fields else None
    if answer.startswith("<|summary|>"):
        stated = re.findall(r"The ([a-z ]+) is (.+?)\.(?= The |<\|/summary\|>)", answer)
        wrong = [pair for pair in stated if fields.get(pair[0]) != pair[1]]
        return f"the summary states {wrong or 'no field'}" if wrong or not stated else None
    if answer.startswith("{"):
        wanted = {snake(label): typed(value) for label, value in fields.items()}
        try:
            got = json.loads(answer)
        except json.JSONDecodeError as err:
            return f"the extraction is not JSON: {err}"
        wrong = {key: value for key, value in got.items() if wanted.get(key, object()) != value}
        return f"extracted values not in the document: {wrong}" if wrong or not got else None
    match = re.fullmatch(r"The ([a-z ]+) is (.+)\.\n<\|quote\|>(.+)<\|/quote\|>", answer)
    if match is None or fields.get(match.group(1)) != match.group(2) or match.group(3) not in body.splitlines():
        return "the answer is not a field of the document with its quoted line"
    return None if _label_asked(request) == match.group(1) else "the answer is about another field"


GENERATORS = (document,)

__all__ = ["GENERATORS", "RECORDS", "check_document", "document", "parse_fields", "snake", "typed"]
