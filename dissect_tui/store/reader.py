"""Reading caches: read-only connections, clear errors for bad files, typed accessors.

Every user-provided value reaches SQL as a bound parameter. ``CacheReader`` also wraps a
writer's connection (relabel and evaluate read the copy they are about to extend).
"""

from __future__ import annotations

import functools
import json
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import duckdb
import numpy as np

from dissect_tui.errors import CacheError
from dissect_tui.filesafety import describe_kind
from dissect_tui.signals import is_interrupt, track
from dissect_tui.store.schema import READABLE_VERSIONS, SCHEMA_VERSION, expected_columns
from dissect_tui.text import printable

T = TypeVar("T")
DUCKDB_MAGIC = b"DUCK"  # bytes 8-12 of every DuckDB file
# JSON columns of runs and the type each must decode to.
JSON_COLUMNS: dict[str, type] = {
    "probe": list,
    "hyperparameters": dict,
    "stage_seconds": dict,
    "settings": dict,
}
_BAD = object()


def parse_version(value: object) -> int | None:
    """meta.schema_version as an int; None unless it is plain digits ('2', never '2.0' or 'abc')."""
    text = str(value) if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None


def _plural(items: list[str], word: str) -> str:
    return word if len(items) == 1 else word + "s"


DEFAULT_CACHE_DIR = Path("cache")


@dataclass(frozen=True)
class LayerInfo:
    layer: str
    position: int
    n_units: int
    module_type: str | None
    output_shape: str | None


