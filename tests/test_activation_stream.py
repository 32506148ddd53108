"""ActivationStream: one INSERT fed from another thread; failures surface, cancels never hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from safety_helpers import tiny_fixture as tiny_fixture  # pytest fixture `tiny`

from dissect_tui.errors import CacheError
from dissect_tui.store import activation_stream
from dissect_tui.store.activation_stream import ActivationStream, StreamError
from dissect_tui.store.writer import CacheWriter

TABLE = (
    "CREATE TABLE activation_rows (layer VARCHAR NOT NULL, image_id INTEGER NOT NULL, acts FLOAT[] NOT NULL)"
)


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dissect-tui-activations"]


def test_rows_arrive_in_order_split_into_batches(monkeypatch):
    monkeypatch.setattr(activation_stream, "BATCH_BYTES", 3 * 5 * 4)  # three rows of 5 per batch
    con = duckdb.connect(":memory:")
    con.execute(TABLE)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5), dtype=np.float32), rng.standard_normal((4, 3), dtype=np.float32)
    stream = ActivationStream(con)
    stream.put("l1", np.arange(7), a)
    stream.put("l2", np.arange(10, 14), b)
    stream.close()
    assert stream.rows == 11 and not _stream_threads()
    got = con.execute("SELECT layer, image_id, acts FROM activation_rows").fetchall()
    assert [(r[0], r[1]) for r in got] == [("l1", i) for i in range(7)] + [("l2", i) for i in range(10, 14)]
    np.testing.assert_array_equal(np.array([r[2] for r in got[:7]], dtype=np.float32), a)
    np.testing.assert_array_equal(np.array([r[2] for r in got[7:]], dtype=np.float32), b)


def test_a_failing_insert_is_reported_to_the_producer():
    con = duckdb.connect(":memory:")  # no activation_rows table: the INSERT fails at once
    stream = ActivationStream(con)
    with pytest.raises(StreamError, match="activation_rows"):
        for i in range(50):  # more than the queue holds: put() must notice, not block
            stream.put("l", np.array([i]), np.ones((1, 4), dtype=np.float32))
        stream.close()
    assert not _stream_threads()


def test_cancel_while_the_insert_waits_for_rows_ends_the_thread():
    con = duckdb.connect(":memory:")
    con.execute(TABLE)
    con.execute("BEGIN TRANSACTION")
    stream = ActivationStream(con)
    stream.put("l", np.arange(3), np.ones((3, 2), dtype=np.float32))
    stream.cancel()  # the statement is parked in the generator, waiting for the next batch
    assert not _stream_threads()
    con.execute("ROLLBACK")
    assert con.execute("SELECT count(*) FROM activation_rows").fetchall() == [(0,)]


def test_a_failed_streamed_build_leaves_no_thread_and_no_file(tmp_path, monkeypatch):
    """A DuckDB error inside the INSERT's thread becomes the writer's one-line CacheError, which
    names the INSERT's own error (not the aborted transaction it leaves); the temporary file goes."""
    final = tmp_path / "c.duckdb"
    with pytest.raises(
        CacheError, match=r"cannot write the cache .*c\.duckdb: .*NOT NULL.*; nothing was left behind$"
    ):
        with CacheWriter(final, stream=True) as writer:
            writer.append_activations("l", np.arange(2), np.ones((2, 3), dtype=np.float32))
            # rows of another width are fine; a NULL row is not (acts is NOT NULL)
            schema = activation_stream.SCHEMA
            bad = pa.record_batch(
                [pa.array(["l"]), pa.array([2], pa.int32()), pa.nulls(1, schema.field("acts").type)],
                schema=schema,
            )
            writer._activations._put(bad)  # noqa: SLF001 - forging a row DuckDB refuses
            writer.end_stream()
    assert not _stream_threads()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_interrupted_images_stage_cancels_the_insert(tmp_path):
    final = tmp_path / "c.duckdb"
    with pytest.raises(KeyboardInterrupt):
        with CacheWriter(final, stream=True) as writer:
            writer.append_activations("l", np.arange(2), np.ones((2, 3), dtype=np.float32))
            raise KeyboardInterrupt
    assert not _stream_threads()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


MID_STREAM = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from dissect_tui.store import writer
    original = writer.CacheWriter.append_activations
    def append(self, *a):
        original(self, *a)  # the INSERT is running in its thread now
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    writer.CacheWriter.append_activations = append
    from dissect_tui.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize(
    ("name", "code", "line"), [("SIGINT", 130, "interrupted\n"), ("SIGTERM", 143, "interrupted (SIGTERM)\n")]
)
def test_a_signal_while_activations_stream_ends_in_one_line_and_no_litter(tiny, tmp_path, name, code, line):
    from safety_helpers import ROOT, TESTS, dot_files, one_error_line

    script = tmp_path / "mid_stream.py"
    script.write_text(MID_STREAM.format(root=str(ROOT), tests=str(TESTS)), encoding="utf-8")
    db = tmp_path / "c.duckdb"
    out = subprocess.run(
        [sys.executable, str(script), name, *tiny.index_argv(db)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
    )
    assert one_error_line(out.stderr, out.returncode, code) == line
    assert not db.exists() and dot_files(tmp_path) == []
