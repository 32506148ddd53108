"""Running a user's SQL on a cache: exact values, row counts, interrupts.

Shared by `dissect-tui sql` (store.export) and the browser's SQL screen (store.browse). The
connection is locked down first (store.lockdown); nothing here relies on filtering statements.

Exact values. DuckDB's Python client converts some types lossily: an INTERVAL of 1 month comes
back as 30 days, TIMESTAMP_NS loses its nanoseconds, ``DATE 'infinity'`` becomes 9999-12-31,
GEOMETRY comes as WKB bytes. Arrow (and so Parquet) cannot hold UHUGEINT above 10³⁸, TIME WITH
TIME ZONE offsets, BIT strings, BIGNUM, UNION or INTERVAL. For a SELECT whose result has such a
column, :func:`exact_text` rewrites the statement into a SELECT over it that fetches that column
as DuckDB's own text (``CAST(… AS VARCHAR)``), the text the duckdb shell prints; other columns and
other statements are untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal, NoReturn

import duckdb

from dissect_tui.errors import CacheError
from dissect_tui.store.reader import CacheReader

Target = Literal["python", "arrow"]

# Fetched as text for Python values (tables, CSV, JSON): anywhere in the type, nested included.
_TEXT_FOR_PYTHON = re.compile(r"\b(INTERVAL|TIMESTAMP_NS|TIME_NS|GEOMETRY|VARIANT)\b")
# ... and at the top level only, for ±infinity (nested dates keep Python's date objects).
_TEXT_FOR_PYTHON_TOP = frozenset(
    {"DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_S", "TIMESTAMP_MS"}
)
# Fetched as text for Arrow / Parquet.
_TEXT_FOR_ARROW = re.compile(
    r"\b(INTERVAL|UHUGEINT|TIME WITH TIME ZONE|TIME_NS|BIT|BIGNUM|VARINT|UNION|VARIANT|GEOMETRY)\b"
)


def statements(reader: CacheReader, query: str) -> list[duckdb.Statement]:
    """The statements of a query text, by DuckDB's own parser (ParserException on bad SQL)."""
    return list(reader.con.extract_statements(query))


def _body(statement: str) -> str:
    """A statement without its final semicolon, so it can sit inside another statement."""
    return statement.strip().rstrip(";").rstrip()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_select(reader: CacheReader, statement: str) -> bool:
    try:
        parsed = statements(reader, statement)
    except duckdb.Error:
        return False
    return len(parsed) == 1 and parsed[0].type == duckdb.StatementType.SELECT


def describe(reader: CacheReader, statement: str) -> list[tuple[str, str]] | None:
    """(name, DuckDB type) of a SELECT statement's result columns, bound but not run; None if unknown."""
    if not _is_select(reader, statement):
        return None
    try:
        rows = reader.con.execute("DESCRIBE " + _body(statement)).fetchall()
    except duckdb.Error:
        return None
    return [(str(r[0]), str(r[1])) for r in rows]


def _as_text(type_name: str, target: Target) -> bool:
    if target == "arrow":
        return _TEXT_FOR_ARROW.search(type_name) is not None
    return type_name in _TEXT_FOR_PYTHON_TOP or _TEXT_FOR_PYTHON.search(type_name) is not None


def exact_text(reader: CacheReader, statement: str, target: Target = "python") -> str:
    """``statement``, or a SELECT over it that fetches the columns ``target`` would distort as text.

    Column names and order stay as they were. Statements other than SELECT are returned unchanged.
    """
    columns = describe(reader, statement)
    if not columns or not any(_as_text(t, target) for _, t in columns):
        return statement
    # Positional references (#1, #2 …) also work for results with duplicate column names.
    select = ", ".join(
        (f"CAST(#{i} AS VARCHAR)" if _as_text(t, target) else f"#{i}") + f" AS {_ident(name)}"
        for i, (name, t) in enumerate(columns, 1)
    )
    # The newline ends a trailing -- comment of the statement before the closing parenthesis.
    text = f"SELECT {select} FROM (\n{_body(statement)}\n) AS _dissect_q"
    try:
        reader.con.execute("DESCRIBE " + text).fetchall()
    except duckdb.Error:
        return statement  # a statement this cannot wrap: run it as written
    return text


def count_rows(reader: CacheReader, statement: str) -> int | None:
    """How many rows a SELECT statement returns, by a count-only query; None for other statements.

    Runs on ``reader``'s cursor (so after earlier statements of the same session). The count is a
    second run of the query: for one with random results (random(), USING SAMPLE) it counts
    another draw.
    """
    if not _is_select(reader, statement):
        return None
    return int(
        reader.con.execute(f"SELECT count(*) FROM (\n{_body(statement)}\n) AS _dissect_q").fetchall()[0][0]
    )


def is_interrupt(exc: BaseException) -> bool:
    """True for a query stopped by ``interrupt()`` or by Ctrl-C (DuckDB's Python client reports
    SIGINT during a query as ``RuntimeError('Query interrupted')``)."""
    if isinstance(exc, duckdb.InterruptException):
        return True
    return isinstance(exc, RuntimeError) and "interrupted" in str(exc).lower()


def reraise_query_error(exc: BaseException) -> NoReturn:
    """Ctrl-C during a query (DuckDB reports it as an interrupt error) → KeyboardInterrupt, so a
    command exits 130; a DuckDB error → CacheError with one line; anything else as it is."""
    from dissect_tui.store.export import sql_error_message

    if isinstance(exc, KeyboardInterrupt) or is_interrupt(exc):
        raise KeyboardInterrupt from None
    if isinstance(exc, duckdb.Error):
        raise CacheError(sql_error_message(exc)) from None
    raise exc


def arrow_batches(reader: CacheReader, statement: str, batch: int = 65_536) -> tuple[Any, Iterator[Any]]:
    """(Arrow schema, record batches) of one statement's result, streamed, for writing Parquet.

    Columns Arrow cannot hold faithfully come as DuckDB's text (:func:`exact_text`); duplicate
    column names get a suffix (a, a_1). Errors as :func:`reraise_query_error`; a statement
    without a result is CacheError.
    """
    import pyarrow as pa

    from dissect_tui.sql_format import unique_names

    try:
        rel = reader.con.sql(exact_text(reader, statement, "arrow"))
        if rel is None:
            raise CacheError("the statement returned no result to write")
        stream = rel.to_arrow_reader(batch)
    except BaseException as exc:
        reraise_query_error(exc)
    names = unique_names(list(stream.schema.names))
    schema = pa.schema([f.with_name(n) for f, n in zip(stream.schema, names, strict=True)])

    def batches() -> Iterator[Any]:
        while True:
            try:
                chunk = stream.read_next_batch()
            except StopIteration:
                return
            except BaseException as exc:
                reraise_query_error(exc)
            yield pa.RecordBatch.from_arrays(chunk.columns, schema=schema)

    return schema, batches()


def count_result(reader: CacheReader, sql: str, fetched: int, batch: int = 65_536) -> int:
    """Rows of the last statement of ``sql`` after ``run_user_query`` fetched ``fetched`` of them:
    a count-only query for a SELECT, else the rest of the pending result drained on the cursor.
    Errors as :func:`reraise_query_error`."""
    try:
        parsed = statements(reader, sql)
        last = parsed[-1].query if parsed else ""
        if parsed and parsed[-1].type == duckdb.StatementType.SELECT:
            n = count_rows(reader, last)
            if n is not None:
                return n
        n = fetched
        while chunk := reader.con.fetchmany(batch):
            n += len(chunk)
        return n
    except BaseException as exc:
        reraise_query_error(exc)
