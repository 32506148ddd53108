"""The browser's queries over a cache (read-only). Every user value is a bound parameter.

Functions take a ``CacheReader``; the TUI calls them from worker threads, each with its own
cursor (``CacheReader(reader.con.cursor())``) so queries never share a DuckDB connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from dissect_tui.errors import CacheError
from dissect_tui.store.reader import CacheReader, reading

TOP_CONCEPTS_FOR_SEARCH = 5
CORRELATION_IMAGES = 2048


@dataclass
class NeuronTable:
    """One run's neurons, in layer order, as columns the UI filters in memory."""

    layers: list[str]  # layer names in position order
    layer_idx: np.ndarray  # [N] int32 index into ``layers``
    unit: np.ndarray  # [N] int64
    label: list[str]
    similarity: np.ndarray  # [N] float64
    concept_id: np.ndarray  # [N] int64
    top_concepts: list[str]  # "c1 · c2 · …" per neuron (best first)

    def __len__(self) -> int:
        return len(self.unit)


@reading
def load_neuron_table(
    reader: CacheReader, run_id: int, n_top: int | None = TOP_CONCEPTS_FOR_SEARCH
) -> NeuronTable:
    """The run's neurons; ``n_top=None`` leaves top_concepts empty (fill with ``load_top_concepts``)."""
    layers = [info.layer for info in reader.layers()]
    tbl = reader.con.sql(
        "SELECT n.layer, n.unit, n.label, n.similarity, n.concept_id "
        "FROM neurons n JOIN layers l USING (layer) WHERE n.run_id = ? ORDER BY l.position, n.unit",
        params=[run_id],
    ).to_arrow_table()
    where = {name: i for i, name in enumerate(layers)}
    layer_col = tbl.column("layer").to_pylist()
    table = NeuronTable(
        layers=layers,
        layer_idx=np.fromiter((where[s] for s in layer_col), dtype=np.int32, count=len(layer_col)),
        unit=tbl.column("unit").to_numpy().astype(np.int64),
        label=tbl.column("label").to_pylist(),
        similarity=tbl.column("similarity").to_numpy().astype(np.float64),
        concept_id=tbl.column("concept_id").to_numpy().astype(np.int64),
        top_concepts=[""] * tbl.num_rows,
    )
    if n_top:
        table.top_concepts = load_top_concepts(reader, run_id, table, n_top)
    return table


@reading
def load_top_concepts(
    reader: CacheReader, run_id: int, table: NeuronTable, n_top: int = TOP_CONCEPTS_FOR_SEARCH
) -> list[str]:
    """ "c1 · c2 · …" (best first) per neuron, in the order of ``load_neuron_table``.

    About a second for 100k neurons, so the browser paints first and loads these after.
    """
    rows = reader.con.sql(
        """
        WITH tc AS (
            SELECT nc.layer, nc.unit, string_agg(c.text, ' · ' ORDER BY nc.rank) AS tops
            FROM neuron_concepts nc JOIN concepts c USING (concept_id)
            WHERE nc.run_id = ? AND nc.rank <= ?
            GROUP BY nc.layer, nc.unit
        )
        SELECT coalesce(tc.tops, '') AS tops
        FROM neurons n JOIN layers l USING (layer) LEFT JOIN tc USING (layer, unit)
        WHERE n.run_id = ?
        ORDER BY l.position, n.unit
        """,
        params=[run_id, n_top, run_id],
    ).to_arrow_table()
    tops = rows.column("tops").to_pylist()
    if len(tops) != len(table):
        raise ValueError("neuron table changed while loading")
    return tops


@dataclass
class NeuronDetail:
    layer: str
    unit: int
    label: str
    similarity: float
    concepts: list[tuple[str, float]]  # top concepts, best first
    top_images: list[tuple[int, int, float, str]]  # (rank, image_id, activation, path)
    activations: np.ndarray  # [N] over every decoded probe image
    samples: list[tuple[str, list[tuple[int, float, str]]]]  # (band, [(image_id, act, path)])


