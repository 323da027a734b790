"""A small TOML writer for generated configs; its output round-trips through `tomllib`.

Supports strings, booleans, integers, floats (including inf/nan), dates and times, arrays,
inline tables inside arrays, tables, nested tables and arrays of tables. A table's plain values
are written before its sub-tables, so every key lands in the table it belongs to.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["dump", "dumps", "format_key", "format_string", "format_value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def format_string(text: str) -> str:
    """A TOML basic string with every character that needs it escaped."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"lone surrogate U+{code:04X} cannot be written as TOML")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def format_key(key: str) -> str:
    """A bare key when possible, else a quoted one."""
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, not {type(key).__name__}")
    return key if _BARE_KEY.fullmatch(key) else format_string(key)


def format_value(value: object) -> str:
    """One TOML value; tables become inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        if value.tzinfo is not None:
            raise ValueError("TOML local times have no UTC offset")
        return value.isoformat()
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{format_key(k)} = {format_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: object) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _emit(out: list[str], path: tuple[str, ...], table: Mapping[str, Any], header: str | None, force: bool) -> None:
    plain = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    arrays = [(k, v) for k, v in table.items() if _is_table_array(v)]
    if header is not None and (force or plain or not (tables or arrays)):
        if out:
            out.append("")
        out.append(header)
    out.extend(f"{format_key(k)} = {format_value(v)}" for k, v in plain)
    for key, sub in tables:
        sub_path = (*path, key)
        _emit(out, sub_path, sub, "[" + ".".join(map(format_key, sub_path)) + "]", force=False)
    for key, items in arrays:
        sub_path = (*path, key)
        for item in items:
            _emit(out, sub_path, item, "[[" + ".".join(map(format_key, sub_path)) + "]]", force=True)


def dumps(document: Mapping[str, Any]) -> str:
    """The TOML text of `document` (a mapping of str keys, as `tomllib.loads` returns)."""
    out: list[str] = []
    _emit(out, (), document, None, force=False)
    return "\n".join(out) + "\n" if out else ""


def dump(document: Mapping[str, Any], path: Path) -> None:
    """Write `dumps(document)` to `path` (UTF-8)."""
    path.write_text(dumps(document), encoding="utf-8")
