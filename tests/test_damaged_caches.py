"""Damaged caches through the real CLI: browse, sql, export, relabel and evaluate each end in one
`error:` line (exit 2) naming what is wrong, never a traceback or a hang, and change nothing
(fault-injection issue 9: 33 damaged files x 5 commands gave 26 tracebacks and one endless loop).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pytest
from cache_factory import make_cache
from safety_helpers import dot_files

from dissect_tui.cli import main
from dissect_tui.errors import CacheError
from dissect_tui.store import open_cache

CLASSES = ["dog", "cat", "water", "sky", "grass", "red", "striped", "wheel", "face", "tree"]
COMMANDS = ("browse", "sql", "export", "relabel", "evaluate")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("base") / "base.duckdb")


def sql(statements: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with duckdb.connect(str(path)) as con:
            con.execute(statements)

    return damage


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_blocks(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(12288, len(data), 5):  # the headers stay valid
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def junk(path: Path) -> None:
    path.write_bytes(b"definitely not a database\n" * 500)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def foreign_meta(path: Path) -> None:
    path.unlink()
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE meta (id INTEGER, note VARCHAR)")


# Damage found when the cache is opened: every command fails with this text in its one line.
AT_OPEN = {
    "version-abc": (
        sql("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'"),
        "schema version 'abc'",
    ),
    "version-1.0": (
        sql("UPDATE meta SET value = '1.0' WHERE key = 'schema_version'"),
        "schema version '1.0'",
    ),
    "version-missing": (sql("DELETE FROM meta WHERE key = 'schema_version'"), "no schema version"),
    "version-newer": (sql("UPDATE meta SET value = '9' WHERE key = 'schema_version'"), "upgrade dissect-tui"),
    "meta-dropped": (sql("DROP TABLE meta"), "no meta table"),
    "meta-foreign": (foreign_meta, "not a dissect-tui cache"),
    "runs-dropped": (sql("DROP TABLE runs"), "no relation runs"),
    "runs-empty": (sql("DELETE FROM runs"), "holds no finished run"),
    "layers-dropped": (sql("DROP TABLE layers"), "no relation layers"),
    "neurons-dropped": (sql("DROP TABLE neurons"), "no relation neurons"),
    "neuron_concepts-dropped": (sql("DROP TABLE neuron_concepts"), "no relation neuron_concepts"),
    "image_embeddings-dropped": (sql("DROP TABLE image_embeddings"), "no relation image_embeddings"),
    "images-dropped": (sql("DROP TABLE images"), "no relation images"),
    "concepts-dropped": (sql("DROP TABLE concepts"), "no relation concepts"),
    "view-dropped": (sql("DROP VIEW latest_neurons"), "no relation latest_neurons"),
    "column-dropped": (sql("ALTER TABLE neurons DROP COLUMN label"), "no column neurons.label"),
    "template-dropped": (sql("ALTER TABLE runs DROP COLUMN template"), "no column runs.template"),
    "runs-json-invalid": (
        sql("UPDATE runs SET hyperparameters = '{\"a\": 1'"),
        "runs.hyperparameters of run 1",
    ),
    "runs-json-type": (sql("UPDATE runs SET settings = '[1, 2]'"), "runs.settings of run 1"),
    "relabel-own-parent": (
        sql("UPDATE runs SET kind = 'relabel', parent_run_id = run_id"),
        "descends from itself",
    ),
    "relabel-lost-parent": (sql("UPDATE runs SET kind = 'relabel', parent_run_id = 7"), "names parent run 7"),
    "truncated": (truncate, "is truncated"),
    "corrupt-blocks": (corrupt_blocks, "cannot be read as a DuckDB database"),
    "junk": (junk, "not a DuckDB file"),
    "empty": (empty, "is empty"),
}


def argv(command: str, db: Path, tmp_path: Path) -> list[str]:
    if command == "browse":
        return ["browse", str(db)]
    if command == "sql":
        return ["sql", str(db), "SELECT count(*) FROM neurons", "--csv"]
    if command == "export":
        return ["export", str(db), str(tmp_path / "out" / "n.csv")]
    if command == "relabel":
        return ["relabel", str(db), "--similarity", "cos", "--quiet"]
    classes = tmp_path / "out" / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return [
        "evaluate",
        str(db),
        "--classes",
        str(classes),
        "--mpnet",
        "none",
        "--similarity",
        "cos",
        "--device",
        "cpu",
    ]


@pytest.fixture(autouse=True)
def no_ui(monkeypatch):
    """The browser must never start on a damaged file (nor in a test)."""
    from dissect_tui.tui.app import BrowserApp

    def started(self, *a, **k):
        raise AssertionError("the browser UI started")

    monkeypatch.setattr(BrowserApp, "run", started)


def damaged(base: Path, tmp_path: Path, damage: Callable[[Path], None]) -> tuple[Path, bytes]:
    db = tmp_path / "cache" / "damaged.duckdb"
    db.parent.mkdir()
    (tmp_path / "out").mkdir()
    shutil.copyfile(base, db)
    damage(db)
    return db, db.read_bytes()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(AT_OPEN))
def test_damage_found_at_open_is_one_line(base, tmp_path, capsys, command, kind):
    damage, needle = AT_OPEN[kind]
    db, before = damaged(base, tmp_path, damage)
    rc = main(argv(command, db, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), repr(err)
    assert needle in err, err
    assert "open for writing" not in err  # "block" is not "lock"
    assert db.read_bytes() == before
    assert dot_files(db.parent) == [] and not (tmp_path / "out" / "n.csv").exists()


def ragged_activations(layer: str) -> Callable[[Path], None]:
    return sql(f"UPDATE activation_rows SET acts = acts[1:2] WHERE layer = '{layer}' AND image_id % 2 = 0")


# Damage only a reader of that data can see (checking it at open would read every row): the
# commands that read it fail with this text; the others work (exit 0).
LATER = {
    "activations-ragged-fc": (
        ragged_activations("fc"),
        {"relabel": "have 2 values", "evaluate": "have 2 values"},
    ),
    "activations-ragged-conv1": (ragged_activations("conv1"), {"relabel": "have 2 values"}),
    "activations-dropped-rows": (
        sql("DELETE FROM activation_rows WHERE layer = 'fc' AND image_id < 5"),
        {"relabel": "disagree on images"},
    ),
}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "browse"])
@pytest.mark.parametrize("kind", list(LATER))
def test_damage_found_when_read_is_one_line(base, tmp_path, capsys, command, kind):
    damage, failing = LATER[kind]
    db, before = damaged(base, tmp_path, damage)
    rc = main(argv(command, db, tmp_path))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if command in failing:
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), repr(err)
        assert failing[command] in err, err
        assert db.read_bytes() == before
    else:
        assert rc == 0, err
    assert dot_files(db.parent) == []


def test_undamaged_cache_passes_every_command(base, tmp_path, capsys):
    """The baseline: each command of the matrix works on the file before it is damaged."""
    db, _ = damaged(base, tmp_path, lambda p: None)
    for command in COMMANDS[1:]:
        assert main(argv(command, db, tmp_path)) == 0, capsys.readouterr().err
    with pytest.raises(AssertionError, match="browser UI started"):
        main(argv("browse", db, tmp_path))


# -- reader accessors check shapes ---------------------------------------------------------------
def test_accessors_check_shapes(base, tmp_path):
    db = tmp_path / "c.duckdb"
    shutil.copyfile(base, db)
    sql(
        "UPDATE activation_rows SET acts = acts[1:3] WHERE layer = 'layer1' AND image_id = 4;"
        "DELETE FROM top_images WHERE layer = 'conv1' AND unit = 3 AND rank = 2;"
        "UPDATE linear_weights SET weight = weight[1:2] WHERE unit = 1"
    )(db)
    with open_cache(db) as r:
        with pytest.raises(
            CacheError, match=r"1 activation row\(s\) of layer 'layer1' have 3 values.*16 units"
        ):
            r.layer_activations("layer1")
        with pytest.raises(CacheError, match="have 3 values"):
            r.unit_activations("layer1", 0)
        with pytest.raises(CacheError, match="no unit 16 in layer 'layer1'"):
            r.unit_activations("layer1", 16)
        with pytest.raises(CacheError, match="top images of layer 'conv1'"):
            r.layer_top_images("conv1")
        with pytest.raises(CacheError, match="weight rows of layer 'fc'"):
            r.linear_weights("fc")
        ids, acts = r.layer_activations("layer4")  # an undamaged layer still reads
        assert acts.shape == (len(ids), 12) and np.isfinite(acts).all()


def test_reader_turns_database_errors_into_one_line(base, tmp_path):
    """A block that breaks after the cache was opened: CacheError naming the file, not IOException."""
    db = tmp_path / "c.duckdb"
    shutil.copyfile(base, db)
    with open_cache(db) as r:
        size = db.stat().st_size
        with open(db, "r+b") as fh:  # the file changes under the open reader
            fh.truncate(size // 2)
        with pytest.raises(CacheError, match=r"cannot read .*c\.duckdb"):
            for layer in ("conv1", "layer1", "layer4", "fc"):
                r.layer_activations(layer)
                r.neurons(1)


def test_a_cache_rewritten_many_times_is_not_taken_for_truncated(base, tmp_path):
    """After checkpoints DuckDB cuts free blocks off the end of the file while still counting them:
    only blocks in use may be missing from a truncated file."""
    from dissect_tui.store.metrics import save_metrics

    db = tmp_path / "c.duckdb"
    shutil.copyfile(base, db)
    for i in range(4):
        rows = [(f"m{j}", float(j), "x" * 20000) for j in range(200 * (4 - i))]
        save_metrics(db, [(1, f"analysis {i}", rows)])
        with duckdb.connect(str(db)) as con:
            con.execute("DELETE FROM metrics WHERE analysis <> ?", [f"analysis {i}"])
        with open_cache(db) as r:
            assert len(r.runs()) == 1


def test_expected_relations_are_read_from_the_schema_ddl():
    """open_cache's list of relations and columns is the DDL's own (checked against DuckDB)."""
    from dissect_tui.store import schema

    with duckdb.connect() as con:
        con.execute(schema.TABLES)
        con.execute(schema.embedding_tables(4))
        con.execute(schema.VIEWS)
        tables: dict[str, list[str]] = {}
        for table, column in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal "
            "AND table_name IN (SELECT table_name FROM duckdb_tables()) ORDER BY table_name, column_index"
        ).fetchall():
            tables.setdefault(table, []).append(column)
        views = {
            v for (v,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
    expected = schema.expected_columns(schema.SCHEMA_VERSION)
    assert {t: list(c) for t, c in expected.items() if t not in views} == tables
    assert {t for t, c in expected.items() if not c} == views
    assert sorted(expected) == sorted(r for r in schema.RELATIONS if r not in schema.OPTIONAL_RELATIONS)
    assert schema.OPTIONAL_RELATIONS == ("compositions",)  # documented, not required of a file
    assert "template" in expected["runs"] and "template" not in schema.expected_columns(1)["runs"]