def open_cache(path: str | Path) -> CacheReader:
    """Open a cache read-only (several browsers may share it); raise CacheError on any problem.

    The file is validated once here (see ``CacheReader.check``): every relation and column of
    its schema version, a readable version, at least one run, well-formed runs.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CacheError(
            f"no cache at {path}: build one with `dissect-tui index MODEL --db {path}`"
        ) from None
    except OSError as exc:
        raise CacheError(f"cannot open {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is a folder, not a cache file")
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path} is {describe_kind(st.st_mode)}, not a cache file")
    if st.st_size == 0:
        raise CacheError(f"{path} is empty (0 bytes), not a dissect-tui cache")
    try:
        with path.open("rb") as fh:
            header = fh.read(12)
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc.strerror}") from None
    if header[8:12] != DUCKDB_MAGIC:  # anything else would get a confusing message from DuckDB
        raise CacheError(f"{path} is not a DuckDB file (is it a dissect-tui cache?)")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise CacheError(open_failure(path, exc)) from None
    track(con)
    reader = CacheReader(con, path)
    try:
        reader.check()
    except BaseException:
        con.close()
        raise
    return reader


def open_failure(path: Path, exc: BaseException) -> str:
    """One line for a DuckDB file that cannot be opened: held by a writer, or unreadable."""
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Could not set lock" in text or "Conflicting lock" in text:
        pid = re.search(r"\(PID (\d+)\)", text)
        who = f" (process {pid.group(1)})" if pid else ""
        return f"{path} is open for writing by another process{who}; wait for it to finish and retry"
    if "different configuration" in text:  # DuckDB: one configuration per file and process
        return f"{path} is already open in this process with other settings ({first})"
    return (
        f"{path} cannot be read as a DuckDB database (damaged, truncated, or written by another "
        f"DuckDB version): {first}"
    )


def reading(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for functions whose first argument is a CacheReader (or a method of one):
    a DuckDB error while reading becomes one CacheError line naming the file."""

    @functools.wraps(fn)
    def wrapper(reader: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(reader, *args, **kwargs)
        except duckdb.Error as exc:
            if is_interrupt(exc):
                raise
            raise CacheError(read_failure(getattr(reader, "path", None), exc)) from None

    return wrapper


def truncation(con: duckdb.DuckDBPyConnection, path: Path) -> str | None:
    """Why the file is shorter than the blocks its header says are in use, or None (DuckDB itself
    would only notice when a missing block is read, long after the file was opened)."""
    try:
        row = con.execute("SELECT block_size, used_blocks FROM pragma_database_size()").fetchall()
        size = path.stat().st_size
    except (duckdb.Error, OSError):
        return None
    if not row or row[0][0] is None or row[0][1] is None:
        return None
    # Free blocks at the end may be cut off the file; blocks in use never are.
    expected = int(row[0][0]) * int(row[0][1])
    if size < expected:
        return f"{path} is truncated ({size:,} bytes, its header counts {expected:,} bytes of blocks in use)"
    return None


def read_failure(path: Path | None, exc: BaseException) -> str:
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"cannot read {path or 'the cache'} (is the file damaged?): {first}"


class CacheReader:
    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path | None = None) -> None:
        self.con = con
        self.path = path

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation ------------------------------------------------------------------
    @reading
    def check(self) -> None:
        """A readable schema version, every relation and column it has, a run, sound runs rows."""
        name = self.path or "this file"
        if self.path is not None and (short := truncation(self.con, self.path)) is not None:
            raise CacheError(f"{short}; rebuild it with `dissect-tui index`")
        try:
            rows = self.con.execute("SELECT key, value FROM meta").fetchall()
        except duckdb.CatalogException:
            raise CacheError(f"{name} is a DuckDB file but not a dissect-tui cache (no meta table)") from None
        except duckdb.BinderException:
            raise CacheError(
                f"{name} is a DuckDB file but not a dissect-tui cache (its meta table is not ours)"
            ) from None
        meta = {str(k): v for k, v in rows}
        version = parse_version(meta.get("schema_version"))
        if version is None:
            if "schema_version" not in meta:
                raise CacheError(f"{name} is a DuckDB file but not a dissect-tui cache (no schema version)")
            raise CacheError(
                f"{name} has an unreadable cache schema version {printable(str(meta['schema_version']))!r}; "
                "the file is damaged or not a dissect-tui cache"
            )
        if version not in READABLE_VERSIONS:
            newer = version > SCHEMA_VERSION
            hint = "upgrade dissect-tui" if newer else "rebuild it with `dissect-tui index`"
            raise CacheError(
                f"{name} has cache schema version {version}, this dissect-tui reads version "
                f"{SCHEMA_VERSION}: {hint}"
            )
        present: dict[str, set[str]] = {}
        for table, column in self.con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall():
            present.setdefault(table, set()).add(column)
        if "runs" in present:
            n = self.con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
            if n == 0:
                raise CacheError(f"{name} holds no finished run (an interrupted index?); rebuild it")
        expected = expected_columns(version)
        missing_relations = [rel for rel in expected if rel not in present]
        missing_columns = [
            f"{rel}.{col}"
            for rel, cols in expected.items()
            if rel in present
            for col in cols
            if col not in present[rel]
        ]
        if missing_relations or missing_columns:
            parts = []
            if missing_relations:
                parts.append(f"no {_plural(missing_relations, 'relation')} {', '.join(missing_relations)}")
            if missing_columns:
                parts.append(f"no {_plural(missing_columns, 'column')} {', '.join(missing_columns)}")
            raise CacheError(
                f"{name} is damaged or incomplete (schema version {version}): {'; '.join(parts)}; "
                "rebuild it with `dissect-tui index`"
            )
        runs = self.runs()  # every JSON field parses, every relabel run leads to an index run
        for rec in runs:
            self.index_run(rec["run_id"], runs)

    # -- runs and layers -------------------------------------------------------------
    @reading
    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, JSON columns decoded; CacheError for a damaged row."""
        cur = self.con.execute("SELECT * FROM runs ORDER BY run_id")
        cols = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            rec = dict(zip(cols, values, strict=True))
            if rec.get("run_id") is None:
                raise CacheError(f"{self.path or 'this cache'} is damaged: a run has no run_id")
            for key, kind in JSON_COLUMNS.items():
                text = rec.get(key)
                if text is None:
                    continue
                try:
                    value = json.loads(text) if isinstance(text, str) else text
                except ValueError:
                    value = _BAD
                if not isinstance(value, kind):
                    raise CacheError(
                        f"{self.path or 'this cache'} is damaged: runs.{key} of run {rec['run_id']} is not "
                        f"a JSON {kind.__name__}"
                    )
                rec[key] = value
            if "template" not in rec:  # schema version 1 kept the template inside clip_key
                key = str(rec.get("clip_key") or "")
                rec["template"] = key.split("|template=", 1)[1] if "|template=" in key else None
            out.append(rec)
        return out

    @reading
    def run(self, run_id: int | None = None) -> dict[str, Any]:
        runs = self.runs()
        if run_id is None:
            return runs[-1]
        for rec in runs:
            if rec["run_id"] == run_id:
                return rec
        raise CacheError(f"no run {run_id} in {self.path}; runs: {', '.join(str(r['run_id']) for r in runs)}")

    @reading
    def latest_run_id(self) -> int:
        return int(self.con.execute("SELECT max(run_id) FROM runs").fetchall()[0][0])

    @reading
    def index_run(
        self, run_id: int | None = None, runs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The index run that produced the activations a (relabel) run is based on."""
        runs = self.runs() if runs is None else runs
        by_id = {rec["run_id"]: rec for rec in runs}
        rec = by_id[run_id] if run_id in by_id else self.run(run_id)  # "no run N" when unknown
        seen = {rec["run_id"]}
        while rec.get("kind") != "index" and rec.get("parent_run_id") is not None:
            parent = rec["parent_run_id"]
            if parent in seen:
                raise CacheError(
                    f"{self.path or 'this cache'} is damaged: run {rec['run_id']} descends from itself "
                    f"(parent_run_id {parent})"
                )
            if parent not in by_id:
                raise CacheError(
                    f"{self.path or 'this cache'} is damaged: run {rec['run_id']} names parent run {parent}, "
                    "which is not in the file"
                )
            seen.add(parent)
            rec = by_id[parent]
        return rec

    @reading
    def layers(self) -> list[LayerInfo]:
        rows = self.con.execute(
            "SELECT layer, position, n_units, module_type, output_shape FROM layers ORDER BY position"
        ).fetchall()
        return [LayerInfo(*r) for r in rows]

    # -- neurons -----------------------------------------------------------------------
    @reading
    def neurons(self, run_id: int) -> dict[str, np.ndarray]:
        """Columns layer, unit, label, concept_id, similarity, interpretable for one run."""
        return self.con.execute(
            "SELECT n.layer, n.unit, n.label, n.concept_id, n.similarity, n.interpretable "
            "FROM neurons n JOIN layers l USING (layer) WHERE n.run_id = ? ORDER BY l.position, n.unit",
            [run_id],
        ).fetchnumpy()

    @reading
    def neuron_concepts(
        self, run_id: int, layer: str | None = None, unit: int | None = None, limit: int = 10
    ) -> list[tuple[str, int, int, str, float]]:
        """(layer, unit, rank, text, score) rows, best first, up to ``limit`` per neuron."""
        sql = (
            "SELECT nc.layer, nc.unit, nc.rank, c.text, nc.score FROM neuron_concepts nc "
            "JOIN concepts c USING (concept_id) WHERE nc.run_id = ? AND nc.rank <= ?"
        )
        params: list[Any] = [run_id, limit]
        if layer is not None:
            sql += " AND nc.layer = ?"
            params.append(layer)
        if unit is not None:
            sql += " AND nc.unit = ?"
            params.append(unit)
        return self.con.execute(sql + " ORDER BY nc.layer, nc.unit, nc.rank", params).fetchall()

    @reading
    def top_images(self, layer: str, unit: int, limit: int = 10) -> list[tuple[int, int, float, str]]:
        """(rank, image_id, activation, path) for one neuron, best first."""
        return self.con.execute(
            "SELECT t.rank, t.image_id, t.activation, i.path FROM top_images t JOIN images i USING (image_id) "
            "WHERE t.layer = ? AND t.unit = ? AND t.rank <= ? ORDER BY t.rank",
            [layer, unit, limit],
        ).fetchall()

    @reading
    def layer_top_images(self, layer: str, n: int = 100) -> np.ndarray:
        """[K, n] image ids of every neuron's top images (best first)."""
        k = self.n_units(layer)
        rows = self.con.execute(
            "SELECT unit, rank, image_id FROM top_images WHERE layer = ? AND rank <= ? ORDER BY unit, rank",
            [layer, n],
        ).fetchnumpy()
        ids = rows["image_id"].astype(np.int64)
        units = rows["unit"].astype(np.int64)
        per_unit = len(ids) // k if k else 0
        if k == 0 or len(ids) != k * per_unit or not np.array_equal(units, np.repeat(np.arange(k), per_unit)):
            raise CacheError(
                f"{self.path or 'this cache'} is damaged: the top images of layer {printable(layer)!r} do not "
                f"cover its {k} units equally"
            )
        return ids.reshape(k, per_unit)

    @reading
    def n_units(self, layer: str) -> int:
        """Units of a layer (layers.n_units); CacheError for an unknown layer."""
        k = self.con.execute("SELECT n_units FROM layers WHERE layer = ?", [layer]).fetchall()
        if not k:
            raise CacheError(f"no layer {printable(layer)!r} in this cache")
        return int(k[0][0])

    def check_activation_rows(self, layer: str, lengths: np.ndarray, k: int) -> None:
        bad = np.flatnonzero(lengths != k)
        if len(bad):
            raise CacheError(
                f"{self.path or 'this cache'} is damaged: {len(bad)} activation row(s) of layer "
                f"{printable(layer)!r} have {int(lengths[bad[0]])} values, the layer has {k} units"
            )

    @reading
    def thumbnail(self, image_id: int) -> bytes | None:
        row = self.con.execute("SELECT jpeg FROM thumbnails WHERE image_id = ?", [image_id]).fetchall()
        return bytes(row[0][0]) if row else None

    @reading
    def image(self, image_id: int) -> dict[str, Any] | None:
        cur = self.con.execute("SELECT * FROM images WHERE image_id = ?", [image_id])
        row = cur.fetchall()
        return dict(zip([d[0] for d in cur.description], row[0], strict=True)) if row else None

    # -- activations and embeddings ----------------------------------------------------
    @reading
    def unit_activations(self, layer: str, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, values) of one neuron over every decoded probe image."""
        k = self.n_units(layer)
        if not 0 <= unit < k:
            raise CacheError(f"no unit {unit} in layer {printable(layer)!r}, it has units 0-{k - 1}")
        rows = self.con.execute(
            "SELECT image_id, acts[?] AS v, len(acts) AS n FROM activation_rows WHERE layer = ? ORDER BY image_id",
            [unit + 1, layer],
        ).fetchnumpy()
        self.check_activation_rows(layer, rows["n"].astype(np.int64), k)
        return rows["image_id"].astype(np.int64), rows["v"].astype(np.float32)

    @reading
    def layer_activations(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids [N], acts [N, K]) of one layer."""
        k = self.n_units(layer)
        tbl = self._arrow(
            "SELECT image_id, acts FROM activation_rows WHERE layer = ? ORDER BY image_id", [layer]
        )
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        acts_col = tbl.column("acts").combine_chunks()
        self.check_activation_rows(layer, np.asarray(acts_col.value_lengths().fill_null(-1)), k)
        # a writable copy: callers hand these to torch, which warns on read-only buffers
        flat = np.array(acts_col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        return ids, flat.reshape(len(ids), k)

    def iter_layer_activations(self, layer: str, rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image_ids [n], acts [n, K]) of one layer, ``rows`` images at a time, in image id order:
        a layer larger than memory can be read through."""
        k = self.n_units(layer)
        rows = max(1, rows)
        try:
            batches = self.con.sql(
                "SELECT image_id, acts FROM activation_rows WHERE layer = ? ORDER BY image_id", params=[layer]
            ).to_arrow_reader(rows)
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                ids = batch.column(0).to_numpy().astype(np.int64)
                acts_col = batch.column(1)
                self.check_activation_rows(layer, np.asarray(acts_col.value_lengths().fill_null(-1)), k)
                flat = np.array(acts_col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
                yield ids, flat.reshape(len(ids), k)
        except duckdb.Error as exc:
            if is_interrupt(exc):
                raise
            raise CacheError(read_failure(self.path, exc)) from None

    @reading
    def image_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids [N], emb [N, D]) in image_id order."""
        tbl = self._arrow("SELECT image_id, emb FROM image_embeddings ORDER BY image_id")
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        flat = np.array(
            tbl.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32
        )
        return ids, flat.reshape(len(ids), -1)

    @reading
    def run_concepts(self, run_id: int) -> tuple[np.ndarray, list[str]]:
        rows = self.con.execute(
            "SELECT rc.concept_id, c.text FROM run_concepts rc JOIN concepts c USING (concept_id) "
            "WHERE rc.run_id = ? ORDER BY rc.position",
            [run_id],
        ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

    @reading
    def concept_embeddings(self, clip_key: str, concept_ids: np.ndarray) -> np.ndarray:
        """[len(concept_ids), D] in the given order; raises if any is missing."""
        tbl = self._arrow("SELECT concept_id, emb FROM concept_embeddings WHERE clip_key = ?", [clip_key])
        ids = tbl.column("concept_id").to_numpy()
        flat = tbl.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        emb = flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)
        where = {int(c): i for i, c in enumerate(ids)}
        try:
            order = [where[int(c)] for c in concept_ids]
        except KeyError as exc:
            raise CacheError(f"concept {exc.args[0]} has no stored embedding for {clip_key}") from None
        return emb[order]

    @reading
    def embeddings_by_text(self, clip_key: str, texts: list[str]) -> dict[str, np.ndarray]:
        """Stored embeddings of whichever of these texts this text tower has already encoded."""
        tbl = self._arrow(
            "SELECT c.text, e.emb FROM concepts c JOIN concept_embeddings e USING (concept_id) WHERE e.clip_key = ?",
            [clip_key],
        )
        if tbl.num_rows == 0:
            return {}
        flat = tbl.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        emb = np.array(flat, dtype=np.float32).reshape(tbl.num_rows, -1)
        row_of = {text: i for i, text in enumerate(tbl.column("text").to_pylist())}
        return {t: emb[row_of[t]] for t in texts if t in row_of}

    @reading
    def image_softmax(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.con.execute(
            "SELECT image_id, lse FROM image_softmax WHERE run_id = ? ORDER BY image_id", [run_id]
        ).fetchnumpy()
        return rows["image_id"].astype(np.int64), rows["lse"].astype(np.float32)

    @reading
    def linear_weights(self, layer: str) -> tuple[str | None, np.ndarray, np.ndarray | None] | None:
        """(input_layer, W [C, K], b [C] or None) of a stored classifier layer, or None."""
        tbl = self._arrow(
            "SELECT input_layer, weight, bias FROM linear_weights WHERE layer = ? ORDER BY unit", [layer]
        )
        if tbl.num_rows == 0:
            return None
        weight = tbl.column("weight").combine_chunks()
        lengths = np.asarray(weight.value_lengths().fill_null(-1))
        if len(np.unique(lengths)) != 1 or lengths[0] < 1:
            raise CacheError(
                f"{self.path or 'this cache'} is damaged: the weight rows of layer {printable(layer)!r} differ in length"
            )
        flat = weight.flatten().to_numpy(zero_copy_only=False)
        w = flat.astype(np.float32).reshape(tbl.num_rows, -1)
        bias = tbl.column("bias").to_numpy(zero_copy_only=False)
        b = None if tbl.column("bias").null_count == tbl.num_rows else bias.astype(np.float32)
        return tbl.column("input_layer")[0].as_py(), w, b

    def _arrow(self, sql: str, params: list[Any] | None = None) -> Any:
        """Query straight to an Arrow table (the DB-API path would copy the rows once more)."""
        return self.con.sql(sql, params=params or []).to_arrow_table()

    # -- free SQL --------------------------------------------------------------------
    def query(
        self, sql: str, params: list[Any] | None = None, limit: int | None = None
    ) -> tuple[list[str], list[tuple]]:
        """Run any read-only query; returns (column names, rows). Errors become CacheError."""
        # A cursor of its own: a partly fetched result must not block the next query.
        cur = track(self.con.cursor())
        try:
            cur.execute(sql, params or [])
            if cur.description is None:
                return [], []
            cols = [d[0] for d in cur.description]
            rows = cur.fetchmany(limit) if limit is not None else cur.fetchall()
        except duckdb.Error as exc:
            if is_interrupt(exc):
                raise
            raise CacheError(f"SQL error: {str(exc).splitlines()[0]}") from None
        finally:
            cur.close()
        return cols, rows


def find_caches(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[Path]:
    """The *.duckdb files in the cache folder, newest first (temporary files excluded)."""
    if not cache_dir.is_dir():
        return []
    files = [p for p in cache_dir.glob("*.duckdb") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


@overload
def resolve_cache(arg: str, cache_dir: Path = ...) -> Path: ...
@overload
def resolve_cache(arg: None, cache_dir: Path = ...) -> None: ...
def resolve_cache(arg: str | None, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path | None:
    """A path as given, or a model name resolved to cache/NAME.duckdb; None when arg is None."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if path.exists() or path.suffix == ".duckdb" or "/" in arg:
        return path
    candidate = cache_dir / f"{cache_name(arg)}.duckdb"
    if candidate.exists():
        return candidate
    known = ", ".join(p.stem for p in find_caches(cache_dir)) or "none"
    raise CacheError(f"no cache for {arg!r} in {cache_dir}/ (caches there: {known})")


def cache_name(model_spec: str) -> str:
    """File-name-safe stem derived from a model name or custom factory spec."""
    stem = model_spec.rsplit("/", 1)[-1]
    stem = stem.replace(".py:", "_").replace(":", "_").replace(".", "_")
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "model"
