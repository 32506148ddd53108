"""SQL for `evaluate` and `analyze`: the reads the generic reader lacks, and saving metrics.

Metrics go to the ``metrics(run_id, analysis, metric, value, details)`` table of the cache
itself: the cache is copied, extended and atomically swapped in (CacheWriter), so a browser
that has the file open keeps working. With them go the CLIP text embeddings the command had to
compute (class names, labels of a templated run): extra ``concepts`` rows and
``concept_embeddings`` rows under the text tower's key, in no run's concept set
(``run_concepts`` is untouched), so the next command finds them like concept embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from dissect_tui import filesafety
from dissect_tui.errors import CacheError
from dissect_tui.store.reader import CacheReader, reading
from dissect_tui.store.writer import CacheWriter

MetricRow = tuple[str, float | None, str | None]


@reading
def classifier_layers(reader: CacheReader) -> list[tuple[str, str | None]]:
    """(layer, input_layer) of every layer whose weights were stored at index time."""
    rows = reader.con.execute(
        "SELECT DISTINCT w.layer, w.input_layer, coalesce(l.position, 1e9) AS pos "
        "FROM linear_weights w LEFT JOIN layers l USING (layer) ORDER BY pos DESC"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


@reading
def layer_labels(reader: CacheReader, run_id: int, layer: str) -> tuple[list[str], np.ndarray]:
    """(labels, similarity scores) of one layer's neurons in unit order; empty when not labelled."""
    rows = reader.con.execute(
        "SELECT label, similarity FROM neurons WHERE run_id = ? AND layer = ? ORDER BY unit",
        [run_id, layer],
    ).fetchall()
    return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.float64)


@reading
def labelled_layers(reader: CacheReader, run_id: int) -> list[str]:
    """Layers that have neurons in this run, in network order."""
    rows = reader.con.execute(
        "SELECT DISTINCT n.layer, l.position FROM neurons n JOIN layers l USING (layer) "
        "WHERE n.run_id = ? ORDER BY l.position",
        [run_id],
    ).fetchall()
    return [r[0] for r in rows]


@reading
def neuron_concept_ids(reader: CacheReader, run_id: int, layer: str) -> np.ndarray:
    """[K, T] concept ids of each neuron's stored top concepts, best first (T = shortest list)."""
    rows = reader.con.execute(
        "SELECT unit, rank, concept_id FROM neuron_concepts WHERE run_id = ? AND layer = ? "
        "ORDER BY unit, rank",
        [run_id, layer],
    ).fetchnumpy()
    units = rows["unit"].astype(np.int64)
    if units.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    k = int(units.max()) + 1
    counts = np.bincount(units, minlength=k)
    t = int(counts.min())
    ids = np.full((k, t), -1, dtype=np.int64)
    ranks = rows["rank"].astype(np.int64)
    keep = ranks <= t
    ids[units[keep], ranks[keep] - 1] = rows["concept_id"].astype(np.int64)[keep]
    return ids


@reading
def concept_embeddings_by_text(reader: CacheReader, clip_key: str) -> dict[str, np.ndarray]:
    """Every stored concept embedding of one text tower, keyed by concept text."""
    try:
        tbl = reader.con.sql(
            "SELECT c.text, e.emb FROM concept_embeddings e JOIN concepts c USING (concept_id) "
            "WHERE e.clip_key = ?",
            params=[clip_key],
        ).to_arrow_table()
    except duckdb.CatalogException:
        return {}  # a cache without embedding tables
    if tbl.num_rows == 0:
        return {}
    flat = tbl.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32).reshape(tbl.num_rows, -1)
    return dict(zip(tbl.column("text").to_pylist(), emb, strict=True))


