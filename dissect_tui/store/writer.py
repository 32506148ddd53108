"""Writing caches: build in a temporary file next to the target, then rename atomically.

DuckDB locks a file against every other process while a read-write connection is open, so a
cache that browsers may have open is never written in place: a new cache is built in
``.NAME.tmp-PID`` beside it (a relabel or evaluation copies the old one first) and
``os.replace`` swaps it in. On any failure, or Ctrl-C, the temporary file is removed and the
previous cache is untouched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image

from dissect_tui import __version__
from dissect_tui.errors import CacheError
from dissect_tui.store.schema import FORMAT_KEY, FORMAT_VALUE, SCHEMA_VERSION, TABLES, VIEWS, embedding_tables


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove_db_files(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _float_list_array(matrix: np.ndarray) -> pa.Array:
    """[R, K] float32 -> Arrow list<float> column without a Python loop."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, width = matrix.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32 if rows * width < 2**31 else np.int64)
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    if offsets.dtype == np.int64:
        return pa.LargeListArray.from_arrays(offsets, values)
    return pa.ListArray.from_arrays(offsets, values)


def _fixed_array(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), matrix.shape[1])


def check_target(final: Path) -> None:
    """Fail before any work if a cache cannot be written at ``final``: it is a folder, its folder
    cannot be created or written, or it is some other file (never overwrite a user's data)."""
    final = Path(final)
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
    if final.is_file() and final.stat().st_size > 0 and not _is_cache_file(final):
        raise CacheError(f"{final} exists and is not a dissect-tui cache; refusing to overwrite it")


def _is_cache_file(path: Path) -> bool:
    """A DuckDB file with a ``meta`` table (any schema version, finished or not)."""
    with open(path, "rb") as fh:
        if fh.read(12)[8:12] != b"DUCK":
            return False
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return True  # locked by a writer or of another DuckDB version: assume it is ours
    try:
        con.execute("SELECT 1 FROM meta LIMIT 1")
        return True
    except duckdb.Error:
        return False
    finally:
        con.close()


class CacheWriter:
    """A cache under construction. Use as a context manager; ``commit()`` moves it into place.

    ``base``: an existing cache to start from (relabel, evaluate); otherwise a new empty
    schema is created.
    """

    def __init__(self, final_path: Path, base: Path | None = None) -> None:
        self.final_path = Path(final_path)
        self.tmp_path = _tmp_path(self.final_path)
        check_target(self.final_path)
        _remove_db_files(self.tmp_path)
        self._committed = False
        if base is not None:
            try:
                shutil.copyfile(base, self.tmp_path)
            except OSError as exc:
                raise CacheError(f"cannot copy cache {base}: {exc.strerror}") from None
        try:
            self.con = duckdb.connect(str(self.tmp_path))
        except duckdb.Error as exc:
            _remove_db_files(self.tmp_path)
            raise CacheError(f"cannot create {self.tmp_path}: {exc}") from None
        # One transaction for the whole build: DuckDB then writes each big insert once, at
        # commit, instead of committing (and checkpointing) insert by insert - 2x faster
        # for 50k images x 3,904 neurons (bench/bench_cache_write.py).
        self.con.execute("BEGIN TRANSACTION")
        if base is None:
            self.con.execute(TABLES)
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

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()

    def commit(self) -> Path:
        """Commit, checkpoint, close and atomically replace the final path."""
        self.con.execute("COMMIT")
        self.con.execute("CHECKPOINT")
        self.con.close()
        os.replace(self.tmp_path, self.final_path)
        _remove_db_files(self.tmp_path)  # a stray .wal, if any
        self._committed = True
        return self.final_path

    def abort(self) -> None:
        if self._committed:
            return
        try:
            self.con.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not mask the cause
            pass
        _remove_db_files(self.tmp_path)

    # -- helpers ---------------------------------------------------------------------
    def _insert_arrow(
        self, table: str, data: dict[str, Any], constants: dict[str, Any] | None = None
    ) -> None:
        """Bulk insert columns (Arrow arrays); ``constants`` fill whole columns from one bound value."""
        constants = constants or {}
        arrow = pa.table(data)
        self.con.register("_incoming", arrow)
        try:
            cols = ", ".join([*constants, *data])
            select = ", ".join(["?" for _ in constants] + list(data))
            self.con.execute(
                f"INSERT INTO {table} ({cols}) SELECT {select} FROM _incoming", list(constants.values())
            )
        finally:
            self.con.unregister("_incoming")

    def has_table(self, name: str) -> bool:
        row = self.con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = current_database()",
            [name],
        ).fetchall()
        return bool(row and row[0][0])

    # -- runs ------------------------------------------------------------------------
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

    def update_run(self, run_id: int, **fields: Any) -> None:
        for key, value in fields.items():
            if key in ("stage_seconds", "settings", "hyperparameters") and not isinstance(value, str):
                value = json.dumps(value, default=str)
            # column names come from our own code, never from the user
            self.con.execute(f"UPDATE runs SET {key} = ? WHERE run_id = ?", [value, run_id])

    # -- index-time data -------------------------------------------------------------
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

    def ensure_embedding_tables(self, dim: int) -> None:
        if not self.has_table("image_embeddings"):
            self.con.execute(embedding_tables(dim))
            self.con.execute(VIEWS)

    def write_image_embeddings(self, image_ids: np.ndarray, emb: np.ndarray) -> None:
        self.ensure_embedding_tables(emb.shape[1])
        self._insert_arrow(
            "image_embeddings",
            {"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)), "emb": _fixed_array(emb)},
        )

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

    def write_activations(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        """One FLOAT[K] list per (layer, image): DuckDB arrays cap at 100k elements, lists don't."""
        self._insert_arrow(
            "activation_rows",
            {"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)), "acts": _float_list_array(acts)},
            constants={"layer": layer},
        )

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
                "weight": _float_list_array(weight),
                "bias": pa.array(
                    None if bias is None else np.asarray(bias, dtype=np.float32), type=pa.float32()
                )
                if bias is not None
                else pa.nulls(c, type=pa.float32()),
            },
        )

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


def _jpeg_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except (OSError, ValueError):
        return None, None


def _now() -> datetime:
    return datetime.now(UTC)
