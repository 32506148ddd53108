"""Re-indexing onto an existing cache: keep its relabel runs and stored metrics when they still apply.

A relabel run is a function of the probe's images, their CLIP embeddings, the activations of its
layers and its concept embeddings (which it brought itself). When a new index of the same model
and probe reproduces those exactly, the old relabel run is exactly what relabelling the new
cache would compute, so it is copied instead of lost; the metrics stored for it come along.
Metrics and stored compositions of the old index run itself are kept when the new index run's
labels are also the same.

"Exactly" is checked, not assumed from settings: each side's images, image embeddings and each
layer's activations are summed as 128-bit sums of DuckDB row hashes (one pass over the new file
and one over the old, ~seconds per GB). Anything that differs drops the runs it touches, with a
note saying which input changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from dissect_tui.errors import CacheError
from dissect_tui.store.arrow_views import registered
from dissect_tui.store.reader import open_cache, parse_version
from dissect_tui.store.schema import SCHEMA_VERSION

# tables keyed by run_id that a run owns, and whether they hold concept ids
RUN_TABLES = {
    "run_concepts": True,
    "neurons": True,
    "neuron_concepts": True,
    "image_concepts": True,
    "image_softmax": False,
    "metrics": False,
}

_FINGERPRINTS = {
    "images": "SELECT count(*), sum(hash(image_id, path, ok)::HUGEINT) FROM images",
    "image embeddings": "SELECT count(*), sum(hash(image_id, emb)::HUGEINT) FROM image_embeddings",
}
_LAYER_FINGERPRINTS = (
    "SELECT layer, count(*), sum(hash(image_id, acts)::HUGEINT) FROM activation_rows GROUP BY layer"
)
_LABELS = (
    "SELECT count(*), sum(hash(n.layer, n.unit, c.text, n.similarity)::HUGEINT) "
    "FROM neurons n JOIN concepts c USING (concept_id) WHERE n.run_id = ?"
)


@dataclass
class CarryOver:
    """What happened to the old cache's relabel runs and metrics."""

    kept_runs: list[int] = field(default_factory=list)  # their new run ids
    kept_metrics: int = 0
    dropped_runs: int = 0
    dropped_metrics: int = 0
    kept_compositions: int = 0  # neurons with a stored two-concept explanation
    dropped_compositions: int = 0
    reason: str | None = None  # why something was dropped

    def note(self, path: Path) -> str | None:
        kept = (
            _counted(len(self.kept_runs), "relabel run")
            + _counted(self.kept_metrics, "stored metric")
            + _counted(self.kept_compositions, "stored composition")
        )
        dropped = (
            _counted(self.dropped_runs, "relabel run")
            + _counted(self.dropped_metrics, "stored metric")
            + _counted(self.dropped_compositions, "stored composition")
        )
        parts = []
        if kept:
            parts.append(
                f"kept {' and '.join(kept)} of the old {path.name}: the inputs they were computed from are unchanged"
            )
        if dropped:
            parts.append(f"dropped {' and '.join(dropped)} of the old {path.name}: {self.reason}")
        return "; ".join(parts) or None


def _counted(n: int, what: str) -> list[str]:
    return [f"{n} {what}{'s' if n != 1 else ''}"] if n else []


