"""Values of SQL results as text: short cells for people, exact CSV fields and JSON for programs.

Cells (:func:`cell`) are display text: control characters made visible (``printable``), one line,
lists abbreviated; show them as ``rich.text.Text``, never as markup. CSV fields and JSON
(:func:`csv_field`, :func:`json_text`) are data: strings keep every character, nothing is cut.

Every value DuckDB's Python client returns has a rendering here: None, bool, int (HUGEINT too),
float (NaN and ±inf included), Decimal, str (VARCHAR, ENUM, BIT, JSON, UUID text), bytes (BLOB),
uuid.UUID, date/time/datetime (with time zones), timedelta (INTERVAL), list/tuple (LIST, ARRAY,
unnamed STRUCT), dict (STRUCT, MAP). Anything else falls back to ``str()``.

No imports beyond the standard library: both the CLI and the TUI use this module.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from dissect_tui.text import printable

LIST_PREVIEW = 6  # list cells show this many elements, then the length
NULL = "NULL"


def is_number(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def interval_text(v: timedelta) -> str:
    """An interval as DuckDB prints one: ``32 days 00:00:03.5``, ``1 day``, ``-1 day -01:00:00``."""
    micros = (v.days * 86_400 + v.seconds) * 1_000_000 + v.microseconds
    sign = "-" if micros < 0 else ""
    days, micros = divmod(abs(micros), 86_400_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{sign}{days} day{'s' if days != 1 else ''}"] if days else []
    if seconds or minutes or hours or micros or not days:
        fraction = f".{micros:06d}".rstrip("0") if micros else ""
        parts.append(
            f"{sign if micros or seconds or minutes or hours else ''}{hours:02d}:{minutes:02d}:{seconds:02d}{fraction}"
        )
    return " ".join(parts)


def _scalar_text(v: Any) -> str:
    """Text of a non-container value (dates ISO 8601, blobs as hex, intervals as DuckDB prints them)."""
    if isinstance(v, datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, date | time):
        return v.isoformat()
    if isinstance(v, timedelta):
        return interval_text(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    return str(v)


# -- display -----------------------------------------------------------------------------------
def _short(v: Any, depth: int = 0) -> str:
    if v is None:
        return NULL
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes | bytearray | memoryview):
        return f"<blob {len(bytes(v))} bytes>"
    if isinstance(v, str):
        return repr(v) if depth else v  # quoted inside containers, so ['a, b'] differs from ['a', 'b']
    if isinstance(v, list | tuple):
        head = ", ".join(_short(x, depth + 1) for x in v[:LIST_PREVIEW])
        more = f", … ({len(v)} items)" if len(v) > LIST_PREVIEW else ""
        return f"[{head}{more}]"
    if isinstance(v, dict):
        items = list(v.items())
        head = ", ".join(f"{_short(k, depth + 1)}: {_short(x, depth + 1)}" for k, x in items[:LIST_PREVIEW])
        more = f", … ({len(items)} items)" if len(items) > LIST_PREVIEW else ""
        return "{" + head + more + "}"
    return _scalar_text(v)


def cell(v: Any) -> str:
    """One-line display text of a value, safe for a terminal: floats to 6 significant digits,
    lists and maps abbreviated, blobs as their size, control characters as visible stand-ins."""
    return printable(_short(v))


# -- CSV -----------------------------------------------------------------------------------------
def csv_field(v: Any) -> Any:
    """A value for ``csv.writer``: floats in their shortest exact form, containers as JSON text."""
    if v is None or isinstance(v, str | int):
        return v  # csv writes None as an empty field; bool as True/False
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; nan, inf, -inf
    if isinstance(v, list | tuple | dict):
        return json_text(v)
    return _scalar_text(v)


# -- JSON ----------------------------------------------------------------------------------------
_NON_FINITE = {"nan": '"NaN"', "inf": '"Infinity"', "-inf": '"-Infinity"'}


def _key(k: Any) -> str:
    """An object key: strings as they are, other MAP keys as their JSON text (1 → "1")."""
    return k if isinstance(k, str) else json_text(k)


def json_text(v: Any) -> str:
    """The JSON text of a value: exact numbers (HUGEINT, DECIMAL), NaN/±inf as the strings "NaN",
    "Infinity", "-Infinity" (JSON has no such numbers), blobs as hex, times as ISO 8601 strings."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else _NON_FINITE[repr(v)]
    if isinstance(v, Decimal):
        return str(v) if v.is_finite() else json.dumps(str(v))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(json_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(_key(k), ensure_ascii=False)}: {json_text(x)}" for k, x in v.items())
            + "}"
        )
    if isinstance(v, UUID):
        return f'"{v}"'
    return json.dumps(_scalar_text(v), ensure_ascii=False)


def unique_names(names: list[str]) -> list[str]:
    """Column names made unique for JSON objects: a second ``a`` becomes ``a_1`` (a suffix no other
    column has), so no value is lost to a duplicate key."""
    taken = set(names)
    used: set[str] = set()
    out: list[str] = []
    for name in names:
        new, n = name, 0
        while new in used or (n and new in taken):
            n += 1
            new = f"{name}_{n}"
        used.add(new)
        out.append(new)
    return out
