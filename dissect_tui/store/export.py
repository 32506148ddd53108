"""Exporting neuron labels to CSV or Parquet, and streaming free SQL results.

The CSV starts with the columns the CLIP-Dissect reference implementation writes to its
results file (``layer,unit,description,similarity``) so existing scripts keep working, then
adds ours. Files are written beside the destination and renamed into place, so a failed
export never leaves a half-written file. Every user value reaches SQL as a bound parameter.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from dissect_tui import signals
from dissect_tui.errors import CacheError, UserError
from dissect_tui.filesafety import remove_stale_temporaries, tmp_name, writable_target
from dissect_tui.signals import is_interrupt, track
from dissect_tui.store.reader import CacheReader

# Reference columns first, exactly as CLIP-Dissect's describe_neurons.py writes them.
REFERENCE_COLUMNS = ("layer", "unit", "description", "similarity")
COLUMNS = (*REFERENCE_COLUMNS, "interpretable", "concept_id", "top_concepts", "run_id")
TOP_CONCEPTS = 5  # texts in the top_concepts column, and what --match searches besides the label
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def export_format(path: str | Path, fmt: str | None = None) -> str:
    """'csv' or 'parquet' from an explicit format or the file suffix; UserError otherwise."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in ("csv", "parquet"):
            raise UserError(f"unknown export format {fmt!r}: use csv or parquet")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"cannot tell the format of {Path(path).name!r} from its suffix: name it .csv or .parquet"
        )
    return FORMATS[suffix]


def _neurons_sql(
    run_id: int,
    keys: Sequence[tuple[str, int]] | None,
    cutoff: float,
    layers: Sequence[str] | None,
    interpretable_only: bool,
    text: str | None,
) -> tuple[str, list[Any]]:
    params: list[Any] = [TOP_CONCEPTS, run_id, cutoff, run_id]
    where = ["n.run_id = ?"]
    if layers:
        where.append("list_contains(?::VARCHAR[], n.layer)")
        params.append(list(layers))
    if keys is not None:
        # Pinned neurons arrive as two parallel lists, zipped back into rows by unnest.
        where.append(
            "EXISTS (SELECT 1 FROM (SELECT unnest(?::VARCHAR[]) AS layer, unnest(?::INTEGER[]) AS unit) k "
            "WHERE k.layer = n.layer AND k.unit = n.unit)"
        )
        params += [[k[0] for k in keys], [int(k[1]) for k in keys]]
    if interpretable_only:
        where.append("n.similarity > ?")
        params.append(cutoff)
    if text:
        # contains() takes the text literally: no LIKE wildcards (% _) to escape.
        where.append(
            "(contains(lower(n.label), lower(?)) OR list_bool_or(list_transform(t.texts, "
            "lambda x: contains(lower(x), lower(?)))))"
        )
        params += [text, text]
    sql = f"""
        WITH top AS (
            SELECT nc.layer, nc.unit, list(c.text ORDER BY nc.rank) AS texts
            FROM neuron_concepts nc JOIN concepts c USING (concept_id)
            WHERE nc.rank <= ? AND nc.run_id = ?
            GROUP BY nc.layer, nc.unit
        )
        SELECT n.layer, n.unit, n.label AS description, n.similarity,
               n.similarity > ? AS interpretable, n.concept_id,
               array_to_string(coalesce(t.texts, []), '; ') AS top_concepts, n.run_id
        FROM neurons n
        JOIN layers l USING (layer)
        LEFT JOIN top t ON t.layer = n.layer AND t.unit = n.unit
        WHERE {" AND ".join(where)}
        ORDER BY l.position, n.unit
    """
    return sql, params