def carry_over(con: duckdb.DuckDBPyConnection, previous: Path, index_run_id: int) -> CarryOver:
    """Copy into the cache being built (``con``, inside its transaction) the relabel runs and
    metrics of ``previous`` that still apply to the new index run ``index_run_id``."""
    result = CarryOver()
    if not previous.exists():
        return result
    try:
        old = open_cache(previous)
    except CacheError:
        return result  # the file was refused or accepted as replaceable before any work started
    with old:
        runs = old.runs()
        metrics_by_run = dict(
            old.con.execute("SELECT run_id, count(*) FROM metrics GROUP BY run_id").fetchall()
        )
        comps_by_run = (
            dict(
                old.con.execute(
                    "SELECT run_id, count(DISTINCT (layer, unit, breadth)) FROM compositions GROUP BY run_id"
                ).fetchall()
            )
            if _has_table(old.con, "compositions")
            else {}
        )
        relabels = [r for r in runs if r.get("kind") != "index"]
        index_runs = [r for r in runs if r.get("kind") == "index"]
        if not relabels and not metrics_by_run and not comps_by_run:
            return result
        result.dropped_runs = len(relabels)
        result.dropped_metrics = sum(metrics_by_run.values())
        result.dropped_compositions = sum(comps_by_run.values())
        version = parse_version(
            dict(old.con.execute("SELECT key, value FROM meta").fetchall()).get("schema_version")
        )
        if version != SCHEMA_VERSION or len(index_runs) != 1:
            result.reason = (
                f"it is a schema version {version} cache"
                if version != SCHEMA_VERSION
                else ("it holds several index runs")
            )
            return result
        changed = _changed_inputs(con, old.con)
        old_index = index_runs[0]["run_id"]
        keep: list[dict[str, Any]] = []
        for rec in relabels:
            layers = set(rec.get("layers") or [])
            stale = changed["all"] or sorted(layers & changed["layers"])
            if rec.get("parent_run_id") != old_index or stale:
                continue
            keep.append(rec)
        keep_index_metrics = (
            not changed["all"]
            and not changed["layers"]
            and _same_labels(con, old.con, index_run_id, old_index)
        )
        run_map = {old_index: index_run_id} if keep_index_metrics else {}
        next_id = index_run_id + 1
        for rec in keep:
            run_map[rec["run_id"]] = next_id
            result.kept_runs.append(next_id)
            next_id += 1
        result.dropped_runs = len(relabels) - len(keep)
        kept_metrics = sum(metrics_by_run.get(r, 0) for r in run_map)
        result.kept_metrics = kept_metrics
        result.dropped_metrics = sum(metrics_by_run.values()) - kept_metrics
        result.kept_compositions = sum(comps_by_run.get(r, 0) for r in run_map)
        result.dropped_compositions = sum(comps_by_run.values()) - result.kept_compositions
        result.reason = _reason(changed)
        if run_map:
            _copy(con, old.con, run_map, [r["run_id"] for r in keep], index_run_id)
    return result


