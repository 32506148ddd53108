"""Activations into DuckDB through one INSERT statement, fed while the images stage runs.

Why one statement: DuckDB writes the row groups of a single INSERT to the file as they fill, so
its memory stays near the connection's limit however many rows come (0.35 GB above the process
for 8,192 rows × 65,536 floats at a 256 MB limit). Many small INSERTs in one transaction instead
stay in memory until COMMIT (about 1.1× their size, whatever the limit), and a transaction
shorter than a row group is logged whole at COMMIT (1.5 GB for 904 such rows): so no choice of
commits bounded the memory of a wide layer (bench/RESULTS.md, "Streaming activations").

The statement reads an Arrow stream whose batches come from a small queue: the images stage (the
calling thread) puts batches, a worker thread runs the statement and owns the connection until
``close``. Insertion order must be preserved (DuckDB's default): an unordered parallel insert
leaves row groups that the final checkpoint rewrites (twice the file, 3 GB of memory).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from dissect_tui.store.arrow_views import registered

STREAM_MEMORY_BYTES = 256 << 20  # DuckDB's memory limit while activations stream in
STREAM_ROW_GROUP = 2048  # DuckDB's smallest row group: a wide layer's unfinished one stays small


def connect_for_stream(path: Path, alias: str) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the database file ``path`` attached as ``alias`` (and in use),
    set up for a streamed build: small row groups, STREAM_MEMORY_BYTES, spilling beside the file
    (as a file database would), where the cleanup of leftovers looks for it."""
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET temp_directory = ?", [str(path) + ".tmp"])
        con.execute(f"SET memory_limit = '{STREAM_MEMORY_BYTES >> 20}MB'")
        con.execute(f"ATTACH ? AS {alias} (ROW_GROUP_SIZE {STREAM_ROW_GROUP})", [str(path)])
        con.execute(f"USE {alias}")
    except BaseException:
        con.close()
        raise
    return con


SCHEMA = pa.schema([("layer", pa.string()), ("image_id", pa.int32()), ("acts", pa.list_(pa.float32()))])
BATCH_BYTES = 16 << 20  # rows of one Arrow batch (at least one row)
QUEUE_BATCHES = 2  # batches waiting for DuckDB: the producer blocks beyond this
_POLL_S = 0.1


def float_list_array(matrix: np.ndarray) -> pa.Array:
    """[R, K] float32 -> Arrow list<float> column without a Python loop (large_list past 2^31 values)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, width = matrix.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32 if rows * width < 2**31 else np.int64)
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    if offsets.dtype == np.int64:
        return pa.LargeListArray.from_arrays(offsets, values)
    return pa.ListArray.from_arrays(offsets, values)


def activation_batch(layer: str, image_ids: np.ndarray, acts: np.ndarray) -> pa.RecordBatch:
    """Rows of ``activation_rows`` as one Arrow batch (at most BATCH_BYTES: list<float> offsets)."""
    return pa.record_batch(
        [
            pa.array([layer] * acts.shape[0], type=pa.string()),
            pa.array(np.asarray(image_ids, dtype=np.int32)),
            float_list_array(acts),
        ],
        schema=SCHEMA,
    )


class StreamError(Exception):
    """The INSERT ended early; ``cause`` is DuckDB's error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ActivationStream:
    """One running ``INSERT INTO activation_rows`` on ``con``; ``put`` rows, then ``close``."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._queue: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="dissect-tui-activations", daemon=True)
        self._thread.start()

    def _batches(self) -> Iterator[pa.RecordBatch]:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        try:
            reader = pa.RecordBatchReader.from_batches(SCHEMA, self._batches())
            with registered(self._con, "_activation_stream", reader):
                self._con.execute(
                    "INSERT INTO activation_rows (layer, image_id, acts) "
                    "SELECT layer, image_id, acts FROM _activation_stream"
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the producer
            self._error = exc
            self._stop.set()

    def _check(self) -> None:
        if self._error is not None:
            raise StreamError(self._error)
        if not self._thread.is_alive():
            raise StreamError(RuntimeError("the activation insert ended early"))

    def _put(self, item: pa.RecordBatch | None) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def put(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None:
        """Queue some rows (blocks while DuckDB is behind); raises StreamError if the INSERT failed."""
        step = max(1, BATCH_BYTES // max(1, acts.shape[1] * 4))
        for r0 in range(0, acts.shape[0], step):
            self._put(activation_batch(layer, image_ids[r0 : r0 + step], acts[r0 : r0 + step]))
        self.rows += acts.shape[0]

    def put_batch(self, batch: pa.RecordBatch) -> None:
        """Rows already shaped like ``activation_rows`` (another database's, e.g. a rank's shard)."""
        self._put(pa.Table.from_batches([batch]).cast(SCHEMA).combine_chunks().to_batches()[0])
        self.rows += batch.num_rows

    def close(self) -> None:
        """Every row is in: end the statement and wait for it; raises StreamError if it failed."""
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise StreamError(self._error)

    def cancel(self) -> None:
        """Stop the statement (failure, Ctrl-C); the transaction is then rolled back by its owner."""
        self._stop.set()
        try:
            self._con.interrupt()
        except Exception:  # noqa: BLE001 - a closed connection has nothing to interrupt
            pass
        while self._thread.is_alive():
            try:  # wake a generator waiting for a batch
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(_POLL_S)
