"""SQL on a cache is read-only in fact: DuckDB's own settings (store.lockdown), not a statement list.

Each attack below worked before the lock-down: `dissect-tui sql` wrote files (COPY, EXPLAIN ANALYZE
COPY, EXPORT DATABASE, log and profile files), opened other databases — or the same file through a
hard link — for writing, changed settings of the shared connection, and installed extensions into
~/.duckdb (and tried the network). HOME points into tmp_path, so ~/.duckdb is observable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from cache_factory import make_cache

from dissect_tui.cli import main
from dissect_tui.errors import CacheError
from dissect_tui.store import open_cache
from dissect_tui.store.lockdown import is_locked_down, lock_down


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("built") / "tiny.duckdb")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def caches(built: Path, tmp_path: Path, home: Path) -> dict[str, Path]:
    """The cache queried, another cache, a hard link to the first, and a folder for would-be writes."""
    work = tmp_path / "work"
    work.mkdir()
    db = Path(shutil.copy(built, work / "tiny.duckdb"))
    other = Path(shutil.copy(built, work / "other.duckdb"))
    link = work / "same.duckdb"
    os.link(db, link)
    secret = work / "secret.txt"
    secret.write_text("not yours\n")
    return {"db": db, "other": other, "link": link, "secret": secret, "out": work}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def neuron_count(path: Path) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM neurons").fetchall()[0][0]
    finally:
        con.close()


ATTACKS = {
    "copy": "COPY neurons TO '{out}/leak.csv'",
    "explain_analyze_copy": "EXPLAIN ANALYZE COPY neurons TO '{out}/leak.csv'",
    "export_database": "EXPORT DATABASE '{out}/dump'",
    "file_logging": "CALL enable_logging(storage='file', storage_path='{out}/logs'); SELECT 1",
    "query_log": "SET log_query_path = '{out}/q.log'; SELECT 1",
    "profile_file": "SET profiling_output = '{out}/p.json'; PRAGMA enable_profiling = 'json'; SELECT 1",
    "read_other_file": "SELECT * FROM read_text('{secret}')",
    "http": "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "install": "INSTALL httpfs",
    "install_community": "INSTALL h3 FROM community",
    "attach_other_read_write": "ATTACH '{other}' AS o (READ_WRITE); DELETE FROM o.neurons",
    "attach_hard_link_read_write": "ATTACH '{link}' AS l (READ_WRITE); DELETE FROM l.neurons",
    "set_global": "SET GLOBAL threads = 1",
    "set_memory": "SET memory_limit = '1GB'",
    "unlock": "SET lock_configuration = false",
    "persistent_secret": "CREATE PERSISTENT SECRET s (TYPE http, BEARER_TOKEN 'x')",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_sql_cannot_write_install_or_reconfigure(attack, caches, home, tmp_path, capsys):
    sql = ATTACKS[attack].format(**{k: str(v) for k, v in caches.items()})
    before = snapshot(tmp_path)
    code = main(["sql", str(caches["db"]), sql])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("error: SQL error:") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before  # no file written, no cache changed, nothing in ~/.duckdb
    assert not (home / ".duckdb").exists()
    for name in ("db", "other", "link"):
        assert neuron_count(caches[name]) == neuron_count(caches["db"]) > 0


def test_refusals_say_why_in_plain_words(caches, home, capsys):
    code = main(["sql", str(caches["db"]), f"COPY neurons TO '{caches['out']}/leak.csv'"])
    err = capsys.readouterr().err
    assert code == 2 and "only the cache can be read here" in err
    code = main(["sql", str(caches["db"]), "SET threads = 1"])
    err = capsys.readouterr().err
    assert code == 2 and "settings cannot be changed here" in err


def test_maintenance_statements_leave_the_cache_byte_identical(caches, home, tmp_path, capsys):
    before = snapshot(tmp_path)
    for sql in ("CHECKPOINT", "FORCE CHECKPOINT", "VACUUM", "ANALYZE"):
        main(["sql", str(caches["db"]), sql])
    capsys.readouterr()
    assert snapshot(tmp_path) == before


def test_a_session_keeps_its_temp_tables_and_variables(caches, home, tmp_path, capsys):
    """Reading stays free: temporary tables and variables live in memory, for the statements of one run."""
    before = snapshot(tmp_path)
    sql = (
        "CREATE TEMP TABLE t AS SELECT layer, count(*) AS n FROM neurons GROUP BY layer; "
        "SET VARIABLE want = 'layer1'; SELECT n FROM t WHERE layer = getvariable('want')"
    )
    code = main(["sql", str(caches["db"]), sql, "--mode", "line"])
    out = capsys.readouterr().out
    assert code == 0
    assert "n: 16" in out
    assert snapshot(tmp_path) == before


# -- lock_down ---------------------------------------------------------------------------------------
def test_lock_down_holds_for_every_cursor_and_cannot_be_undone(caches, home):
    reader = open_cache(caches["db"])
    try:
        assert not is_locked_down(reader.con)
        lock_down(reader.con)
        lock_down(reader.con)  # idempotent
        cur = reader.con.cursor()
        assert is_locked_down(reader.con) and is_locked_down(cur)
        for sql in ("SET GLOBAL enable_external_access = true", "RESET lock_configuration"):
            with pytest.raises(duckdb.Error):
                cur.execute(sql)
        assert is_locked_down(cur)
        assert cur.execute("SELECT count(*) FROM neurons").fetchall()[0][0] > 0
    finally:
        reader.close()


def test_lock_down_refuses_a_connection_locked_otherwise(home):
    con = duckdb.connect()
    try:
        con.execute("SET lock_configuration = true")  # locked with external access still on
        assert not is_locked_down(con)
        with pytest.raises(CacheError):
            lock_down(con)
    finally:
        con.close()


def test_browser_features_work_on_a_locked_connection(caches, home, tmp_path):
    """Thumbnails, neuron details, similar/correlated units and exports need nothing the lock forbids."""
    from dissect_tui.store import browse
    from dissect_tui.store.export import export_neurons
    from dissect_tui.store.sidecar import Sidecar

    reader = open_cache(caches["db"])
    try:
        lock_down(reader.con)
        run_id = reader.latest_run_id()
        table = browse.load_neuron_table(reader, run_id)
        assert len(table) > 0 and any(table.top_concepts)
        layer, unit = table.layers[int(table.layer_idx[0])], int(table.unit[0])
        detail = browse.neuron_detail(reader, run_id, layer, unit)
        assert detail.top_images and len(detail.activations) > 0
        ids = [r[1] for r in detail.top_images]
        assert browse.thumbnails(reader, ids)
        assert browse.image_paths(reader, ids)
        assert browse.similar_labels(reader, run_id, layer, unit) is not None
        assert browse.correlated_units(reader, layer, unit) is not None
        for name in ("view.csv", "view.parquet"):
            assert export_neurons(reader, run_id, tmp_path / name) == len(table)
        side = Sidecar(tmp_path / "side.sqlite", "k")
        side.set_pin(layer, unit, True)
        assert side.pins() == [(layer, unit)]
        assert np.isfinite(detail.activations).all()
    finally:
        reader.close()


def test_browse_command_locks_the_connection_before_the_app_runs(caches, home, monkeypatch):
    from dissect_tui.tui import app as app_module

    seen = {}

    def fake_run(self):  # the app is not started: only the connection it was given matters
        seen["locked"] = is_locked_down(self.session.reader.con)

    monkeypatch.setattr(app_module.BrowserApp, "run", fake_run)
    assert main(["browse", str(caches["db"]), "--graphics", "none"]) == 0
    assert seen == {"locked": True}


def test_user_queries_refuse_an_unlocked_connection(caches, home):
    """The browser's query function checks the lock, so a caller that forgot it fails loudly."""
    from dissect_tui.store.browse import run_user_query

    reader = open_cache(caches["db"])
    try:
        with pytest.raises(CacheError, match="not locked down"):
            run_user_query(reader, "SELECT 1", limit=10)
        lock_down(reader.con)
        assert run_user_query(reader, "SELECT 41 + 1 AS x", limit=10) == (["x"], [(42,)])
    finally:
        reader.close()