def _changed_inputs(new: duckdb.DuckDBPyConnection, old: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Which inputs of a relabel run differ: 'all' (images, image embeddings) and a set of layers."""
    changed: dict[str, Any] = {"all": [], "layers": set()}
    for what, sql in _FINGERPRINTS.items():
        if new.execute(sql).fetchall() != old.execute(sql).fetchall():
            changed["all"].append(what)
    new_layers = {r[0]: r[1:] for r in new.execute(_LAYER_FINGERPRINTS).fetchall()}
    old_layers = {r[0]: r[1:] for r in old.execute(_LAYER_FINGERPRINTS).fetchall()}
    changed["layers"] = {name for name in old_layers if new_layers.get(name) != old_layers[name]}
    return changed


def _same_labels(
    new: duckdb.DuckDBPyConnection, old: duckdb.DuckDBPyConnection, new_id: int, old_id: int
) -> bool:
    return new.execute(_LABELS, [new_id]).fetchall() == old.execute(_LABELS, [old_id]).fetchall()


def _reason(changed: dict[str, Any]) -> str | None:
    if changed["all"]:
        return f"the probe's {' and '.join(changed['all'])} changed"
    if changed["layers"]:
        names = sorted(changed["layers"])
        shown = (
            f"{', '.join(names[:3])} and {len(names) - 3} more"
            if len(names) > 3
            else " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
        )
        return f"the activations of {shown} changed"
    return "their index run's labels changed (another method, concept set or cutoff)"


def _copy(
    new: duckdb.DuckDBPyConnection,
    old: duckdb.DuckDBPyConnection,
    run_map: dict[int, int],
    relabel_ids: list[int],
    index_run_id: int,
) -> None:
    """Copy the relabel runs (their runs rows, every row they own, their concept embeddings) and
    the metrics of every run in ``run_map``, with run ids and concept ids renumbered."""
    _register(new, "_run_map", {"old_id": list(run_map), "new_id": list(run_map.values())})
    try:
        if relabel_ids:
            _copy_relabel_runs(new, old, relabel_ids, index_run_id)
        metrics = _rows(old, "SELECT * FROM metrics WHERE list_contains(?, run_id)", [list(run_map)])
        if _has_table(old, "compositions") and _has_table(new, "compositions"):
            found = _rows(old, "SELECT * FROM compositions WHERE list_contains(?, run_id)", [list(run_map)])
            _insert(
                new,
                found,
                "compositions",
                "r.* REPLACE (m.new_id AS run_id) FROM _rows r JOIN _run_map m ON r.run_id = m.old_id",
            )
        _insert(
            new,
            metrics,
            "metrics",
            "r.* REPLACE (m.new_id AS run_id) FROM _rows r JOIN _run_map m ON r.run_id = m.old_id",
        )
    finally:
        for name in ("_run_map", "_concept_map"):
            try:
                new.unregister(name)
            except duckdb.Error:
                pass


def _copy_relabel_runs(
    new: duckdb.DuckDBPyConnection, old: duckdb.DuckDBPyConnection, ids: list[int], index_run_id: int
) -> None:
    # concept ids by text, adding the texts the new file lacks
    owned = " UNION ".join(
        f"SELECT concept_id FROM {t} WHERE list_contains($ids, run_id)" for t, c in RUN_TABLES.items() if c
    )
    texts = old.execute(
        f"SELECT concept_id, text FROM concepts WHERE concept_id IN ({owned} UNION "
        "SELECT e.concept_id FROM concept_embeddings e JOIN runs r ON e.clip_key = r.clip_key "
        "WHERE list_contains($ids, r.run_id)) ORDER BY concept_id",
        {"ids": ids},
    ).fetchall()
    known = dict(new.execute("SELECT text, concept_id FROM concepts").fetchall())
    next_id = max(known.values(), default=-1) + 1
    concept_map: dict[int, int] = {}
    added: list[tuple[int, str]] = []
    for cid, text in texts:
        if text not in known:
            known[text] = next_id
            added.append((next_id, text))
            next_id += 1
        concept_map[cid] = known[text]
    if added:
        new.executemany("INSERT INTO concepts VALUES (?, ?)", added)
    _register(new, "_concept_map", {"old_id": list(concept_map), "new_id": list(concept_map.values())})
    runs = _rows(old, "SELECT * FROM runs WHERE list_contains(?, run_id)", [ids])
    _insert(
        new,
        runs,
        "runs",
        "r.* REPLACE (m.new_id AS run_id, ? AS parent_run_id) FROM _rows r JOIN _run_map m ON r.run_id = m.old_id",
        [index_run_id],
    )
    for table, has_concepts in RUN_TABLES.items():
        if table == "metrics":
            continue  # copied for every kept run by the caller
        rows = _rows(old, f"SELECT * FROM {table} WHERE list_contains(?, run_id)", [ids])
        select = "r.* REPLACE (m.new_id AS run_id{}) FROM _rows r JOIN _run_map m ON r.run_id = m.old_id{}"
        if has_concepts:
            select = select.format(
                ", c.new_id AS concept_id", " JOIN _concept_map c ON r.concept_id = c.old_id"
            )
        else:
            select = select.format("", "")
        _insert(new, rows, table, select)
    # the concept embeddings those runs were scored with, where the new file lacks them
    emb = _rows(
        old,
        "SELECT DISTINCT e.* FROM concept_embeddings e JOIN runs r ON e.clip_key = r.clip_key WHERE list_contains(?, r.run_id)",
        [ids],
    )
    _insert(
        new,
        emb,
        "concept_embeddings",
        "r.* REPLACE (c.new_id AS concept_id) FROM _rows r JOIN _concept_map c ON r.concept_id = c.old_id "
        "WHERE NOT EXISTS (SELECT 1 FROM concept_embeddings e "
        "WHERE e.clip_key = r.clip_key AND e.concept_id = c.new_id)",
    )


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    sql = "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = current_database()"
    return bool(con.execute(sql, [name]).fetchall()[0][0])


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> pa.Table:
    return con.sql(sql, params=params).to_arrow_table()


def _register(con: duckdb.DuckDBPyConnection, name: str, columns: dict[str, list[int]]) -> None:
    con.register(name, pa.table({k: pa.array(v, type=pa.int64()) for k, v in columns.items()}))


def _insert(
    con: duckdb.DuckDBPyConnection, rows: pa.Table, table: str, select: str, params: list[Any] | None = None
) -> None:
    if rows.num_rows == 0:
        return
    with registered(con, "_rows", rows):
        con.execute(f"INSERT INTO {table} BY NAME SELECT {select}", params or [])
