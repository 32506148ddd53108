"""Writing caches: build in a temporary file next to the target, then rename atomically.

DuckDB locks a file against every other process while a read-write connection is open, so a
cache that browsers may have open is never written in place: a new cache is built in
``.NAME.tmp-PID`` beside it (a relabel or evaluation copies the old one first) and
``os.replace`` swaps it in. On any failure, Ctrl-C, SIGTERM or SIGHUP the temporary file is
removed and the previous cache is untouched; one that SIGKILL left behind is removed by the
next writer of that cache (see dissect_tui.filesafety).

What may be replaced (``check_target``): nothing but a file positively identified as a
dissect-tui cache of a readable schema version, or an empty file. A user's DuckDB database, a
file another program holds open, a damaged or unreadable file, a device, a FIFO: refused with
one line. A symbolic link is followed: its target is replaced, the link stays. One process
at a time writes a cache (a lock file, ``.NAME.lock``, names the writer's PID).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa

from dissect_tui import __version__, filesafety, signals
from dissect_tui.errors import CacheError
from dissect_tui.store.activation_stream import (
    ActivationStream,
    StreamError,
    connect_for_stream,
    float_list_array,
)
from dissect_tui.store.arrow_views import registered
from dissect_tui.store.reader import DUCKDB_MAGIC, open_failure, parse_version, truncation
from dissect_tui.store.schema import (
    FORMAT_KEY,
    FORMAT_VALUE,
    OPTIONAL_TABLES,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    TABLES,
    VIEWS,
    embedding_tables,
)

T = TypeVar("T")


def _tmp_path(final: Path) -> Path:
    return filesafety.tmp_name(final)


def _remove_db_files(path: Path) -> None:
    filesafety.remove_db_files(path)


def _fixed_array(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), matrix.shape[1])


def check_target(final: Path) -> Path:
    """Fail before any work if a cache cannot be written at ``final``; returns the file to write.

    Refused: a folder; a folder that cannot be created or written; a device, FIFO or socket; a
    symbolic link to nothing; any existing non-empty file that is not positively a dissect-tui
    cache of a readable version (a user's DuckDB file, one another program holds open, a
    damaged one); a cache another dissect-tui process is writing. A symbolic link is followed:
    the returned path is its target. Takes this process's write lock on the cache (released by
    the CacheWriter's commit or abort, or at the end of the command) and removes temporary files
    that killed runs left beside it.
    """
    final = filesafety.writable_target(Path(final), "--db")
    if final.is_dir():
        raise CacheError(f"{final} is a folder: give --db a file path such as {final / 'model.duckdb'}")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CacheError(
            f"cannot create folder {parent} for {final}: a file of that name is in the way"
        ) from None
    except OSError as exc:
        raise CacheError(f"cannot create folder {parent} for {final}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CacheError(f"cannot write in folder {parent}: choose another --db")
    taken_here = not filesafety.holds(final)
    filesafety.acquire(final)
    try:
        filesafety.remove_stale_temporaries(final)
        refusal = replace_refusal(final)
        if refusal is not None:
            raise CacheError(refusal)
    except BaseException:
        if taken_here:
            filesafety.release(final)
        raise
    return final


def replace_refusal(path: Path) -> str | None:
    """None when ``path`` may be replaced by a new cache (absent, empty, or a dissect-tui cache of
    a readable version); otherwise one line saying why not and what to do instead."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror}"
    if not (st.st_mode & 0o170000 == 0o100000):  # a regular file (writable_target followed links)
        return (
            f"{path} is {filesafety.describe_kind(st.st_mode)}; refusing to replace it: choose another --db"
        )
    if st.st_size == 0:
        return None  # nothing in it to lose (e.g. made by mktemp for us)
    why = _not_a_cache(path)
    if why is None:
        return None
    return f"{why}; refusing to overwrite it: choose another --db, or delete the file yourself"


