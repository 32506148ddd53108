"""No data loss: what `index --db`, relabel, evaluate and `export --force` may replace, one writer
per cache, leftovers of killed runs, full disks, read-only folders (fault-injection issue 9)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from cache_factory import make_cache
from safety_helpers import built_fixture as built_fixture  # pytest fixture `built`
from safety_helpers import (
    child,
    dot_files,
    one_error_line,
    run_tables,
)
from safety_helpers import tiny_fixture as tiny_fixture  # pytest fixture `tiny`

from dissect_tui import filesafety
from dissect_tui.cli import main
from dissect_tui.errors import CacheError
from dissect_tui.store import open_cache
from dissect_tui.store import writer as writer_module

CLASSES = ["dog", "cat", "water", "sky", "grass", "red", "striped", "wheel", "face", "tree"]


def cli(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(path: Path) -> tuple[int, bytes]:
    return os.lstat(path).st_ino, path.read_bytes()


# -- 1. what `index --db` may overwrite --------------------------------------------------------
def user_db_with_meta(path: Path) -> Path:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '2'), ('owner', 'me')")
    con.execute("CREATE TABLE invoices AS SELECT range AS id FROM range(100)")
    con.close()
    return path


def truncated_cache(path: Path) -> Path:
    make_cache(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_cache(path: Path) -> Path:
    make_cache(path)
    data = bytearray(path.read_bytes())
    for i in range(12288, len(data), 7):  # valid headers, garbage blocks
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def old_version_without_signature(path: Path) -> Path:
    make_cache(path)
    with duckdb.connect(str(path)) as con:
        con.execute("DELETE FROM meta WHERE key IN ('format', 'created_by')")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    return path


def newer_version(path: Path) -> Path:
    make_cache(path)
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (user_db_with_meta, "not a dissect-tui cache"),
        (truncated_cache, "is truncated"),
        (corrupt_cache, "cannot be read as a DuckDB database"),
        (old_version_without_signature, "not a dissect-tui cache"),
        (newer_version, "schema version '3'"),
    ],
    ids=["user-db-with-meta", "truncated-cache", "corrupt-cache", "v1-without-signature", "newer-version"],
)
def test_index_overwrites_only_a_positively_identified_cache(tiny, tmp_path, capsys, make, needle):
    target = make(tmp_path / "x.duckdb")
    before = snapshot(target)
    rc, _, err = cli(capsys, tiny.index_argv(target))
    err = one_error_line(err, rc)
    assert needle in err and "refusing to overwrite" in err and "--db" in err
    assert "open for writing" not in err  # "block" is not "lock"
    assert snapshot(target) == before
    assert dot_files(tmp_path) == []


def test_index_refuses_a_file_another_program_holds_open(tiny, tmp_path, capsys):
    target = make_cache(tmp_path / "x.duckdb")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ok', flush=True); "
         "sys.stdin.readline(); c.close()", str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ok"
        inode = os.lstat(target).st_ino
        rc, _, err = cli(capsys, tiny.index_argv(target))
        err = one_error_line(err, rc)
        assert f"open for writing by another process (process {holder.pid})" in err
        assert "refusing to overwrite" in err
        assert os.lstat(target).st_ino == inode
    finally:
        holder.communicate("\n", timeout=60)
    with open_cache(target) as r:  # still the holder's (the user's) file
        assert r.runs()[0]["target"] == "tiny"
    assert dot_files(tmp_path) == []


def test_index_replaces_its_own_caches_of_both_versions(tiny, built, tmp_path, capsys):
    target = tmp_path / "x.duckdb"
    shutil.copyfile(built, target)
    assert cli(capsys, tiny.index_argv(target))[0] == 0
    old = tmp_path / "v1.duckdb"
    shutil.copyfile(built, old)
    with duckdb.connect(str(old)) as con:  # a version-1 cache as dissect-tui wrote it
        con.execute("DELETE FROM meta WHERE key = 'format'")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        con.execute("ALTER TABLE runs DROP COLUMN template")
    assert cli(capsys, tiny.index_argv(old))[0] == 0
    empty = tmp_path / "empty.duckdb"  # nothing to lose (mktemp made it for us)
    empty.touch()
    assert cli(capsys, tiny.index_argv(empty))[0] == 0
    for db in (target, old, empty):
        with open_cache(db) as r:
            assert r.run()["kind"] == "index" and r.run()["template"] is None
    assert dot_files(tmp_path) == []


# -- 1. devices, FIFOs and symbolic links ----------------------------------------------------------
def test_index_refuses_a_fifo(tiny, tmp_path, capsys):
    fifo = tmp_path / "x.duckdb"
    os.mkfifo(fifo)
    rc, _, err = cli(capsys, tiny.index_argv(fifo))
    assert "is a FIFO" in one_error_line(err, rc) and "not a regular file" in err
    assert os.path.exists(fifo) and not fifo.is_file()
    assert dot_files(tmp_path) == []


def test_index_refuses_a_link_to_a_character_device(tiny, tmp_path, capsys):
    link = tmp_path / "x.duckdb"
    link.symlink_to(os.devnull)
    rc, _, err = cli(capsys, tiny.index_argv(link))
    assert "character device" in one_error_line(err, rc)
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert dot_files(tmp_path) == []


def test_index_through_a_symlink_writes_the_target_and_keeps_the_link(tiny, built, tmp_path, capsys):
    store = tmp_path / "big-disk"
    store.mkdir()
    real = store / "tiny.duckdb"
    shutil.copyfile(built, real)
    link = tmp_path / "tiny.duckdb"
    link.symlink_to(real)
    old_inode = os.lstat(real).st_ino
    assert cli(capsys, tiny.index_argv(link))[0] == 0
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert os.lstat(real).st_ino != old_inode  # the target was replaced by the new cache
    with open_cache(link) as r:
        assert r.run()["kind"] == "index"
    assert dot_files(tmp_path) == [] and dot_files(store) == []


def test_index_refuses_links_to_other_files_and_to_nothing(tiny, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    link = tmp_path / "x.duckdb"
    link.symlink_to(notes)
    rc, _, err = cli(capsys, tiny.index_argv(link))
    assert "not a dissect-tui cache" in one_error_line(err, rc)
    assert notes.read_text() == "mine\n" and link.is_symlink()
    dangling = tmp_path / "y.duckdb"
    dangling.symlink_to(tmp_path / "nowhere" / "z.duckdb")
    rc, _, err = cli(capsys, tiny.index_argv(dangling))
    assert "which does not exist" in one_error_line(err, rc)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("small") / "tiny.duckdb")


def test_export_force_never_replaces_a_fifo_or_device(small, tmp_path, capsys):
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    rc, _, err = cli(capsys, ["export", small, fifo, "--force"])
    assert "is a FIFO" in one_error_line(err, rc)
    assert not fifo.is_file()
    dev = tmp_path / "dev.csv"
    dev.symlink_to(os.devnull)
    rc, _, err = cli(capsys, ["export", small, dev, "--force"])
    assert "character device" in one_error_line(err, rc)
    assert dev.is_symlink()
    assert dot_files(tmp_path) == []


def test_export_force_through_a_symlink_writes_the_target(small, tmp_path, capsys):
    real = tmp_path / "data" / "out.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "out.csv"
    link.symlink_to(real)
    rc, _, err = cli(capsys, ["export", small, link])
    assert "exists; pass --force" in one_error_line(err, rc)
    assert cli(capsys, ["export", small, link, "--force"])[0] == 0
    assert link.is_symlink() and real.read_text().startswith("layer,unit,description,similarity")
    assert dot_files(tmp_path) == [] and dot_files(real.parent) == []


# -- 1. one writer at a time ----------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    """While one relabel is writing the cache, index, relabel, evaluate and analyze refuse with
    the writer's PID instead of both reporting success and one result vanishing."""
    work = tmp_path / "work"
    work.mkdir()
    db = make_cache(tmp_path / "c.duckdb")
    classes = work / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    first = child("pause", ["relabel", db, "--similarity", "cos", "--quiet"], work)
    try:
        line = first.stdout.readline().split()
        assert line[:1] == ["paused"], first.stderr.read()
        pid = int(line[1])
        attempts = [
            ["relabel", db, "--similarity", "wpmi", "--quiet"],
            ["evaluate", db, "--classes", classes, "--mpnet", "none", "--device", "cpu"],
            ["analyze", "interpretability", db],
            ["index", "resnet18", "--db", db, "--weights", "none", "--quiet"],
        ]
        for argv in attempts:
            rc, _, err = cli(capsys, argv)
            err = one_error_line(err, rc)
            assert f"being written by process {pid}" in err, argv
        out, err = first.communicate("\n", timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [r[1] for r in run_tables(db)] == ["index", "relabel"]  # the first writer's run is there
    assert dot_files(tmp_path) == []


def test_a_killed_writer_leaves_nothing_the_next_run_does_not_clean(tmp_path, capsys):
    """SIGKILL: the OS releases the lock; the next writer removes the dead run's temporary file
    (with one note) and its lock file, and touches nothing else."""
    work = tmp_path / "work"
    work.mkdir()
    db = make_cache(tmp_path / "c.duckdb")
    before = db.read_bytes()
    victim = child("pause", ["relabel", db, "--similarity", "cos", "--quiet"], work)
    line = victim.stdout.readline().split()
    assert line[:1] == ["paused"], victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    pid = int(line[1])
    assert dot_files(tmp_path) == sorted([".c.duckdb.lock", f".c.duckdb.tmp-{pid}"])
    assert db.read_bytes() == before
    # names that only look alike, and a temporary file of a process that is alive: kept
    keep = [
        tmp_path / f".c.duckdb.tmp-{os.getppid()}",
        tmp_path / ".c.duckdb.tmp-12x",
        tmp_path / ".d.duckdb.tmp-1",
    ]
    for p in keep:
        p.write_text("not yours")
    rc, _, err = cli(capsys, ["relabel", db, "--similarity", "wpmi", "--quiet"])
    assert rc == 0, err
    assert err.count("\n") == 1 and err.startswith("note: removed 1 leftover temporary file")
    assert f".c.duckdb.tmp-{pid}" in err
    assert dot_files(tmp_path) == sorted(p.name for p in keep)
    assert [r[1] for r in run_tables(db)] == ["index", "relabel"]


def test_shards_of_a_killed_torchrun_rank_are_cleaned_by_the_next_writer(tmp_path, capsys):
    """A SIGKILLed rank leaves .NAME.rankR.tmp-PID (+ .wal, + spill folder): removed like a
    killed writer's file; a live process's shard and look-alike names are kept."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # that process has exited
    db = make_cache(tmp_path / "c.duckdb")
    stale = [tmp_path / f".c.duckdb.rank1.tmp-{pid}", tmp_path / f".c.duckdb.rank1.tmp-{pid}.wal"]
    spill = tmp_path / f".c.duckdb.rank3.tmp-{pid}.tmp"
    spill.mkdir()
    (spill / "duckdb_temp_storage-0.tmp").write_bytes(b"spill")
    keep = [
        tmp_path / f".c.duckdb.rank1.tmp-{os.getpid()}",
        tmp_path / f".c.duckdb.rankX.tmp-{pid}",
        tmp_path / f".c.duckdb.rank2.tmp-{pid}.other",
    ]
    for p in stale + keep:
        p.write_text("shard")
    rc, _, err = cli(capsys, ["relabel", db, "--similarity", "wpmi", "--quiet"])
    assert rc == 0, err
    assert err.startswith("note: removed 3 leftover temporary file"), err
    assert dot_files(tmp_path) == sorted(p.name for p in keep)


def test_lock_file_names_the_owner_and_is_removed(tmp_path):
    final = tmp_path / "c.duckdb"
    lock = filesafety.acquire(final)
    try:
        assert (tmp_path / ".c.duckdb.lock").read_text().strip() == str(os.getpid())
        assert filesafety.acquire(final) is lock  # re-entrant within one process
        code = (
            "import sys; sys.path.insert(0, sys.argv[2]); from dissect_tui import filesafety; "
            "from pathlib import Path\ntry:\n filesafety.acquire(Path(sys.argv[1]))\n"
            "except Exception as e:\n print(e)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(final), str(Path(__file__).resolve().parents[1])],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        assert f"being written by process {os.getpid()}" in out
    finally:
        filesafety.release(final)
    assert dot_files(tmp_path) == []


# -- 3. full disks and read-only folders ----------------------------------------------------------
class DiskFullConnection:
    """A DuckDB connection whose CHECKPOINT (or COMMIT) fails like a full disk: a FatalException,
    after which the database is invalidated and every statement fails."""

    def __init__(self, con, fail_on: str, exc: type[BaseException] = duckdb.FatalException, message=None):
        self._con = con
        self._fail_on = fail_on
        self._exc = exc
        self._message = message or (
            "FATAL Error: Failed to create checkpoint because of error: Could not write file: No space left on device"
        )
        self._dead = False

    def execute(self, sql, *args, **kwargs):
        if self._dead:
            raise duckdb.FatalException(
                "FATAL Error: database has been invalidated because of a previous fatal error"
            )
        if sql.strip().upper().split(" ")[0] == self._fail_on:  # "CHECKPOINT cache" too
            self._dead = True
            raise self._exc(self._message)
        return self._con.execute(sql, *args, **kwargs)

    def close(self):
        self._con.close()

    def __getattr__(self, name):
        return getattr(self._con, name)


def failing_writes(monkeypatch, fail_on: str, **kw) -> None:
    real = duckdb.connect

    def connect(database=":memory:", *args, **kwargs):
        con = real(database, *args, **kwargs)
        # a cache under construction: its own file, or (streamed index) attached to :memory:
        if (".tmp-" in str(database) or str(database) == ":memory:") and not kwargs.get("read_only"):
            return DiskFullConnection(con, fail_on, **kw)
        return con

    monkeypatch.setattr(duckdb, "connect", connect)


@pytest.mark.parametrize("fail_on", ["COMMIT", "CHECKPOINT"])
def test_disk_full_while_indexing_is_one_line_and_leaves_nothing(
    tiny, built, tmp_path, capsys, monkeypatch, fail_on
):
    db = tmp_path / "x.duckdb"
    shutil.copyfile(built, db)
    before = snapshot(db)
    failing_writes(monkeypatch, fail_on)
    rc, _, err = cli(capsys, tiny.index_argv(db))
    err = one_error_line(err, rc)
    assert "the disk is full" in err and str(db) in err
    assert snapshot(db) == before and dot_files(tmp_path) == []


def test_disk_full_while_copying_for_relabel_leaves_no_partial_copy(small, tmp_path, capsys, monkeypatch):
    db = tmp_path / "c.duckdb"
    shutil.copyfile(small, db)
    before = snapshot(db)

    def copy_until_full(src, dst, *a, **k):
        with open(dst, "wb") as out:
            out.write(Path(src).read_bytes()[:5000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.shutil, "copyfile", copy_until_full)
    rc, _, err = cli(capsys, ["relabel", db, "--similarity", "cos", "--quiet"])
    assert "the disk is full" in one_error_line(err, rc)
    assert snapshot(db) == before and dot_files(tmp_path) == []


def test_disk_full_while_saving_metrics(small, tmp_path, capsys, monkeypatch):
    db = tmp_path / "c.duckdb"
    shutil.copyfile(small, db)
    before = snapshot(db)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    failing_writes(monkeypatch, "CHECKPOINT")
    rc, out, err = cli(capsys, ["evaluate", db, "--classes", classes, "--mpnet", "none", "--device", "cpu"])
    assert "the disk is full" in one_error_line(err, rc)
    assert snapshot(db) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "c.duckdb",
        "classes.txt",
    ]


def test_export_into_a_read_only_file_system_is_one_line(small, tmp_path, capsys, monkeypatch):
    """EROFS: writing fails, and so does removing the temporary file that was never created."""
    from dissect_tui.store import export as store_export

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_export, "_write_csv", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    rc, _, err = cli(capsys, ["export", small, tmp_path / "out.csv"])
    assert "Read-only file system" in one_error_line(err, rc)


def test_export_into_a_folder_without_write_permission_is_one_line(small, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else real_access(p, mode, **k)
    )
    rc, _, err = cli(capsys, ["export", small, tmp_path / "out.csv"])
    assert f"cannot write in folder {tmp_path}" in one_error_line(err, rc)
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_removes_files_after_a_fatal_error(tmp_path, monkeypatch):
    failing_writes(monkeypatch, "COMMIT", exc=duckdb.FatalException)
    with pytest.raises(CacheError, match="cannot write the cache"):
        make_cache(tmp_path / "c.duckdb")
    assert list(tmp_path.iterdir()) == []
    assert not filesafety.holds(tmp_path / "c.duckdb")


def test_a_failed_insert_is_reported_by_its_own_error_not_the_aborted_transaction(tmp_path):
    """After a failed INSERT, DuckDB refuses the cleanup of its Arrow view too ("Current
    transaction is aborted"); the line must name what failed (a full disk, here a duplicate key)."""
    final = tmp_path / "c.duckdb"
    make_cache(final)
    before = final.read_bytes()
    with pytest.raises(CacheError) as caught:
        with writer_module.CacheWriter(final) as writer:
            writer.write_images(["a.jpg"], ["folder"], [(4, 4)], [None])
            writer.write_images(["b.jpg"], ["folder"], [(4, 4)], [None])  # image_id 0 again
    line = str(caught.value)
    assert "constraint" in line.lower() and "aborted" not in line, line
    assert line.endswith("; the previous file is untouched")
    assert final.read_bytes() == before and dot_files(tmp_path) == []


def test_registered_keeps_the_statements_error(tmp_path):
    import pyarrow as pa

    from dissect_tui.store.arrow_views import registered

    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER NOT NULL)")
    con.execute("BEGIN TRANSACTION")
    with pytest.raises(duckdb.ConstraintException):
        with registered(con, "_rows", pa.table({"i": pa.array([None], pa.int32())})):
            con.execute("INSERT INTO t SELECT i FROM _rows")
    con.execute("ROLLBACK")
    with registered(con, "_rows", pa.table({"i": pa.array([1, 2], pa.int32())})):
        con.execute("INSERT INTO t SELECT i FROM _rows")
    assert con.execute("SELECT sum(i) FROM t").fetchall() == [(3,)]
    with pytest.raises(duckdb.CatalogException):  # gone after the block
        con.execute("SELECT * FROM _rows")


@pytest.mark.parametrize("existed", [False, True])
def test_a_sidecar_that_cannot_be_set_up_leaves_no_empty_file(tmp_path, monkeypatch, existed):
    """On a full disk SQLite creates the browser's sidecar file and then fails to write its
    schema: the empty file it made goes; one that was there before stays."""
    import sqlite3

    from dissect_tui.store import sidecar as sidecar_module

    path = tmp_path / "x.duckdb.browse.sqlite"
    if existed:
        path.touch()
    real = sqlite3.connect

    class FullDisk:
        def __init__(self, con):
            self._con = con

        def execute(self, sql, *args):  # the WAL pragma, which writes the file's header
            raise sqlite3.OperationalError("database or disk is full")

        executescript = execute

        def __getattr__(self, name):
            return getattr(self._con, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sidecar_module.sqlite3, "connect", lambda *a, **k: FullDisk(real(*a, **k)))
    with pytest.raises(
        sidecar_module.SidecarError, match=r"^the browser's file .*browse\.sqlite: database or disk is full$"
    ):
        sidecar_module.Sidecar(path, "1@now")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["x.duckdb.browse.sqlite"] if existed else [])
