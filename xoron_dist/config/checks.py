"""Range checks shared by the config sections' ``validate`` methods; each error names the dotted field."""

from __future__ import annotations

from typing import Any

from xoron_dist.utils.typed_config import field_error


def positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise field_error(f"{where}.{name}" if where else name, value, "must be > 0")


def non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 0:
            raise field_error(f"{where}.{name}" if where else name, value, "must be >= 0")


def ordered(obj: Any, where: str, low: str, high: str) -> None:
    if getattr(obj, low) > getattr(obj, high):
        raise field_error(f"{where}.{low}", getattr(obj, low), f"must be <= {high} ({getattr(obj, high)})")