def _not_a_cache(path: Path) -> str | None:
    """Why the file at ``path`` is not a dissect-tui cache this version may replace, or None."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(12)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if header[8:12] != DUCKDB_MAGIC:
        return f"{path} exists and is not a dissect-tui cache"
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        return open_failure(path, exc)
    try:
        if (short := truncation(con, path)) is not None:
            return short
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "meta" not in tables:
            return f"{path} is a DuckDB database but not a dissect-tui cache"
        meta = dict(con.execute("SELECT CAST(key AS VARCHAR), CAST(value AS VARCHAR) FROM meta").fetchall())
    except duckdb.Error as exc:
        if signals.is_interrupt(exc):
            raise
        return f"{path} is a DuckDB database that cannot be read as a dissect-tui cache ({str(exc).splitlines()[0]})"
    finally:
        con.close()
    version = parse_version(meta.get("schema_version"))
    marked = meta.get(FORMAT_KEY) == FORMAT_VALUE
    legacy = (
        version == 1 and str(meta.get("created_by") or "").startswith("dissect-tui ") and "runs" in tables
    )
    if not (marked or legacy):
        return f"{path} is a DuckDB database but not a dissect-tui cache"
    if version not in READABLE_VERSIONS:
        return (
            f"{path} is a dissect-tui cache of schema version {meta.get('schema_version')!r}, which this "
            f"dissect-tui cannot read (it reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return None


def _is_cache_file(path: Path) -> bool:
    """A dissect-tui cache of a readable schema version (kept for callers of the old name)."""
    return _not_a_cache(Path(path)) is None


def _writing(fn: Callable[..., T]) -> Callable[..., T]:
    """A DuckDB or file-system error in a CacheWriter method becomes one CacheError line."""

    @functools.wraps(fn)
    def wrapper(self: CacheWriter, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except StreamError as exc:  # the activations' INSERT failed in its thread
            if isinstance(exc.cause, (duckdb.Error, OSError)) and not signals.is_interrupt(exc.cause):
                raise CacheError(self.failure(exc.cause)) from None
            raise exc.cause from None
        except (duckdb.Error, OSError) as exc:
            if signals.is_interrupt(exc):
                raise
            raise CacheError(self.failure(exc)) from None

    return wrapper


class CacheWriter:
    """A cache under construction. Use as a context manager; ``commit()`` moves it into place.

    ``base``: an existing cache to start from (relabel, evaluate); otherwise a new empty
    schema is created. ``final_path`` is the file that will be replaced: a symbolic link's target.
    """

    # While activations stream in (stream=True), one INSERT statement receives them all (see
    # activation_stream.py: DuckDB then writes row groups to the file as they fill and stays
    # near its memory limit for any width and number of images). The database is attached with
    # DuckDB's smallest row group, so a wide layer's unfinished row group stays small
    # (activation_stream.connect_for_stream).
    INGEST_BYTES = 16 << 20  # one slice of a rank's shard in memory at a time
    STREAM_BIG_INSERT = 16 << 20  # other inserts at least this large end the transaction

    def __init__(self, final_path: Path, base: Path | None = None, *, stream: bool = False) -> None:
        """``stream``: activations are appended (``append_activations``) while the images stage runs,
        with bounded memory (see activation_stream.py)."""
        self.requested_path = Path(final_path)
        self.stream = stream
        self.final_path = check_target(self.requested_path)  # takes the write lock
        self._committed = False
        self._closed = False
        self._stream_ended = False
        self._activations: ActivationStream | None = None  # the running INSERT of stream=True
        self._con: duckdb.DuckDBPyConnection | None = None
        lock = filesafety.acquire(self.final_path)
        if lock.writer_active:
            raise CacheError(f"{self.final_path} is already being written by this process")
        lock.writer_active = True
        self.tmp_path = _tmp_path(self.final_path)
        self._final_stat = _stat_or_none(self.final_path)
        try:
            _remove_db_files(self.tmp_path)
            if base is not None:
                try:
                    shutil.copyfile(base, self.tmp_path)
                except OSError as exc:
                    raise CacheError(f"cannot copy cache {base} to {self.tmp_path}: {_reason(exc)}") from None
            self._con = signals.track(self._connect())
            self._start(base)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (duckdb.Error, OSError)) and not signals.is_interrupt(exc):
                raise CacheError(self.failure(exc)) from None
            raise

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if not self.stream:
            return duckdb.connect(str(self.tmp_path))
        return connect_for_stream(self.tmp_path, "cache")

    @_writing
    def _start(self, base: Path | None) -> None:
        # Few transactions: DuckDB then writes each big insert once, at commit, instead of
        # committing (and checkpointing) insert by insert - 2x faster for 50k images x 3,904
        # neurons (bench/bench_cache_write.py). Streamed activations end it now and then
        # (end_stream); a failed build is removed whole either way (it is a temporary file).
        self.con.execute("BEGIN TRANSACTION")
        if base is None:
            self.con.execute(TABLES)
            self.con.execute(OPTIONAL_TABLES)
            self.con.execute(
                "INSERT INTO meta VALUES (?, ?), ('schema_version', ?), ('created_by', ?), ('created_at', ?)",
                [
                    FORMAT_KEY,
                    FORMAT_VALUE,
                    str(SCHEMA_VERSION),
                    f"dissect-tui {__version__}",
                    _now().isoformat(),
                ],
            )
        else:
            self._upgrade()

    @_writing
    def append_activations(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        """Activations of some images, as the images stage produces them (``stream=True``)."""
        if not self.stream or self._stream_ended:
            raise CacheError("activations can only be appended to a streamed build before end_stream")
        self._stream().put(layer, image_ids, acts)

    @_writing
    def end_stream(self) -> None:
        """Every activation is in: end the INSERT and commit, before scoring needs the memory.
        The database stays attached with its small row groups: reattaching with the default
        size made the final checkpoint rewrite every activation (2x the file and the time)."""
        if not self.stream or self._stream_ended:
            return
        self._stream_ended = True
        if self._activations is not None:
            stream, self._activations = self._activations, None
            stream.close()
        self.con.execute("COMMIT")
        self.con.execute("BEGIN TRANSACTION")

    @_writing
    def ingest_activations(self, shard: Path) -> None:
        """Copy another process's streamed activations (a torchrun rank's shard) into the cache,
        through the same INSERT as this process's own (append_activations).

        Read through a second, read-only connection in slices of about 16 MB: attaching the
        shard to this connection would leave it attached until the build's transaction
        ends (DuckDB 2.0.0 refuses DETACH inside it), holding every shard's disk space."""
        if not self.stream or self._stream_ended:
            raise CacheError("activations can only be ingested into a streamed build before end_stream")
        src = duckdb.connect(str(shard), read_only=True)
        try:
            row = src.execute("SELECT max(len(acts)) FROM activation_rows").fetchall()[0]
            width = int(row[0]) if row and row[0] else 1
            rows = max(1, self.INGEST_BYTES // (4 * width))
            reader = src.sql("SELECT layer, image_id, acts FROM activation_rows").to_arrow_reader(rows)
            for batch in reader:
                self._stream().put_batch(batch)
        finally:
            src.close()

    def _stream(self) -> ActivationStream:
        """The running activations INSERT, started by the first rows."""
        if self._activations is None:
            self._activations = ActivationStream(self.con)
        return self._activations

    def failure(self, exc: BaseException) -> str:
        """One line for an error while building the cache (a full disk is said plainly)."""
        kept = "the previous file is untouched" if self._final_stat is not None else "nothing was left behind"
        return f"cannot write the cache {self.final_path}: {_reason(exc)}; {kept}"

    def _upgrade(self) -> None:
        """Bring a copied older cache to SCHEMA_VERSION (1 -> 2: runs.template, the format marker)."""
        row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        if row and row[0][0] == "1":
            self.con.execute("ALTER TABLE runs ADD COLUMN template VARCHAR")
            self.con.execute(
                "UPDATE runs SET template = split_part(clip_key, '|template=', 2) "
                "WHERE contains(clip_key, '|template=')"
            )
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            self.con.execute(
                "INSERT INTO meta SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = ?)",
                [FORMAT_KEY, FORMAT_VALUE, FORMAT_KEY],
            )

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection to the temporary file (open from the end of ``__init__`` on)."""
        assert self._con is not None, "CacheWriter.con before the connection was opened"
        return self._con

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()
        if isinstance(exc, duckdb.Error) and not signals.is_interrupt(exc):  # from direct use of .con
            raise CacheError(self.failure(exc)) from None

    def commit(self) -> Path:
        """Commit, checkpoint, close and atomically replace the final path."""
        try:
            self.end_stream()
            self.con.execute("COMMIT")
            self.con.execute("CHECKPOINT cache" if self.stream else "CHECKPOINT")
            self.con.close()
            self._closed = True
            self._check_unchanged()
            with signals.deferred():  # the swap and its bookkeeping happen together or not at all
                os.replace(self.tmp_path, self.final_path)
                self._committed = True
                _remove_db_files(self.tmp_path)  # a stray .wal, if any
                self._release()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (duckdb.Error, OSError)) and not signals.is_interrupt(exc):
                raise CacheError(self.failure(exc)) from None
            raise
        return self.final_path

    def _check_unchanged(self) -> None:
        """The file to replace is still the one check_target accepted (or one just as replaceable)."""
        now = _stat_or_none(self.final_path)
        if now == self._final_stat:
            return
        refusal = replace_refusal(self.final_path)
        if refusal is not None:
            raise CacheError(f"{self.final_path} changed while the cache was being built: {refusal}")

    def abort(self) -> None:
        """Close and remove the temporary file (also after DuckDB declared the database invalid)."""
        if self._committed:
            return
        # New signals wait until the cleanup is done; one already pending may still interrupt a
        # step once, so each step runs in the finally of the one before.
        with signals.deferred():
            try:
                if self._activations is not None:
                    stream, self._activations = self._activations, None
                    stream.cancel()
                if self._con is not None and not self._closed:
                    self._closed = True
                    try:
                        self._con.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection must not mask the cause
                        pass
            finally:
                try:
                    _remove_db_files(self.tmp_path)
                finally:
                    self._release()

    def _release(self) -> None:
        filesafety.release(self.final_path)

    # -- helpers ---------------------------------------------------------------------
    def _insert_arrow(
        self, table: str, data: dict[str, Any], constants: dict[str, Any] | None = None
    ) -> None:
        """Bulk insert columns (Arrow arrays); ``constants`` fill whole columns from one bound value."""
        constants = constants or {}
        arrow = pa.table(data)
        cols = ", ".join([*constants, *data])
        select = ", ".join(["?" for _ in constants] + list(data))
        with registered(self.con, "_incoming", arrow):
            self.con.execute(
                f"INSERT INTO {table} ({cols}) SELECT {select} FROM _incoming", list(constants.values())
            )
        if self.stream and table != "activation_rows" and arrow.nbytes >= self.STREAM_BIG_INSERT:
            # top lists of wide layers are millions of rows: committed now, not all at the end,
            # where their sum would not fit the streamed build's memory limit
            self.con.execute("COMMIT")
            self.con.execute("BEGIN TRANSACTION")

    @_writing
    def has_table(self, name: str) -> bool:
        row = self.con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = current_database()",
            [name],
        ).fetchall()
        return bool(row and row[0][0])

    # -- runs ------------------------------------------------------------------------
    @_writing
    def add_run(self, **fields: Any) -> int:
        """Insert a runs row; dict/list values of JSON columns are serialised. Returns run_id."""
        row = self.con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchall()
        run_id = int(row[0][0]) if row else 1
        record: dict[str, Any] = {
            "run_id": run_id,
            "created_at": _now().replace(tzinfo=None),
            "software_version": __version__,
        }
        for key, value in fields.items():
            if key in ("probe", "hyperparameters", "stage_seconds", "settings") and not isinstance(
                value, str
            ):
                value = json.dumps(value, default=str)
            record[key] = value
        cols = ", ".join(record)
        marks = ", ".join("?" for _ in record)
        self.con.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", list(record.values()))
        return run_id

    @_writing
    def update_run(self, run_id: int, **fields: Any) -> None:
        for key, value in fields.items():
            if key in ("stage_seconds", "settings", "hyperparameters") and not isinstance(value, str):
                value = json.dumps(value, default=str)
            # column names come from our own code, never from the user
            self.con.execute(f"UPDATE runs SET {key} = ? WHERE run_id = ?", [value, run_id])

    # -- index-time data -------------------------------------------------------------
    @_writing
    def write_layers(self, layers: Sequence[dict[str, Any]]) -> None:
        for position, info in enumerate(layers):
            self.con.execute(
                "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?)",
                [
                    info["layer"],
                    position,
                    int(info["n_units"]),
                    info.get("module_type"),
                    info.get("output_shape"),
                    info.get("pool"),
                ],
            )

    @_writing
    def write_images(
        self,
        paths: Sequence[str],
        sources: Sequence[str],
        sizes: Sequence[tuple[int, int] | None],
        errors: Sequence[str | None],
    ) -> None:
        n = len(paths)
        self._insert_arrow(
            "images",
            {
                "image_id": pa.array(np.arange(n, dtype=np.int32)),
                "path": pa.array(list(paths), type=pa.string()),
                "source": pa.array(list(sources), type=pa.string()),
                "width": pa.array([s[0] if s else None for s in sizes], type=pa.int32()),
                "height": pa.array([s[1] if s else None for s in sizes], type=pa.int32()),
                "ok": pa.array([e is None for e in errors], type=pa.bool_()),
                "error": pa.array(list(errors), type=pa.string()),
            },
        )

    @_writing
    def write_thumbnails(self, thumbs: dict[int, bytes]) -> None:
        """image_id -> JPEG bytes; width/height are read from the JPEG header."""
        if not thumbs:
            return
        ids = sorted(thumbs)
        sizes = [_jpeg_size(thumbs[i]) for i in ids]
        self._insert_arrow(
            "thumbnails",
            {
                "image_id": pa.array(ids, type=pa.int32()),
                "jpeg": pa.array([thumbs[i] for i in ids], type=pa.binary()),
                "width": pa.array([s[0] for s in sizes], type=pa.int32()),
                "height": pa.array([s[1] for s in sizes], type=pa.int32()),
            },
        )

    @_writing
    def ensure_embedding_tables(self, dim: int) -> None:
        if not self.has_table("image_embeddings"):
            self.con.execute(embedding_tables(dim))
            self.con.execute(VIEWS)

    @_writing
    def write_image_embeddings(self, image_ids: np.ndarray, emb: np.ndarray) -> None:
        self.ensure_embedding_tables(emb.shape[1])
        self._insert_arrow(
            "image_embeddings",
            {"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)), "emb": _fixed_array(emb)},
        )

    @_writing
    def concept_ids(self, texts: Sequence[str]) -> np.ndarray:
        """Ids for texts, adding the ones not yet in ``concepts`` (ids stay stable across runs)."""
        known = dict(self.con.execute("SELECT text, concept_id FROM concepts").fetchall())
        next_id = max(known.values(), default=-1) + 1
        new_texts, new_ids, ids = [], [], np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            cid = known.get(text)
            if cid is None:
                cid = known[text] = next_id
                next_id += 1
                new_texts.append(text)
                new_ids.append(cid)
            ids[i] = cid
        if new_texts:
            self._insert_arrow(
                "concepts", {"concept_id": pa.array(new_ids, type=pa.int32()), "text": pa.array(new_texts)}
            )
        return ids

    @_writing
    def write_concept_embeddings(self, clip_key: str, concept_ids: np.ndarray, emb: np.ndarray) -> None:
        if len(concept_ids) == 0:
            return
        self.ensure_embedding_tables(emb.shape[1])
        self._insert_arrow(
            "concept_embeddings",
            {
                "clip_key": pa.array([clip_key] * len(concept_ids)),
                "concept_id": pa.array(np.asarray(concept_ids, dtype=np.int32)),
                "emb": _fixed_array(emb),
            },
        )

    @_writing
    def write_run_concepts(self, run_id: int, concept_ids: np.ndarray) -> None:
        n = len(concept_ids)
        self._insert_arrow(
            "run_concepts",
            {
                "run_id": pa.array(np.full(n, run_id, dtype=np.int32)),
                "position": pa.array(np.arange(n, dtype=np.int32)),
                "concept_id": pa.array(np.asarray(concept_ids, dtype=np.int32)),
            },
        )

    @_writing
    def write_activations(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        """One FLOAT[K] list per (layer, image): DuckDB arrays cap at 100k elements, lists don't."""
        self._insert_arrow(
            "activation_rows",
            {"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)), "acts": float_list_array(acts)},
            constants={"layer": layer},
        )

    @_writing
    def write_top_images(self, layer: str, image_ids: np.ndarray, values: np.ndarray) -> None:
        """image_ids/values: [K, R] per neuron, best first. Ranks are 1-based."""
        k, r = image_ids.shape
        self._insert_arrow(
            "top_images",
            {
                "unit": pa.array(np.repeat(np.arange(k, dtype=np.int32), r)),
                "rank": pa.array(np.tile(np.arange(1, r + 1, dtype=np.int32), k)),
                "image_id": pa.array(np.asarray(image_ids, dtype=np.int32).reshape(-1)),
                "activation": pa.array(np.asarray(values, dtype=np.float32).reshape(-1)),
            },
            constants={"layer": layer},
        )

    @_writing
    def write_neurons(
        self,
        run_id: int,
        layer: str,
        labels: Sequence[str],
        concept_ids: np.ndarray,
        scores: np.ndarray,
        cutoff: float,
    ) -> None:
        k = len(labels)
        scores = np.asarray(scores, dtype=np.float64)
        self._insert_arrow(
            "neurons",
            {
                "unit": pa.array(np.arange(k, dtype=np.int32)),
                "label": pa.array(list(labels), type=pa.string()),
                "concept_id": pa.array(np.asarray(concept_ids, dtype=np.int32)),
                "similarity": pa.array(scores),
                "interpretable": pa.array(scores > cutoff),
            },
            constants={"run_id": run_id, "layer": layer},
        )

    @_writing
    def write_neuron_concepts(
        self, run_id: int, layer: str, concept_ids: np.ndarray, scores: np.ndarray
    ) -> None:
        """concept_ids/scores: [K, T] per neuron, best first. Ranks are 1-based."""
        k, t = concept_ids.shape
        self._insert_arrow(
            "neuron_concepts",
            {
                "unit": pa.array(np.repeat(np.arange(k, dtype=np.int32), t)),
                "rank": pa.array(np.tile(np.arange(1, t + 1, dtype=np.int32), k)),
                "concept_id": pa.array(np.asarray(concept_ids, dtype=np.int32).reshape(-1)),
                "score": pa.array(np.asarray(scores, dtype=np.float32).reshape(-1)),
            },
            constants={"run_id": run_id, "layer": layer},
        )

    @_writing
    def write_image_concepts(
        self, run_id: int, image_ids: np.ndarray, concept_ids: np.ndarray, sims: np.ndarray
    ) -> None:
        """Each image's best concepts by P (cosine), [N, T], best first."""
        n, t = concept_ids.shape
        self._insert_arrow(
            "image_concepts",
            {
                "run_id": pa.array(np.full(n * t, run_id, dtype=np.int32)),
                "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=np.int32), t)),
                "rank": pa.array(np.tile(np.arange(1, t + 1, dtype=np.int32), n)),
                "concept_id": pa.array(np.asarray(concept_ids, dtype=np.int32).reshape(-1)),
                "similarity": pa.array(np.asarray(sims, dtype=np.float32).reshape(-1)),
            },
        )

    @_writing
    def write_image_softmax(self, run_id: int, image_ids: np.ndarray, lse: np.ndarray) -> None:
        n = len(image_ids)
        self._insert_arrow(
            "image_softmax",
            {
                "run_id": pa.array(np.full(n, run_id, dtype=np.int32)),
                "image_id": pa.array(np.asarray(image_ids, dtype=np.int32)),
                "lse": pa.array(np.asarray(lse, dtype=np.float32)),
            },
        )

    @_writing
    def write_linear_weights(
        self, layer: str, input_layer: str | None, weight: np.ndarray, bias: np.ndarray | None
    ) -> None:
        c = weight.shape[0]
        self._insert_arrow(
            "linear_weights",
            {
                "layer": pa.array([layer] * c, type=pa.string()),
                "input_layer": pa.array([input_layer] * c, type=pa.string()),
                "unit": pa.array(np.arange(c, dtype=np.int32)),
                "weight": float_list_array(weight),
                "bias": pa.array(
                    None if bias is None else np.asarray(bias, dtype=np.float32), type=pa.float32()
                )
                if bias is not None
                else pa.nulls(c, type=pa.float32()),
            },
        )

    @_writing
    def write_metrics(
        self, run_id: int, analysis: str, rows: Iterable[tuple[str, float | None, str | None]]
    ) -> None:
        """Replace the metrics of one (run, analysis) with these (metric, value, details) rows."""
        self.con.execute("DELETE FROM metrics WHERE run_id = ? AND analysis = ?", [run_id, analysis])
        for metric, value, details in rows:
            self.con.execute(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                [run_id, analysis, metric, None if value is None else float(value), details],
            )


def _stat_or_none(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _reason(exc: BaseException) -> str:
    """The useful part of a DuckDB or OS error; a full disk is named as such."""
    text = str(exc.strerror) if isinstance(exc, OSError) and exc.strerror else str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "No space left on device" in text or (isinstance(exc, OSError) and exc.errno == 28):
        return f"the disk is full ({first})"
    return first


# Start-of-frame markers carry the image size (C4 = DHT, C8 = JPG, CC = DAC are not frames).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) from a JPEG's frame header, without decoding (store/ imports no PIL)."""
    if data[:2] != b"\xff\xd8":
        return None, None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None, None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF and i + 9 <= len(data):
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # scan data: no frame header before it
            return None, None
        i += 2 + length
    return None, None


def _now() -> datetime:
    return datetime.now(UTC)
