"""The browser's own writable file next to a cache: composition results and pinned neurons.

The cache is opened read-only (several browsers share it, and the indexer swaps it in by
renaming), so anything the browser saves goes to ``<cache>.browse.sqlite``. SQLite rather
than DuckDB because a DuckDB read-write connection locks the file against every other
process, while SQLite lets several browsers write small transactions concurrently (WAL, a
busy timeout). If the cache's folder is not writable the sidecar lives under
``~/.cache/dissect-tui/``. Rows are keyed by the run's id *and* creation time, so results of
a cache that was rebuilt in place are never shown for the new run.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dissect_tui.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS compositions (
    run_key TEXT NOT NULL, layer TEXT NOT NULL, unit INTEGER NOT NULL, breadth INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- 'pair' or 'single'
    rank INTEGER NOT NULL, text TEXT NOT NULL, score REAL NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (run_key, layer, unit, breadth, kind, rank)
);
CREATE TABLE IF NOT EXISTS pins (
    run_key TEXT NOT NULL, layer TEXT NOT NULL, unit INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (run_key, layer, unit)
);
CREATE TABLE IF NOT EXISTS queries (
    run_key TEXT NOT NULL, text TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (run_key, text)
);
"""


class SidecarError(UserError):
    """The sidecar could not be read or written (a full disk, a damaged or locked file)."""


def sidecar_path(cache: Path) -> Path:
    """``<cache>.browse.sqlite`` beside the cache, or a per-user file when that folder is read-only."""
    cache = Path(cache).resolve()
    beside = cache.with_name(cache.name + ".browse.sqlite")
    if os.access(cache.parent, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
        return beside
    digest = hashlib.sha1(str(cache).encode()).hexdigest()[:12]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dissect-tui"
    home.mkdir(parents=True, exist_ok=True)
    return home / f"{cache.stem}-{digest}.browse.sqlite"


def run_key(run: dict) -> str:
    return f"{run['run_id']}@{run.get('created_at')}"


class Sidecar:
    """Short transactions on a SQLite file; each call opens its own connection (thread-safe)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        existed = self.path.exists()
        try:
            with self._connect() as con:
                con.executescript(SCHEMA)
        except BaseException:
            if not existed:
                self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """A sidecar this call created but could not set up (a full disk): SQLite leaves an empty
        file, which holds nothing anybody could lose."""
        for name in (
            self.path,
            *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "-journal")),
        ):
            try:
                if name.stat().st_size == 0:
                    name.unlink()
            except OSError:
                pass

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection, committed on success and always closed.
        SQLite's errors (a full disk, a damaged file) become one SidecarError line naming the file."""
        try:
            con = sqlite3.connect(self.path, timeout=10)
            try:
                try:
                    con.execute("PRAGMA journal_mode=WAL")
                except sqlite3.OperationalError:
                    pass  # e.g. a network file system without shared memory: the rollback journal works
                with con:
                    yield con
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise SidecarError(f"the browser's file {self.path}: {exc}") from None

    # -- compositions --------------------------------------------------------------------
    def save_composition(
        self,
        layer: str,
        unit: int,
        breadth: int,
        pairs: Iterable[tuple[str, float]],
        singles: Iterable[tuple[str, float]],
    ) -> None:
        now = time.time()
        rows = [
            (self.key, layer, unit, breadth, "pair", r, t, float(s), now) for r, (t, s) in enumerate(pairs)
        ]
        rows += [
            (self.key, layer, unit, breadth, "single", r, t, float(s), now)
            for r, (t, s) in enumerate(singles)
        ]
        with self._connect() as con:  # one transaction: readers see all of it or none
            con.execute(
                "DELETE FROM compositions WHERE run_key = ? AND layer = ? AND unit = ? AND breadth = ?",
                (self.key, layer, unit, breadth),
            )
            con.executemany("INSERT INTO compositions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def composition(
        self, layer: str, unit: int
    ) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]] | None:
        """The most recent stored result for a neuron: (breadth, pairs, singles), best first."""
        with self._connect() as con:
            row = con.execute(
                "SELECT breadth FROM compositions WHERE run_key = ? AND layer = ? AND unit = ? "
                "ORDER BY created_at DESC LIMIT 1",
                (self.key, layer, unit),
            ).fetchone()
            if row is None:
                return None
            rows = con.execute(
                "SELECT kind, text, score FROM compositions WHERE run_key = ? AND layer = ? AND unit = ? "
                "AND breadth = ? ORDER BY kind, rank",
                (self.key, layer, unit, row[0]),
            ).fetchall()
        pairs = [(t, s) for k, t, s in rows if k == "pair"]
        singles = [(t, s) for k, t, s in rows if k == "single"]
        return int(row[0]), pairs, singles

    def composition_time(self, layer: str, unit: int) -> float | None:
        """When this browser last stored a result for the neuron (seconds since the epoch)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT max(created_at) FROM compositions WHERE run_key = ? AND layer = ? AND unit = ?",
                (self.key, layer, unit),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- pins ------------------------------------------------------------------------------
    def pins(self) -> list[tuple[str, int]]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT layer, unit FROM pins WHERE run_key = ? ORDER BY created_at", (self.key,)
            ).fetchall()
        return [(layer, int(unit)) for layer, unit in rows]

    def set_pin(self, layer: str, unit: int, pinned: bool) -> None:
        with self._connect() as con:
            if pinned:
                con.execute(
                    "INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?)", (self.key, layer, unit, time.time())
                )
            else:
                con.execute(
                    "DELETE FROM pins WHERE run_key = ? AND layer = ? AND unit = ?", (self.key, layer, unit)
                )

    # -- concept-query history -------------------------------------------------------------
    def remember_query(self, text: str) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO queries VALUES (?, ?, ?)", (self.key, text, time.time()))

    def recent_queries(self, limit: int = 20) -> list[str]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT text FROM queries WHERE run_key = ? ORDER BY created_at DESC LIMIT ?",
                (self.key, limit),
            ).fetchall()
        return [r[0] for r in rows]