@reading
def read_metrics(
    reader: CacheReader, run_id: int | None = None, analysis: str | None = None
) -> list[tuple[int, str, str, float | None, str | None]]:
    """Stored (run_id, analysis, metric, value, details) rows, optionally filtered."""
    sql = "SELECT run_id, analysis, metric, value, details FROM metrics WHERE 1 = 1"
    params: list[Any] = []
    if run_id is not None:
        sql += " AND run_id = ?"
        params.append(run_id)
    if analysis is not None:
        sql += " AND analysis = ?"
        params.append(analysis)
    return reader.con.execute(sql + " ORDER BY run_id, analysis, rowid", params).fetchall()


# (clip_key, texts, [len(texts), D] unit vectors): text embeddings to keep in the cache
TextEmbeddings = tuple[str, Sequence[str], np.ndarray]

_BUSY = "; wait for it to finish"


def reserve_for_metrics(path: str | Path) -> Path:
    """Take this process's write lock on the cache at ``path`` before a command computes what it
    will save there, and check its folder can be written; returns the file that will be written.

    Another dissect-tui process writing the cache, or a folder the new file cannot be written
    to, is refused at once (with the --no-save hint) instead of after the computation. Whether
    the file is a cache is for the reader to say (it opens it next); CacheWriter checks again when
    saving and reuses the lock, released by its commit or abort, or at the end of the command.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return path  # nothing to lock: opening it says what is wrong
    final = filesafety.writable_target(path, "DB")
    hint = "pass --no-save to print the results without storing them"
    # The folder first: on a read-only file system the lock file cannot even be created.
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise CacheError(f"cannot write in folder {final.parent}, where the results are stored: {hint}")
    try:
        filesafety.acquire(final)
    except CacheError as exc:
        head, busy, _ = str(exc).partition(_BUSY)
        raise CacheError(f"{head}{_BUSY}, or {hint}" if busy else f"{exc}: {hint}") from None
    return final


def save_metrics(
    path: str | Path,
    entries: Sequence[tuple[int, str, Iterable[MetricRow]]],
    embeddings: Sequence[TextEmbeddings] = (),
) -> Path:
    """Replace the metrics of each (run_id, analysis) in the cache at ``path``, atomically, and
    add the text ``embeddings`` it does not have yet (see :func:`add_text_embeddings`).

    Close any CacheReader on ``path`` first: the new file is swapped in under its name.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CacheError(f"no cache at {path}")
    with CacheWriter(path, base=path) as writer:
        for run_id, analysis, rows in entries:
            writer.write_metrics(run_id, analysis, list(rows))
        for key, texts, emb in embeddings:
            add_text_embeddings(writer, key, texts, emb)
        return writer.commit()


def add_text_embeddings(writer: CacheWriter, clip_key: str, texts: Sequence[str], emb: np.ndarray) -> int:
    """Store embeddings of ``texts`` under ``clip_key`` where the cache has none yet; returns how
    many were added. Each text gets a ``concepts`` row (an existing one is reused) but joins no
    run's concept set. Nothing is written when the cache has no embedding table or stores
    vectors of another width (then these cannot come from the same text tower).
    """
    emb = np.asarray(emb, dtype=np.float32)
    if not texts or emb.ndim != 2 or emb.shape[0] != len(texts) or not writer.has_table("concept_embeddings"):
        return 0
    width = writer.con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE table_name = 'concept_embeddings' AND column_name = 'emb'"
    ).fetchone()
    if width is None or width[0] != f"FLOAT[{emb.shape[1]}]":
        return 0
    ids = writer.concept_ids(list(texts))
    have = {
        int(r[0])
        for r in writer.con.execute(
            "SELECT concept_id FROM concept_embeddings WHERE clip_key = ?", [clip_key]
        ).fetchall()
    }
    keep = np.zeros(len(ids), dtype=bool)
    for i, cid in enumerate(ids.tolist()):
        keep[i] = cid not in have
        have.add(cid)  # a text given twice is stored once
    writer.write_concept_embeddings(clip_key, ids[keep], emb[keep])
    return int(keep.sum())
