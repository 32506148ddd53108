"""Ctrl-C, SIGTERM and SIGHUP end every command the same way: one line, 128 + the signal, the old
cache intact and nothing left behind — also while DuckDB is busy (fault-injection issue 9).

Real signals are sent to child processes: before the fix a SIGTERM would have killed pytest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import duckdb
import pytest
from cache_factory import make_cache
from safety_helpers import ROOT, TESTS, child, dot_files, run_tables
from safety_helpers import built_fixture as built_fixture  # pytest fixture `built`
from safety_helpers import tiny_fixture as tiny_fixture  # pytest fixture `tiny`

from dissect_tui import signals
from dissect_tui.cli import main


def check_interrupted(proc: subprocess.Popen, code: int, name: str) -> None:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err
    assert err == f"interrupted ({name})\n", err


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_while_index_writes_cleans_up_like_ctrl_c(tiny, built, tmp_path, name, code):
    work = tmp_path / "work"
    work.mkdir()
    db = tmp_path / "tiny.duckdb"
    shutil.copyfile(built, db)
    before = db.read_bytes()
    check_interrupted(child(name, tiny.index_argv(db), work), code, name)
    assert db.read_bytes() == before
    assert dot_files(tmp_path) == []


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_while_relabel_writes_cleans_up_like_ctrl_c(tmp_path, name, code):
    work = tmp_path / "work"
    work.mkdir()
    db = make_cache(tmp_path / "c.duckdb")
    before = db.read_bytes()
    check_interrupted(child(name, ["relabel", db, "--similarity", "cos", "--quiet"], work), code, name)
    assert db.read_bytes() == before
    assert dot_files(tmp_path) == []


LONG_SQL = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from dissect_tui.store import export

    started = threading.Event()
    original = export.stream_query

    def stream_query(reader, sql, *a, **k):
        started.set()
        return original(reader, sql, *a, **k)

    def send():
        started.wait()
        time.sleep(0.5)  # let DuckDB get into the query (earlier would end the same way)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))

    export.stream_query = stream_query
    threading.Thread(target=send, daemon=True).start()
    from dissect_tui.cli import main

    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_stops_a_long_sql_query(tmp_path, name, code):
    """A DuckDB query holds Python signal handlers back until it ends (hours here): SIGTERM
    must interrupt it like Ctrl-C does, and Ctrl-C must exit 130 without a traceback."""
    db = make_cache(tmp_path / "c.duckdb")
    script = tmp_path / "long_sql.py"
    script.write_text(LONG_SQL.format(root=str(ROOT), tests=str(TESTS)), encoding="utf-8")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            name,
            "sql",
            str(db),
            "SELECT sum(range) FROM range(10000000000000000)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err == ("interrupted\n" if code == 130 else f"interrupted ({name})\n"), err


# -- in-process: DuckDB's interrupt error, handlers restored ------------------------------------
class InterruptedAt:
    """Delegates to a real connection; one statement raises what DuckDB raises on Ctrl-C."""

    def __init__(self, con, sql: str) -> None:
        self._con = con
        self._sql = sql

    def execute(self, sql, *args, **kwargs):
        if sql.strip().upper().split(" ")[0] == self._sql:  # "CHECKPOINT cache" too
            raise RuntimeError("Query interrupted")
        return self._con.execute(sql, *args, **kwargs)

    def close(self):
        self._con.close()

    def __getattr__(self, name):
        return getattr(self._con, name)


@pytest.mark.parametrize("statement", ["COMMIT", "CHECKPOINT"])
def test_ctrl_c_during_duckdb_commit_exits_130_with_the_old_cache(
    tiny, built, tmp_path, capsys, monkeypatch, statement
):
    db = tmp_path / "tiny.duckdb"
    shutil.copyfile(built, db)
    before = db.read_bytes()
    real = duckdb.connect

    def connect(database=":memory:", *args, **kwargs):
        con = real(database, *args, **kwargs)
        # the cache under construction: its own file, or (streamed index) attached to :memory:
        building = ".tmp-" in str(database) or str(database) == ":memory:"
        return InterruptedAt(con, statement) if building and not kwargs.get("read_only") else con

    monkeypatch.setattr(duckdb, "connect", connect)
    assert main(tiny.index_argv(db)) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert db.read_bytes() == before and dot_files(tmp_path) == []


def test_ctrl_c_during_relabel_keeps_every_run(tmp_path, capsys, monkeypatch):
    from dissect_tui import scoring

    db = make_cache(tmp_path / "c.duckdb")
    runs = run_tables(db)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "score_layers", interrupted)
    assert main(["relabel", str(db), "--quiet"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert run_tables(db) == runs and dot_files(tmp_path) == []


def test_handlers_are_installed_for_a_command_and_restored_after(tmp_path, capsys, monkeypatch):
    """Our handlers only while a command runs; an ignored SIGHUP (nohup) stays ignored."""
    db = make_cache(tmp_path / "c.duckdb")
    from dissect_tui.store import export as store_export

    seen = {}
    original = store_export.stream_query

    def spy(*a, **k):
        seen["term"] = signal.getsignal(signal.SIGTERM)
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        return original(*a, **k)

    monkeypatch.setattr(store_export, "stream_query", spy)
    before_term = signal.getsignal(signal.SIGTERM)
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(["sql", str(db), "SELECT 1", "--csv"]) == 0
        assert seen["term"] is signals._handler and seen["hup"] is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before_term
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left behind
    finally:
        signal.signal(signal.SIGHUP, before_hup)
    assert capsys.readouterr().out == "1\n1\n"


def test_interrupt_errors_are_recognised():
    assert signals.is_interrupt(KeyboardInterrupt())
    assert signals.is_interrupt(signals.Terminated(signal.SIGTERM))
    assert signals.is_interrupt(RuntimeError("Query interrupted"))
    assert signals.is_interrupt(duckdb.InterruptException("INTERRUPT Error: Interrupted!"))
    assert not signals.is_interrupt(RuntimeError("something else"))
    assert not signals.is_interrupt(duckdb.IOException("IO Error"))
    assert signals.exit_code(signals.Terminated(signal.SIGHUP)) == 129
    assert signals.exit_code(KeyboardInterrupt()) == 130


def test_deferred_signals_arrive_after_the_cleanup():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("cleaned")  # a KeyboardInterrupt here would skip this
        assert steps == ["cleaned"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_that_lands_before_a_statement_starts_is_repeated(monkeypatch):
    """The watcher interrupts the tracked connections again for a few seconds after a signal: a
    query that had not started when the first interrupt came (so it was lost) is still stopped."""
    import threading
    import time

    class Connection:
        def __init__(self) -> None:
            self.calls: list[float] = []

        def interrupt(self) -> None:
            self.calls.append(time.monotonic())

    monkeypatch.setattr(signals, "REPEAT_FOR", 0.5)
    con = signals.track(Connection())
    read_fd, write_fd = os.pipe()
    watcher = threading.Thread(target=signals._watch, args=(read_fd,), daemon=True)
    watcher.start()
    try:
        time.sleep(0.3)
        assert con.calls == []  # nothing happens without a signal
        os.write(write_fd, bytes([signal.SIGINT]))
        time.sleep(1.0)
        assert len(con.calls) >= 4, con.calls  # the first one and repeats every 0.1 s
        assert con.calls[-1] - con.calls[0] <= 0.5 + 0.25  # and only for REPEAT_FOR
    finally:
        os.close(write_fd)
        watcher.join(timeout=5)
        os.close(read_fd)
    assert not watcher.is_alive()
