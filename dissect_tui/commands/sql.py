"""`dissect-tui sql DB QUERY`: run SQL on a cache, read-only in fact, and print the result.

For people: a table fitted to the terminal, or one `column: value` line per field when the
columns cannot fit (``--mode`` forces either). For programs: CSV or JSON of every row on stdout,
or a Parquet file. The connection is locked down (store.lockdown): SQL reads the cache and
nothing else — no files, no network, no extensions, no settings. Schema: docs/SQL.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from dissect_tui import signals
from dissect_tui.errors import UserError
from dissect_tui.sql_format import cell, csv_field, is_number, json_text, unique_names

DEFAULT_LIMIT = 1000
MODES = ("table", "line")
READABLE = 10  # a table column narrower than this (when its values are wider) is not worth reading
GAP = 2  # spaces between table columns
SPOOL_BYTES = 32 << 20  # CSV/JSON held in memory up to this size, then in an unlinked temporary file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sql",
        help="run read-only SQL on a cache",
        description="Run SQL (DuckDB dialect) on a cache and print the result. The cache is the only "
        "thing SQL can read: no other files, network, extensions or settings. Tables and views are "
        "documented in docs/SQL.md.",
        epilog='example: dissect-tui sql resnet50 "SELECT layer, count(*) FROM latest_neurons '
        'WHERE interpretable GROUP BY layer"',
    )
    p.add_argument("db", metavar="DB", help="cache file, or a model name resolved to cache/NAME.duckdb")
    p.add_argument("query", metavar="QUERY", help="the SQL text, or - to read it from stdin")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print every row as CSV (no truncation)")
    out.add_argument("--json", action="store_true", help="print every row as a JSON array of objects")
    out.add_argument("--parquet", metavar="FILE", help="write every row to a Parquet file")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="table, or line (one 'column: value' line per field); default: a table when the "
        "columns fit the terminal at a readable width, else lines",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"rows shown (default {DEFAULT_LIMIT}; 0 for all); --csv/--json/--parquet are never cut",
    )
    p.add_argument("--force", action="store_true", help="overwrite the --parquet file if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.store import open_cache, resolve_cache
    from dissect_tui.store.lockdown import lock_down
    from dissect_tui.store.reader import CacheReader

    query = sys.stdin.read() if args.query == "-" else args.query
    if not query.strip():
        raise UserError("empty query" + (" on stdin" if args.query == "-" else ""))
    if args.limit < 0:
        raise UserError("--limit must be 0 (no limit) or more")
    if args.mode and (args.csv or args.json or args.parquet):
        raise UserError("--mode is for the table on the terminal, not --csv/--json/--parquet")
    parquet = _parquet_target(args.parquet, args.force) if args.parquet else None
    db: Path = resolve_cache(args.db)  # DB is a required argument: never None
    if parquet is not None and parquet.exists() and Path(db).exists() and os.path.samefile(parquet, db):
        raise UserError(f"--parquet {parquet} is the cache itself; name another file")
    reader = open_cache(db)
    try:
        lock_down(reader.con)  # before any user SQL: read-only in fact, not by a statement filter
        # One cursor for the whole text, so statements see each other's temp tables and variables.
        # Tracked: a signal (Ctrl-C, SIGTERM, SIGHUP) interrupts a running statement (signals.py).
        session = CacheReader(signals.track(reader.con.cursor()), reader.path)
        return _run_statements(args, session, query, parquet)
    finally:
        reader.close()


def _run_statements(args: argparse.Namespace, session: Any, query: str, parquet: Path | None) -> int:
    from dissect_tui.store.export import split_statements, stream_query

    statements = split_statements(session, query)
    data = args.csv or args.json or parquet is not None
    if len(statements) > 1 and data:
        raise UserError(f"--csv/--json/--parquet write one result: got {len(statements)} statements")
    if parquet is not None:
        n = write_parquet(session, statements[0], parquet, args.force)
        print(f"{n:,} row{'s' if n != 1 else ''} written to {parquet}", file=sys.stderr)
        return 0
    if data:
        cols, rows = stream_query(session, statements[0], own_cursor=False)
        # Spooled, then copied out: a query that fails half-way prints nothing, not half a file.
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES, mode="w+", encoding="utf-8", newline="") as spool:
            (write_csv if args.csv else write_json)(cols, rows, spool)
            spool.seek(0)
            _copy_out(spool)
        return 0
    width = _terminal_width()
    # Like the duckdb shell: several statements print one result each, in order.
    for i, statement in enumerate(statements):
        cols, rows = stream_query(session, statement, own_cursor=False)
        if i:
            print()
        print_result(
            cols,
            rows,
            args.limit or None,
            mode=args.mode,
            width=width,
            count=lambda st=statement: _count(session, st),
        )
    return 0


def _terminal_width() -> int | None:
    """Columns of the terminal stdout writes to; None when it is not a terminal (never cut then)."""
    try:
        if not sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return max(20, shutil.get_terminal_size().columns)


def _count(session: Any, statement: str) -> int | None:
    from dissect_tui.store.user_sql import count_rows, reraise_query_error

    try:
        return count_rows(session, statement)
    except BaseException as exc:
        reraise_query_error(exc)


def _copy_out(spool: IO[str]) -> None:
    """Copy spooled text to stdout as UTF-8 bytes (data keeps every character, whatever the locale)."""
    out = sys.stdout
    buffer = getattr(out, "buffer", None)
    out.flush()
    while chunk := spool.read(1 << 20):
        if buffer is not None:
            buffer.write(chunk.encode("utf-8"))
        else:
            out.write(chunk)
    if buffer is not None:
        buffer.flush()


# -- writers -----------------------------------------------------------------------------------
def write_csv(cols: list[str], rows: Iterable[tuple], out: IO[str]) -> int:
    import csv

    writer = csv.writer(out, lineterminator="\n")
    if cols:
        writer.writerow(cols)
    n = 0
    for row in rows:
        writer.writerow([csv_field(v) for v in row])
        n += 1
    return n


def write_json(cols: list[str], rows: Iterable[tuple], out: IO[str]) -> int:
    """A JSON array of one object per row (duplicate column names get a suffix: a, a_1)."""
    import json

    keys = [json.dumps(name, ensure_ascii=False) + ": " for name in unique_names(cols)]
    out.write("[")
    n = 0
    for row in rows:
        out.write(",\n " if n else "\n ")
        out.write("{" + ", ".join(k + json_text(v) for k, v in zip(keys, row, strict=True)) + "}")
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


def _parquet_target(name: str, force: bool) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for --parquet")
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    return path


def write_parquet(session: Any, statement: str, path: Path, force: bool) -> int:
    """Write one statement's rows to ``path`` as Parquet, through a temporary file renamed into
    place (nothing is left behind on an error or Ctrl-C). Returns the number of rows."""
    import pyarrow.parquet as pq

    from dissect_tui.store.user_sql import arrow_batches

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        schema, batches = arrow_batches(session, statement)
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                n += batch.num_rows
        _move_into_place(tmp, path, force)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name appeared meanwhile, where replace() would clobber it
    except FileExistsError:
        raise UserError(f"{path} exists; pass --force to overwrite it") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise UserError(f"{path} exists; pass --force to overwrite it") from None
        os.replace(tmp, path)


# -- table and line output ------------------------------------------------------------------------
def _cut(text: str, width: int | None) -> str:
    """``text`` in at most ``width`` terminal cells, ending in … when cut; whole when width is None."""
    from rich.cells import cell_len, set_cell_size

    if width is None or cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    return set_cell_size(text, width - 1) + "…"


def fit_widths(widths: list[int], available: int) -> list[int] | None:
    """Column widths within ``available`` cells, the widest columns cut first; None when that would
    cut a column below a readable width (READABLE)."""
    if sum(widths) <= available:
        return widths
    if sum(min(w, READABLE) for w in widths) > available:
        return None
    lo, hi = READABLE, max(widths)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        if sum(min(w, mid) for w in widths) <= available:
            lo = mid
        else:
            hi = mid - 1
    return [min(w, lo) for w in widths]


def print_result(
    cols: list[str],
    rows: Iterator[tuple],
    limit: int | None,
    mode: str | None = None,
    width: int | None = None,
    count: Any = None,
    out: TextIO | None = None,
) -> int:
    """Print up to ``limit`` rows as a table or as lines; returns the rows shown.

    ``width``: the terminal's columns (cells are cut with … to fit), None for no cutting.
    ``count()``: the total number of rows, asked only when rows were left out.
    """
    from rich.console import Console

    from dissect_tui.text import printable

    console = Console(file=out or sys.stdout, width=width or 1_000_000, highlight=False, emoji=False)
    if not cols:
        console.print("ok (the statement returned no result)", style="dim", markup=False)
        return 0
    if cols == ["explain_key", "explain_value"]:
        # EXPLAIN: the plan is a drawing over several lines; print it as the duckdb shell does.
        for row in rows:
            for line in str(row[1]).splitlines():
                console.print(printable(line), markup=False, highlight=False, crop=False, soft_wrap=True)
        return 1
    shown: list[tuple] = []
    more = False
    for row in rows:
        if limit is not None and len(shown) == limit:
            more = True
            break
        shown.append(row)
    names = [printable(c) for c in cols]
    cells = [[cell(v) for v in row] for row in shown]
    widths = None
    if mode != "line":
        from rich.cells import cell_len

        natural = [max([cell_len(n)] + [cell_len(r[i]) for r in cells]) for i, n in enumerate(names)]
        widths = natural if width is None else fit_widths(natural, width - GAP * (len(cols) - 1))
        if widths is None and mode == "table":  # forced: the narrowest readable table
            widths = [min(w, READABLE) for w in natural]
    if widths is None:
        _print_lines(console, names, cells, shown, width)
    else:
        _print_table(console, names, cells, shown, widths)
    n = len(shown)
    if more:
        total = count() if count is not None else None
        if total is None:
            total = n + 1 + sum(1 for _ in rows)
        caption = f"first {n:,} of {total:,} rows shown (--limit N for more, --csv/--json/--parquet for all)"
    else:
        caption = f"{n:,} row{'s' if n != 1 else ''}"
    console.print(caption, style="dim", markup=False, crop=False, soft_wrap=True)
    return n


def _rule_char(console: Any) -> str:
    """A box-drawing line where the output can encode it (not on an ASCII or Latin-1 stdout)."""
    try:
        "─".encode(console.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "-"
    return "─"


def _print_table(
    console: Any, names: list[str], cells: list[list[str]], rows: list[tuple], widths: list[int]
) -> None:
    from rich.cells import cell_len
    from rich.text import Text

    numeric = [
        any(r[i] is not None for r in rows) and all(r[i] is None or is_number(r[i]) for r in rows)
        for i in range(len(names))
    ]

    def line(values: list[str], styles: list[str]) -> Text:
        text = Text(no_wrap=True, overflow="ignore")
        for i, (value, w) in enumerate(zip(values, widths, strict=True)):
            value = _cut(value, w)
            pad = " " * (w - cell_len(value))
            if i:
                text.append(" " * GAP)
            text.append(pad if numeric[i] else "")
            text.append(value, style=styles[i])
            if not numeric[i] and i < len(values) - 1:
                text.append(pad)
        return text

    console.print(line(names, ["bold"] * len(names)), crop=False, soft_wrap=True)
    console.print(
        Text(" " * GAP).join(Text(_rule_char(console) * w) for w in widths),
        style="dim",
        crop=False,
        soft_wrap=True,
    )
    for row, values in zip(rows, cells, strict=True):
        styles = ["dim" if v is None else "" for v in row]
        console.print(line(values, styles), crop=False, soft_wrap=True)


def _print_lines(
    console: Any, names: list[str], cells: list[list[str]], rows: list[tuple], width: int | None
) -> None:
    """Like the duckdb shell's `.mode line`: a separator per row, then `column: value` per field."""
    from rich.cells import cell_len
    from rich.text import Text

    name_w = max(cell_len(n) for n in names)
    value_w = None if width is None else max(READABLE, width - name_w - 2)
    dash = _rule_char(console)
    for k, (row, values) in enumerate(zip(rows, cells, strict=True), 1):
        rule = f"{dash * 2} row {k} "
        console.print(
            rule + dash * max(0, min(width or 40, 40) - cell_len(rule)),
            style="dim",
            crop=False,
            soft_wrap=True,
        )
        for name, value, v in zip(names, values, row, strict=True):
            text = Text(
                " " * (name_w - cell_len(name)) + name + ": ", style="bold", no_wrap=True, overflow="ignore"
            )
            text.append(_cut(value, value_w), style="dim" if v is None else "")
            console.print(text, crop=False, soft_wrap=True)
