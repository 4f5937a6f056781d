"""The two ways a conversion says no: a sample is rejected, or the whole run cannot go on."""

from __future__ import annotations


class RejectedSample(Exception):
    """One sample cannot be converted; ``reason`` says why in words a user can act on.

    Raised by the readers, the field checks and the media decoders; the unit that meets it writes
    the sample to ``rejects.jsonl`` and goes on (or, with ``--strict``, turns it into ``PrepError``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrepError(RuntimeError):
    """The conversion stops: an input that does not exist, an output folder that holds something
    else, settings that differ from a partial conversion being resumed, or a reject under ``--strict``."""


def describe_reject(record: dict) -> str:
    """``data/a.jsonl:12 (id img-7): reason`` (``a.parquet:row 12`` for Parquet / JSON-array rows) for one
    ``rejects.jsonl`` record."""
    where = record["source"]
    if record.get("line") is not None:
        where += f":{record['line']}"
    elif record.get("key") is not None:
        where += f":{record['key']}"
    elif record.get("row") is not None:
        where += f":row {record['row']}"
    if record.get("id") is not None:
        where += f" (id {record['id']})"
    return f"{where}: {record['reason']}"
