"""Reading caches: read-only connections, clear errors for bad files, typed accessors.

Every user-provided value reaches SQL as a bound parameter. ``CacheReader`` also wraps a
writer's connection (relabel and evaluate read the copy they are about to extend).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from dissect_tui.errors import CacheError
from dissect_tui.store.schema import READABLE_VERSIONS, SCHEMA_VERSION

DEFAULT_CACHE_DIR = Path("cache")


@dataclass(frozen=True)
class LayerInfo:
    layer: str
    position: int
    n_units: int
    module_type: str | None
    output_shape: str | None


def open_cache(path: str | Path) -> CacheReader:
    """Open a cache read-only (several browsers may share it); raise CacheError on any problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CacheError(f"no cache at {path}: build one with `dissect-tui index MODEL --db {path}`")
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache file")
    if path.stat().st_size == 0:
        raise CacheError(f"{path} is empty (0 bytes), not a dissect-tui cache")
    with path.open("rb") as fh:
        header = fh.read(12)
    if header[8:12] != b"DUCK":  # DuckDB's magic bytes; anything else would get a confusing message
        raise CacheError(f"{path} is not a DuckDB file (is it a dissect-tui cache?)")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        text = str(exc)
        if "lock" in text.lower():
            pid = re.search(r"PID (\d+)", text)
            who = f" (process {pid.group(1)})" if pid else ""
            raise CacheError(
                f"{path} is open for writing by another process{who}; wait for it to finish and retry"
            ) from None
        if "not a valid DuckDB" in text or "Invalid Input" in text or "Serialization" in text:
            raise CacheError(f"{path} is not a DuckDB file (is it a dissect-tui cache?)") from None
        raise CacheError(f"cannot open {path}: {text.splitlines()[0]}") from None
    reader = CacheReader(con, path)
    try:
        reader.check()
    except CacheError:
        con.close()
        raise
    return reader


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
    def check(self) -> None:
        """Schema version and a non-empty run table, or CacheError."""
        name = self.path or "this file"
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        except duckdb.Error:
            raise CacheError(f"{name} is a DuckDB file but not a dissect-tui cache (no meta table)") from None
        version = int(row[0][0]) if row else None
        if version not in READABLE_VERSIONS:
            newer = version is not None and version > SCHEMA_VERSION
            hint = "upgrade dissect-tui" if newer else "rebuild it with `dissect-tui index`"
            raise CacheError(
                f"{name} has cache schema version {version}, this dissect-tui reads version "
                f"{SCHEMA_VERSION}: {hint}"
            )
        n = self.con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
        if n == 0:
            raise CacheError(f"{name} holds no finished run (an interrupted index?); rebuild it")

    # -- runs and layers -------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        cur = self.con.execute("SELECT * FROM runs ORDER BY run_id")
        cols = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            rec = dict(zip(cols, values, strict=True))
            for key in ("probe", "hyperparameters", "stage_seconds", "settings"):
                if isinstance(rec.get(key), str):
                    try:
                        rec[key] = json.loads(rec[key])
                    except ValueError:
                        pass
            if "template" not in rec:  # schema version 1 kept the template inside clip_key
                key = str(rec.get("clip_key") or "")
                rec["template"] = key.split("|template=", 1)[1] if "|template=" in key else None
            out.append(rec)
        return out

    def run(self, run_id: int | None = None) -> dict[str, Any]:
        runs = self.runs()
        if run_id is None:
            return runs[-1]
        for rec in runs:
            if rec["run_id"] == run_id:
                return rec
        raise CacheError(f"no run {run_id} in {self.path}; runs: {', '.join(str(r['run_id']) for r in runs)}")

    def latest_run_id(self) -> int:
        return int(self.con.execute("SELECT max(run_id) FROM runs").fetchall()[0][0])

    def index_run(self, run_id: int | None = None) -> dict[str, Any]:
        """The index run that produced the activations a (relabel) run is based on."""
        rec = self.run(run_id)
        while rec.get("kind") != "index" and rec.get("parent_run_id") is not None:
            rec = self.run(rec["parent_run_id"])
        return rec

    def layers(self) -> list[LayerInfo]:
        rows = self.con.execute(
            "SELECT layer, position, n_units, module_type, output_shape FROM layers ORDER BY position"
        ).fetchall()
        return [LayerInfo(*r) for r in rows]

    # -- neurons -----------------------------------------------------------------------
    def neurons(self, run_id: int) -> dict[str, np.ndarray]:
        """Columns layer, unit, label, concept_id, similarity, interpretable for one run."""
        return self.con.execute(
            "SELECT n.layer, n.unit, n.label, n.concept_id, n.similarity, n.interpretable "
            "FROM neurons n JOIN layers l USING (layer) WHERE n.run_id = ? ORDER BY l.position, n.unit",
            [run_id],
        ).fetchnumpy()

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

    def top_images(self, layer: str, unit: int, limit: int = 10) -> list[tuple[int, int, float, str]]:
        """(rank, image_id, activation, path) for one neuron, best first."""
        return self.con.execute(
            "SELECT t.rank, t.image_id, t.activation, i.path FROM top_images t JOIN images i USING (image_id) "
            "WHERE t.layer = ? AND t.unit = ? AND t.rank <= ? ORDER BY t.rank",
            [layer, unit, limit],
        ).fetchall()

    def layer_top_images(self, layer: str, n: int = 100) -> np.ndarray:
        """[K, n] image ids of every neuron's top images (best first)."""
        k = self.con.execute("SELECT n_units FROM layers WHERE layer = ?", [layer]).fetchall()
        if not k:
            raise CacheError(f"no layer {layer!r} in this cache")
        rows = self.con.execute(
            "SELECT unit, rank, image_id FROM top_images WHERE layer = ? AND rank <= ? ORDER BY unit, rank",
            [layer, n],
        ).fetchnumpy()
        ids = rows["image_id"].astype(np.int64)
        return ids.reshape(int(k[0][0]), -1)

    def thumbnail(self, image_id: int) -> bytes | None:
        row = self.con.execute("SELECT jpeg FROM thumbnails WHERE image_id = ?", [image_id]).fetchall()
        return bytes(row[0][0]) if row else None

    def image(self, image_id: int) -> dict[str, Any] | None:
        cur = self.con.execute("SELECT * FROM images WHERE image_id = ?", [image_id])
        row = cur.fetchall()
        return dict(zip([d[0] for d in cur.description], row[0], strict=True)) if row else None

    # -- activations and embeddings ----------------------------------------------------
    def unit_activations(self, layer: str, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, values) of one neuron over every decoded probe image."""
        rows = self.con.execute(
            "SELECT image_id, acts[?] AS v FROM activation_rows WHERE layer = ? ORDER BY image_id",
            [unit + 1, layer],
        ).fetchnumpy()
        return rows["image_id"].astype(np.int64), rows["v"].astype(np.float32)

    def layer_activations(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids [N], acts [N, K]) of one layer."""
        tbl = self._arrow(
            "SELECT image_id, acts FROM activation_rows WHERE layer = ? ORDER BY image_id", [layer]
        )
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        acts_col = tbl.column("acts").combine_chunks()
        # a writable copy: callers hand these to torch, which warns on read-only buffers
        flat = np.array(acts_col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        k = len(flat) // max(len(ids), 1)
        return ids, flat.reshape(len(ids), k)

    def image_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids [N], emb [N, D]) in image_id order."""
        tbl = self._arrow("SELECT image_id, emb FROM image_embeddings ORDER BY image_id")
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        flat = np.array(
            tbl.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32
        )
        return ids, flat.reshape(len(ids), -1)

    def run_concepts(self, run_id: int) -> tuple[np.ndarray, list[str]]:
        rows = self.con.execute(
            "SELECT rc.concept_id, c.text FROM run_concepts rc JOIN concepts c USING (concept_id) "
            "WHERE rc.run_id = ? ORDER BY rc.position",
            [run_id],
        ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

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

    def image_softmax(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.con.execute(
            "SELECT image_id, lse FROM image_softmax WHERE run_id = ? ORDER BY image_id", [run_id]
        ).fetchnumpy()
        return rows["image_id"].astype(np.int64), rows["lse"].astype(np.float32)

    def linear_weights(self, layer: str) -> tuple[str | None, np.ndarray, np.ndarray | None] | None:
        """(input_layer, W [C, K], b [C] or None) of a stored classifier layer, or None."""
        tbl = self._arrow(
            "SELECT input_layer, weight, bias FROM linear_weights WHERE layer = ? ORDER BY unit", [layer]
        )
        if tbl.num_rows == 0:
            return None
        flat = tbl.column("weight").combine_chunks().flatten().to_numpy(zero_copy_only=False)
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
        cur = self.con.cursor()
        try:
            cur.execute(sql, params or [])
            if cur.description is None:
                return [], []
            cols = [d[0] for d in cur.description]
            rows = cur.fetchmany(limit) if limit is not None else cur.fetchall()
        except duckdb.Error as exc:
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