def neuron_table(
    reader: CacheReader,
    run_id: int,
    keys: Sequence[tuple[str, int]] | None = None,
    cutoff: float | None = None,
    layers: Sequence[str] | None = None,
    interpretable_only: bool = False,
    text: str | None = None,
) -> pa.Table:
    """The export's rows as an Arrow table (columns COLUMNS), after checking run and layers."""
    run = reader.run(run_id)  # CacheError listing the runs when there is no such run
    if cutoff is None:
        cutoff = run.get("cutoff")
        if cutoff is None:
            raise UserError(f"run {run_id} records no interpretability cutoff: pass one with --cutoff")
    if not math.isfinite(cutoff):
        raise UserError(f"--cutoff must be a finite number, got {cutoff}")
    if layers:
        known = [info.layer for info in reader.layers()]
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise UserError(
                f"no layer {', '.join(map(repr, unknown))} in this cache; layers: {', '.join(known)}"
            )
    text = text.strip() if text else None  # like the browser's filter box
    sql, params = _neurons_sql(run_id, keys, float(cutoff), layers, interpretable_only, text)
    try:
        return reader.con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as exc:
        if is_interrupt(exc):
            raise
        raise CacheError(f"cannot read neurons of run {run_id}: {str(exc).splitlines()[0]}") from None


