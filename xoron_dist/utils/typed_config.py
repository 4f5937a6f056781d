"""Build typed dataclass trees from plain dicts (YAML), with errors that name the field.

This is the machinery under ``xoron_dist.config``: it knows nothing about Xoron.
Each dataclass may define ``validate(self, where: str)`` for range checks; the
builder calls it after the fields are typed, with ``where`` the dotted path of
that node (``model.llm.moe``) so that every error names the exact field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is wrong. The message says which, and what is allowed."""


def field_error(where: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field '{where}' = {value!r} is invalid: {allowed}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, where)
            except ConfigError as err:
                errors.append(err)
        raise field_error(where, value, f"expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise field_error(where, value, f"allowed values are {', '.join(repr(a) for a in allowed)}")
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise field_error(where, value, f"expected {_type_name(tp)}")
        return [coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise field_error(where, value, f"expected {_type_name(tp)}")
        return {coerce(kt, k, f"{where}.<key>"): coerce(vt, v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise field_error(where, value, f"expected {_type_name(tp)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise field_error(where, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise field_error(where, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise field_error(where, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise field_error(where, value, "expected a string")
    raise TypeError(f"typed_config cannot handle annotation {tp!r} at {where}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are errors with a did-you-mean hint.

    Only types are checked here; the root dataclass runs ``validate_tree`` once, in its
    ``__post_init__``, so that direct construction and loading check the same things.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key '{_join(where, str(key))}'{hint}")
    kwargs = {name: coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def validate_tree(obj: Any, where: str = "") -> None:
    """Call ``validate(where)`` on ``obj`` and every dataclass below it, children first."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            validate_tree(child, _join(where, f.name))
        elif isinstance(child, list):
            for i, item in enumerate(child):
                if dataclasses.is_dataclass(item):
                    validate_tree(item, f"{_join(where, f.name)}[{i}]")
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)


def to_dict(obj: Any) -> Any:
    """Plain-data view of a dataclass tree (for YAML dumps, TensorBoard hparams, checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (for example train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part; write it as key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is a value, not a section")
        node = nxt
    node[path[-1]] = value


__all__ = [
    "ConfigError",
    "apply_override",
    "coerce",
    "deep_merge",
    "field_error",
    "from_dict",
    "parse_override",
    "to_dict",
    "validate_tree",
]