@reading
def neuron_detail(
    reader: CacheReader,
    run_id: int,
    layer: str,
    unit: int,
    n_images: int = 10,
    n_concepts: int = 10,
    per_band: int = 3,
) -> NeuronDetail:
    head = reader.con.execute(
        "SELECT label, similarity FROM neurons WHERE run_id = ? AND layer = ? AND unit = ?",
        [run_id, layer, unit],
    ).fetchall()
    label, similarity = head[0] if head else ("?", float("nan"))
    concepts = [(r[3], float(r[4])) for r in reader.neuron_concepts(run_id, layer, unit, limit=n_concepts)]
    tops = reader.top_images(layer, unit, limit=n_images)
    ids, acts = reader.unit_activations(layer, unit)
    return NeuronDetail(
        layer=layer,
        unit=unit,
        label=label,
        similarity=float(similarity),
        concepts=concepts,
        top_images=tops,
        activations=acts,
        samples=percentile_samples(reader, ids, acts, seed=unit, per_band=per_band),
    )


BANDS = (("top 0.1%", 0.0, 0.001), ("top 1%", 0.001, 0.01), ("top 5%", 0.01, 0.05))


def percentile_samples(
    reader: CacheReader, ids: np.ndarray, acts: np.ndarray, seed: int = 0, per_band: int = 3
) -> list[tuple[str, list[tuple[int, float, str]]]]:
    """Random images (fixed seed) from the top 0.1%, 0.1–1% and 1–5% of activations (paper A.7)."""
    if len(acts) == 0:
        return [(name, []) for name, _, _ in BANDS]
    order = np.argsort(-acts, kind="stable")
    rng = np.random.default_rng(seed)
    picked: list[tuple[str, np.ndarray]] = []
    for name, lo, hi in BANDS:
        a, b = int(np.floor(lo * len(acts))), max(int(np.ceil(hi * len(acts))), 1)
        band = order[a:b] if b > a else order[:1]
        take = rng.choice(band, size=min(per_band, len(band)), replace=False) if len(band) else band
        picked.append((name, np.sort(take)))
    all_ids = sorted({int(ids[i]) for _, sel in picked for i in sel})
    paths = image_paths(reader, all_ids)
    return [
        (
            name,
            [(int(ids[i]), float(acts[i]), paths.get(int(ids[i]), "?")) for i in sel[np.argsort(-acts[sel])]],
        )
        for name, sel in picked
    ]


