"""Activations of one torchrun rank, in a temporary DuckDB file that rank 0 copies into the cache.

A shard is named like the cache's other temporary files (``.NAME.rankR.tmp-PID``), lives beside
it, holds one table shaped like ``activation_rows``, and is removed by its rank on failure and by
rank 0 once copied (see dissect_tui.distributed).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from dissect_tui import filesafety, signals
from dissect_tui.errors import CacheError
from dissect_tui.store.activation_stream import ActivationStream, StreamError, connect_for_stream
from dissect_tui.store.writer import _reason

SHARD_TABLE = (
    "CREATE TABLE activation_rows (layer VARCHAR NOT NULL, image_id INTEGER NOT NULL, acts FLOAT[] NOT NULL)"
)


def shard_path(final: Path, rank: int) -> Path:
    return filesafety.tmp_name(final.with_name(f"{final.name}.rank{rank}"))


class ShardWriter:
    """Append-only activations of one rank, through one INSERT statement with small row groups
    (memory stays bounded, as in CacheWriter(stream=True))."""

    def __init__(self, final: Path, rank: int) -> None:
        self.path = shard_path(Path(final), rank)
        filesafety.remove_db_files(self.path)
        try:
            self.con = signals.track(connect_for_stream(self.path, "shard"))
            self.con.execute("BEGIN TRANSACTION")
            self.con.execute(SHARD_TABLE)
            self.stream = ActivationStream(self.con)
        except duckdb.Error as exc:
            self.remove()
            raise CacheError(f"cannot write {self.path}: {_reason(exc)}") from None

    def append_activations(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        try:
            self.stream.put(layer, image_ids, acts)
        except StreamError as exc:
            self._raise(exc.cause)

    def close(self) -> None:
        try:
            try:
                self.stream.close()
            except StreamError as exc:
                self._raise(exc.cause)
            self.con.execute("COMMIT")
            self.con.execute("CHECKPOINT shard")
        finally:
            self.con.close()

    def _raise(self, exc: BaseException) -> None:
        if isinstance(exc, duckdb.Error) and not signals.is_interrupt(exc):
            raise CacheError(f"cannot write {self.path}: {_reason(exc)}") from None
        raise exc

    def remove(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.cancel()
        try:
            self.con.close()
        except Exception:  # noqa: BLE001 - already closed or broken
            pass
        filesafety.remove_db_files(self.path)