def export_neurons(
    reader: CacheReader,
    run_id: int,
    path: str | Path,
    keys: Sequence[tuple[str, int]] | None = None,
    fmt: str | None = None,
    cutoff: float | None = None,
    layers: Sequence[str] | None = None,
    interpretable_only: bool = False,
    text: str | None = None,
    overwrite: bool = False,
    *,
    keep_order: bool = False,
    extra: Mapping[str, Sequence[float]] | None = None,
) -> int:
    """Write one run's neuron labels to CSV or Parquet; returns the number of neurons written.

    ``cutoff`` decides the interpretable column and ``interpretable_only`` (``similarity >
    cutoff``; default: the run's cutoff); when given, it is also written as a ``cutoff`` column.
    ``keys`` restricts to those (layer, unit) pairs, and with ``keep_order`` the rows come out
    in the order of ``keys`` (the browser's sort order) instead of network order. ``extra``
    adds float columns after the standard ones, name -> values aligned with ``keys`` (e.g. a
    concept query's scores). ``text`` is a case-insensitive substring of the label or one of the
    top concepts. The file is written beside ``path`` and renamed into place; ``overwrite``
    replaces an existing regular file (a symbolic link's target; the link stays), never a
    folder, a device or a FIFO.
    """
    path = Path(path).expanduser()
    fmt = export_format(path, fmt)
    extra = dict(extra or {})
    if extra:
        if keys is None:
            raise ValueError("extra columns need keys: their values are aligned with keys")
        for name, values in extra.items():
            if name in (*COLUMNS, "cutoff"):
                raise ValueError(f"extra column {name!r} would replace a standard column")
            if len(values) != len(keys):
                raise ValueError(f"extra column {name!r} has {len(values)} values for {len(keys)} keys")
    target = writable_target(path, "output file", UserError)
    if target.is_dir():
        raise UserError(f"{path} is a folder; give a file name ending in .csv or .parquet")
    if not target.parent.is_dir():
        raise UserError(f"folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in folder {target.parent}: choose another output file")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    table = neuron_table(reader, run_id, keys, cutoff, layers, interpretable_only, text)
    table = _arrange(table, keys, keep_order, extra, cutoff)
    remove_stale_temporaries(target)
    tmp = tmp_name(target)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            _write_csv(table, tmp)
        _move_into_place(tmp, target, overwrite, shown=path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with signals.deferred():  # a second Ctrl-C must not leave the temporary file behind
            try:
                tmp.unlink()
            except OSError:  # moved into place, never created, or a read-only file system
                pass
    return table.num_rows


def _arrange(
    table: pa.Table,
    keys: Sequence[tuple[str, int]] | None,
    keep_order: bool,
    extra: dict[str, Sequence[float]],
    cutoff: float | None,
) -> pa.Table:
    """Rows in the order of ``keys`` (keep_order), the cutoff column, the extra columns."""
    if keys is not None and (keep_order or extra):
        position: dict[tuple[str, int], int] = {}
        for i, (layer, unit) in enumerate(keys):
            position.setdefault((str(layer), int(unit)), i)
        rows = [
            position[(layer, int(unit))]
            for layer, unit in zip(
                table.column("layer").to_pylist(), table.column("unit").to_pylist(), strict=True
            )
        ]
        if keep_order:
            order = sorted(range(len(rows)), key=rows.__getitem__)
            table = table.take(pa.array(order, type=pa.int64()))
            rows = [rows[i] for i in order]
    if cutoff is not None:
        table = table.append_column("cutoff", pa.array([float(cutoff)] * table.num_rows, type=pa.float64()))
    for name, values in extra.items():
        col = [float(values[i]) for i in rows]
        table = table.append_column(name, pa.array(col, type=pa.float64()))
    return table


def _write_csv(table: pa.Table, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(table.column_names)
        for row in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            out.writerow(row)


def _move_into_place(tmp: Path, path: Path, overwrite: bool, shown: Path | None = None) -> None:
    shown = shown or path
    if overwrite:
        os.replace(tmp, path)
        return
    # link() fails if the name appeared meanwhile, where replace() would silently clobber it.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{shown} exists; pass --force to overwrite it") from None
    except OSError:  # a filesystem without hard links
        if os.path.lexists(path):
            raise UserError(f"{shown} exists; pass --force to overwrite it") from None
        os.replace(tmp, path)


def split_statements(reader: CacheReader, query: str) -> list[str]:
    """The statements of a query text, split by DuckDB's own parser; a parse error is CacheError."""
    try:
        return [st.query for st in reader.con.extract_statements(query)] or [query]
    except duckdb.Error as exc:
        raise CacheError(sql_error_message(exc)) from None


def stream_query(
    reader: CacheReader, sql: str, batch: int = 10_000, *, own_cursor: bool = True, exact: bool = True
) -> tuple[list[str], Iterator[tuple]]:
    """(column names, row iterator) of any query, fetched in batches so --csv streams big results.

    ``own_cursor``: run on a new cursor, closed when the rows are done; False runs on
    ``reader.con`` itself, so statements of one session see each other's temporary tables and
    variables. ``exact``: fetch the columns Python would distort as DuckDB's text (user_sql).
    Errors become CacheError("SQL error: …"); an interrupted query (Ctrl-C) KeyboardInterrupt.
    The connection should be locked down (store.lockdown): that, not this function, keeps it
    from writing files or changing settings.
    """
    from dissect_tui.store.user_sql import exact_text, reraise_query_error

    cur = track(reader.con.cursor()) if own_cursor else reader.con

    def done() -> None:
        if own_cursor:
            cur.close()

    try:
        cur.execute(exact_text(CacheReader(cur, reader.path), sql) if exact else sql)
    except BaseException as exc:
        done()
        reraise_query_error(exc)
    if cur.description is None:
        done()
        return [], iter(())
    cols = [d[0] for d in cur.description]

    def rows() -> Iterator[tuple]:
        try:
            while True:
                try:
                    chunk = cur.fetchmany(batch)
                except BaseException as exc:
                    reraise_query_error(exc)
                if not chunk:
                    return
                yield from chunk
        finally:
            done()

    return cols, rows()


def sql_error_message(exc: BaseException) -> str:
    """One line for a failed query, safe for a terminal; refusals of the read-only cache and of the
    locked-down connection say so plainly."""
    from dissect_tui.text import printable

    text = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if "read-only" in text or "read only" in text:
        return (
            "SQL error: the cache is opened read-only, so statements that change it "
            f"(INSERT, UPDATE, DELETE, CREATE, DROP …) are refused ({text})"
        )
    if "disabled by configuration" in text or "disabled through configuration" in text:
        return (
            "SQL error: only the cache can be read here: no other files, no network, no extensions "
            f"(COPY … TO, ATTACH, read_csv, INSTALL … are refused) ({text})"
        )
    if "configuration has been locked" in text:
        return f"SQL error: settings cannot be changed here (SET, PRAGMA, enable_logging …) ({text})"
    return f"SQL error: {text}"