@reading
def image_paths(reader: CacheReader, image_ids: list[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    rows = reader.con.execute(
        "SELECT image_id, path FROM images WHERE list_contains(?::INTEGER[], image_id)", [image_ids]
    ).fetchall()
    return {int(i): p for i, p in rows}


@reading
def thumbnails(reader: CacheReader, image_ids: list[int]) -> dict[int, bytes]:
    if not image_ids:
        return {}
    rows = reader.con.execute(
        "SELECT image_id, jpeg FROM thumbnails WHERE list_contains(?::INTEGER[], image_id)", [image_ids]
    ).fetchall()
    return {int(i): bytes(b) for i, b in rows}


@reading
def similar_labels(
    reader: CacheReader, run_id: int, layer: str, unit: int, limit: int = 8
) -> list[tuple[str, int, str, float]]:
    """Neurons whose label is closest in CLIP text space to this neuron's label: (layer, unit, label, cos)."""
    clip_key = reader.run(run_id).get("clip_key")
    return reader.con.execute(
        """
        WITH me AS (
            SELECT e.emb FROM neurons n JOIN concept_embeddings e
                ON e.clip_key = ? AND e.concept_id = n.concept_id
            WHERE n.run_id = ? AND n.layer = ? AND n.unit = ?
        )
        SELECT n.layer, n.unit, n.label, array_cosine_similarity(e.emb, me.emb) AS s
        FROM neurons n JOIN layers l USING (layer)
        JOIN concept_embeddings e ON e.clip_key = ? AND e.concept_id = n.concept_id, me
        WHERE n.run_id = ? AND NOT (n.layer = ? AND n.unit = ?)
        ORDER BY s DESC, n.similarity DESC, l.position, n.unit
        LIMIT ?
        """,
        [clip_key, run_id, layer, unit, clip_key, run_id, layer, unit, limit],
    ).fetchall()


@reading
def correlated_units(
    reader: CacheReader, layer: str, unit: int, limit: int = 8, max_images: int = CORRELATION_IMAGES
) -> tuple[list[tuple[int, float]], int]:
    """Units of the same layer most correlated with this one over an even sample of images.

    Returns ([(unit, pearson r)], images used). Sampling keeps a 2048-unit layer at a few MB.
    """
    n = reader.con.execute("SELECT count(*) FROM activation_rows WHERE layer = ?", [layer]).fetchall()[0][0]
    step = max(1, -(-int(n) // max_images))
    tbl = reader.con.sql(
        "SELECT acts FROM activation_rows WHERE layer = ? AND image_id % ? = 0 ORDER BY image_id",
        params=[layer, step],
    ).to_arrow_table()
    if tbl.num_rows < 3:
        return [], tbl.num_rows
    k = reader.n_units(layer)
    col = tbl.column("acts").combine_chunks()
    reader.check_activation_rows(layer, np.asarray(col.value_lengths().fill_null(-1)), k)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    acts = flat.astype(np.float32).reshape(tbl.num_rows, k)
    acts = acts - acts.mean(axis=0)
    norms = np.linalg.norm(acts, axis=0)
    norms[norms == 0] = np.inf
    r = (acts.T @ acts[:, unit]) / (norms * norms[unit])
    r[unit] = -np.inf
    best = np.argsort(-r, kind="stable")[:limit]
    return [(int(u), float(r[u])) for u in best if np.isfinite(r[u])], tbl.num_rows


def run_user_query(reader: CacheReader, sql: str, limit: int) -> tuple[list[str], list[tuple]]:
    """A user's SQL on ``reader``'s own cursor, so ``interrupt(reader)`` can stop it.

    The statements run in order on that cursor (temporary tables and variables carry over); returns
    the last one's (column names, at most ``limit`` rows), with the values Python would distort
    fetched as DuckDB's text (store.user_sql); its other rows stay pending on the cursor for
    ``user_sql.count_result``. Errors become one-line CacheErrors, safe to show.

    What the SQL may do is decided by the connection, not here: it must be locked down
    (store.lockdown: no files, network, extensions or settings), or nothing runs.
    """
    from dissect_tui.store.export import sql_error_message
    from dissect_tui.store.lockdown import is_locked_down
    from dissect_tui.store.user_sql import exact_text, is_interrupt, statements

    con = reader.con
    if not is_locked_down(con):
        raise CacheError(
            "SQL error: this connection is not locked down (store.lockdown.lock_down); not running it"
        )
    try:
        parsed = statements(reader, sql)
        if not parsed:
            return [], []
        for stmt in parsed[:-1]:
            con.execute(stmt.query)
        con.execute(exact_text(reader, parsed[-1].query))
        if con.description is None:
            return [], []
        cols = [d[0] for d in con.description]
        rows = con.fetchmany(limit)
    except Exception as exc:
        if is_interrupt(exc):
            raise CacheError("query cancelled") from None
        if isinstance(exc, duckdb.Error):
            raise CacheError(sql_error_message(exc)) from None
        raise
    return cols, rows


def interrupt(reader: CacheReader) -> None:
    """Stop the query running on ``reader``'s cursor (from any thread); a no-op when idle or closed."""
    try:
        reader.con.interrupt()
    except duckdb.Error:
        pass
