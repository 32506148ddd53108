"""Two-concept explanations (paper A.4) in the cache: the ``compositions`` relation.

`dissect-tui compose` writes them (through a copy renamed into place, like `evaluate`'s
metrics); the browser's detail screen and SQL read them. One neuron's result at one breadth is
its ranked pairs ("w1 w2") and its ranked singles, each rescored with SoftWPMI over that small
concept set. Older caches lack the table until `compose` first writes to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from dissect_tui.errors import CacheError
from dissect_tui.store.schema import OPTIONAL_TABLES
from dissect_tui.store.writer import CacheWriter


@dataclass
class UnitComposition:
    """One neuron's explanation at one breadth: pairs and singles, best first, with scores."""

    layer: str
    unit: int
    breadth: int  # singles actually paired (a neuron may store fewer than asked)
    pairs: list[tuple[str, float]]
    singles: list[tuple[str, float]]

    @property
    def gain(self) -> float | None:
        """Best pair's score minus the best single's: > 0 when a pair explains the neuron better."""
        if not self.pairs or not self.singles:
            return None
        return self.pairs[0][1] - self.singles[0][1]


def save_compositions(path: Path, run_id: int, results: Sequence[UnitComposition], keep: int) -> Path:
    """Store the best ``keep`` pairs and singles of each result, replacing earlier results of the
    same run, neuron and breadth; atomically (a copy of the cache renamed into place)."""
    now = datetime.now().replace(microsecond=0)
    rows = [
        (run_id, r.layer, r.unit, r.breadth, kind, rank, text, float(score), now)
        for r in results
        for kind, ranked in (("pair", r.pairs), ("single", r.singles))
        for rank, (text, score) in enumerate(ranked[:keep], 1)
    ]
    with CacheWriter(path, base=path) as writer:
        con = writer.con
        con.execute(OPTIONAL_TABLES)
        keys = sorted({(r.layer, r.unit, r.breadth) for r in results})
        if keys:
            con.executemany(
                "DELETE FROM compositions WHERE run_id = ? AND layer = ? AND unit = ? AND breadth = ?",
                [(run_id, *k) for k in keys],
            )
        if rows:
            con.executemany("INSERT INTO compositions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return writer.commit()


def stored_composition(
    con: duckdb.DuckDBPyConnection, run_id: int, layer: str, unit: int
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]], datetime] | None:
    """The newest stored result of a neuron: (breadth, pairs, singles, created_at), or None (also
    for a cache without the relation, or with a damaged one)."""
    try:
        head = con.execute(
            "SELECT breadth, created_at FROM compositions WHERE run_id = ? AND layer = ? AND unit = ? "
            "ORDER BY created_at DESC, breadth DESC LIMIT 1",
            [run_id, layer, unit],
        ).fetchall()
        if not head:
            return None
        breadth, created = head[0]
        rows = con.execute(
            "SELECT kind, text, score FROM compositions WHERE run_id = ? AND layer = ? AND unit = ? "
            "AND breadth = ? ORDER BY kind, rank",
            [run_id, layer, unit, breadth],
        ).fetchall()
    except duckdb.Error:
        return None
    try:
        pairs = [(str(t), float(s)) for k, t, s in rows if k == "pair"]
        singles = [(str(t), float(s)) for k, t, s in rows if k == "single"]
        return int(breadth), pairs, singles, created
    except (TypeError, ValueError):
        raise CacheError(f"the compositions of {layer}:{unit} in this cache are damaged") from None


def stored_composition_count(con: duckdb.DuckDBPyConnection) -> int:
    """Neurons × breadths with a stored result, over all runs (0 without the relation)."""
    try:
        return int(
            con.execute("SELECT count(DISTINCT (run_id, layer, unit, breadth)) FROM compositions").fetchall()[
                0
            ][0]
        )
    except duckdb.Error:
        return 0
