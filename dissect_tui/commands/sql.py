"""`dissect-tui sql DB QUERY`: run a read-only SQL query on a cache and print the result.

A table for people (rich, capped at --limit rows), or CSV / JSON of every row for programs.
The schema is documented in docs/SQL.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TextIO

from dissect_tui.errors import UserError

DEFAULT_LIMIT = 1000
LIST_PREVIEW = 6  # list cells in the table show this many elements, then the length


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sql",
        help="run a read-only SQL query on a cache",
        description="Run a read-only SQL query (DuckDB dialect) on a cache and print the result. "
        "Tables and views are documented in docs/SQL.md.",
        epilog='example: dissect-tui sql resnet50 "SELECT layer, count(*) FROM latest_neurons '
        'WHERE interpretable GROUP BY layer"',
    )
    p.add_argument("db", metavar="DB", help="cache file, or a model name resolved to cache/NAME.duckdb")
    p.add_argument("query", metavar="QUERY", help="the SQL text, or - to read it from stdin")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print every row as CSV (no truncation)")
    out.add_argument("--json", action="store_true", help="print every row as a JSON array of objects")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"rows shown in the table (default {DEFAULT_LIMIT}; 0 for all); CSV/JSON are never cut",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.store import open_cache, resolve_cache
    from dissect_tui.store.export import split_statements, stream_query

    query = sys.stdin.read() if args.query == "-" else args.query
    if not query.strip():
        raise UserError("empty query" + (" on stdin" if args.query == "-" else ""))
    if args.limit < 0:
        raise UserError("--limit must be 0 (no limit) or more")
    reader = open_cache(resolve_cache(args.db))
    try:
        statements = split_statements(reader, query)
        if len(statements) > 1 and (args.csv or args.json):
            raise UserError(f"--csv/--json print one result: got {len(statements)} statements")
        # Like the duckdb shell: several statements print one table each, in order.
        for statement in statements:
            cols, rows = stream_query(reader, statement)
            if args.csv:
                write_csv(cols, rows, sys.stdout)
            elif args.json:
                write_json(cols, rows, sys.stdout)
            elif cols:
                print_table(cols, rows, args.limit or None)
    finally:
        reader.close()
    return 0


# -- cell formatting ------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    """A CSV/JSON-friendly value: blobs as hex, dates as ISO text, containers recursively."""
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, timedelta | Decimal):
        return str(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _cell(v: Any) -> str:
    """Short text for a table cell: floats to 6 significant digits, long lists abbreviated."""
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes | bytearray | memoryview):
        return f"<blob {len(bytes(v))} bytes>"
    if isinstance(v, list | tuple):
        head = ", ".join(_cell(x) for x in v[:LIST_PREVIEW])
        more = f", … ({len(v)} items)" if len(v) > LIST_PREVIEW else ""
        return f"[{head}{more}]"
    if isinstance(v, datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    return str(v)


# -- writers -----------------------------------------------------------------------------------
def write_csv(cols: list[str], rows: Iterable[tuple], out: TextIO) -> int:
    import csv

    writer = csv.writer(out, lineterminator="\n")
    if cols:
        writer.writerow(cols)
    n = 0
    for row in rows:
        # csv writes None as an empty field; lists as their JSON-like repr.
        writer.writerow([_csv_value(v) for v in row])
        n += 1
    return n


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float
    if isinstance(v, list | tuple | dict):
        import json

        return json.dumps(_plain(v), ensure_ascii=False)
    return _plain(v)


def write_json(cols: list[str], rows: Iterable[tuple], out: TextIO) -> int:
    import json
    import math

    def clean(v: Any) -> Any:
        v = _plain(v)
        if isinstance(v, float) and not math.isfinite(v):
            return None  # JSON has no NaN/Infinity
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    out.write("[")
    n = 0
    for row in rows:
        out.write(",\n " if n else "\n ")
        out.write(json.dumps({c: clean(v) for c, v in zip(cols, row, strict=True)}, ensure_ascii=False))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


def print_table(cols: list[str], rows: Iterator[tuple], limit: int | None) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        # Piped: no terminal width to respect, so never squash or ellipsise cells.
        console = Console(width=100_000)
    if not cols:
        console.print("ok (the statement returned no result)")
        return 0
    shown: list[tuple] = []
    truncated = False
    for row in rows:
        if limit is not None and len(shown) == limit:
            truncated = True
            break
        shown.append(row)
    numeric = [
        any(v is not None for v in col) and all(v is None or _is_number(v) for v in col)
        for col in (zip(*shown, strict=True) if shown else [()] * len(cols))
    ]
    n = len(shown)
    caption = f"{n} row{'s' if n != 1 else ''}"
    if truncated:
        caption = f"first {n} rows shown, more not shown (--limit N to change, --csv for all rows)"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for name, is_num in zip(cols, numeric, strict=True):
        table.add_column(name, justify="right" if is_num else "left", overflow="fold")
    for row in shown:
        # Text, not markup strings: cell values like "[x]" must print as written.
        table.add_row(*(Text(_cell(v), style="dim" if v is None else "") for v in row))
    console.print(table)
    # Below the table rather than a rich caption, which would wrap to a narrow table's width.
    console.print(Text(caption, style="dim"))
    return n
