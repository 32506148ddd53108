"""Activations of one torchrun rank, in a temporary DuckDB file that rank 0 copies into the cache.

A shard is named like the cache's other temporary files (``.NAME.rankR.tmp-PID``), lives beside
it, holds one table shaped like ``activation_rows``, and is removed by its rank on failure and by
rank 0 once copied (see dissect_tui.distributed).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from dissect_tui import filesafety, signals
from dissect_tui.errors import CacheError
from dissect_tui.store.writer import (
    CacheWriter,
    StreamCommits,
    _float_list_array,
    _reason,
)

SHARD_TABLE = (
    "CREATE TABLE activation_rows (layer VARCHAR NOT NULL, image_id INTEGER NOT NULL, acts FLOAT[] NOT NULL)"
)


def shard_path(final: Path, rank: int) -> Path:
    return filesafety.tmp_name(final.with_name(f"{final.name}.rank{rank}"))


class ShardWriter:
    """Append-only activations of one rank, with small row groups and a transaction ended now
    and then (memory stays bounded, as in CacheWriter(stream=True))."""

    def __init__(self, final: Path, rank: int) -> None:
        self.path = shard_path(Path(final), rank)
        self.commits = StreamCommits()
        self.memory_limit = CacheWriter.STREAM_MEMORY_BYTES
        filesafety.remove_db_files(self.path)
        try:
            self.con = signals.track(duckdb.connect(":memory:"))
            self.con.execute("SET temp_directory = ?", [str(self.path) + ".tmp"])
            self.con.execute(f"SET memory_limit = '{CacheWriter.STREAM_MEMORY_BYTES // (1 << 20)}MB'")
            self.con.execute("SET preserve_insertion_order = false")
            self.con.execute(
                f"ATTACH ? AS shard (ROW_GROUP_SIZE {CacheWriter.STREAM_ROW_GROUP})", [str(self.path)]
            )
            self.con.execute("USE shard")
            self.con.execute("BEGIN TRANSACTION")
            self.con.execute(SHARD_TABLE)
        except duckdb.Error as exc:
            self.remove()
            raise CacheError(f"cannot write {self.path}: {_reason(exc)}") from None

    def append_activations(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        need = max(
            CacheWriter.STREAM_MEMORY_BYTES, CacheWriter.STREAM_ROW_GROUP * acts.shape[1] * 6 + (64 << 20)
        )
        if need > self.memory_limit:  # as CacheWriter._fit_row_group
            self.con.execute(f"SET memory_limit = '{need // (1 << 20)}MB'")
            self.memory_limit = need
        table = pa.table(
            {"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)), "acts": _float_list_array(acts)}
        )
        try:
            self.con.register("_incoming", table)
            self.con.execute("INSERT INTO activation_rows SELECT ?, image_id, acts FROM _incoming", [layer])
            self.con.unregister("_incoming")
            if self.commits.add(len(image_ids), acts.nbytes):
                self.con.execute("COMMIT")
                self.con.execute("BEGIN TRANSACTION")
        except duckdb.Error as exc:
            if signals.is_interrupt(exc):
                raise
            raise CacheError(f"cannot write {self.path}: {_reason(exc)}") from None

    def close(self) -> None:
        try:
            self.con.execute("COMMIT")
            self.con.execute("CHECKPOINT shard")
        finally:
            self.con.close()

    def remove(self) -> None:
        try:
            self.con.close()
        except Exception:  # noqa: BLE001 - already closed or broken
            pass
        filesafety.remove_db_files(self.path)
