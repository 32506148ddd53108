"""`dissect-tui sql` / `export`, store.export, and the example queries of docs/SQL.md."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
from cache_factory import make_cache

from dissect_tui.cli import main
from dissect_tui.errors import CacheError, UserError
from dissect_tui.store import CacheWriter, open_cache
from dissect_tui.store import export as store_export
from dissect_tui.store.export import COLUMNS, export_neurons
from dissect_tui.store.schema import RELATIONS

DOC = Path(__file__).resolve().parents[1] / "docs" / "SQL.md"
LAYERS = {"conv1": 8, "layer1": 16, "layer4": 16, "fc": 10}


def add_relabel_run(path: Path, seed: int = 1) -> int:
    """A second run over the same activations with other labels, scores and cutoff."""
    rng = np.random.default_rng(seed)
    with open_cache(path) as r:
        layers = [(info.layer, info.n_units) for info in r.layers()]
        _, texts = r.run_concepts(1)
        image_ids, _ = r.image_embeddings()
    texts = [*texts, "lake", "puppy"]
    with CacheWriter(path, base=path) as w:
        run_id = w.add_run(
            kind="relabel",
            parent_run_id=1,
            target="tiny",
            clip_key="tiny:none",
            concept_set="test2",
            n_concepts=len(texts),
            layers=[name for name, _ in layers],
            similarity="soft_wpmi",
            cutoff=0.25,
        )
        cids = w.concept_ids(texts)
        w.write_run_concepts(run_id, cids)
        for layer, k in layers:
            scores = rng.normal(scale=0.2, size=(k, len(texts))).astype(np.float32)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :8]
            # Concepts after the label only, so a --match on the label is not also a top-concept hit.
            rest = top[:, 1:]
            w.write_neuron_concepts(run_id, layer, cids[rest], np.take_along_axis(scores, rest, axis=1))
            w.write_neurons(
                run_id,
                layer,
                [texts[t] for t in top[:, 0]],
                cids[top[:, 0]],
                scores[np.arange(k), top[:, 0]],
                0.25,
            )
        best = rng.integers(0, len(texts), size=(len(image_ids), 1))
        w.write_image_concepts(run_id, image_ids, cids[best], rng.random((len(image_ids), 1)))
        w.commit()
    return run_id


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_cache(tmp_path_factory.mktemp("cache") / "tiny.duckdb", layers=LAYERS)
    add_relabel_run(path)
    return path


@pytest.fixture()
def reader(db: Path):
    with open_cache(db) as r:
        yield r


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- sql -------------------------------------------------------------------------------------------
def test_sql_table_has_headers_right_aligned_numbers_and_row_count(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT layer, n_units FROM layers ORDER BY position")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if "layer" in line and "n_units" in line)
    end = header.index("n_units") + len("n_units")
    for name, k in LAYERS.items():
        row = next(line for line in lines if re.search(rf"\b{name}\b", line) and line is not header)
        assert row[:end].endswith(f" {k}"), (row, header)  # numbers end where the header ends
        assert row.index(name) == header.index("layer")  # text stays left-aligned
    assert "4 rows" in out


def test_sql_limit_truncates_and_says_so(db, reader, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT image_id FROM images ORDER BY image_id", "--limit", "5")
    assert code == 0
    shown = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
    assert shown == ["0", "1", "2", "3", "4"]
    n = reader.query("SELECT count(*) FROM images")[1][0][0]
    assert f"first 5 of {n} rows shown" in out
    code, out, _ = cli(capsys, "sql", db, "SELECT image_id FROM images WHERE image_id < 3")
    assert "3 rows" in out and "shown" not in out


def test_sql_cells_print_literally(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT '[bold]x[/bold]' AS s, NULL AS n, [1.5, 2.5] AS l")
    assert code == 0
    assert "[bold]x[/bold]" in out and "NULL" in out and "[1.5, 2.5]" in out


def _as_csv_field(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def test_sql_csv_round_trips_the_query_result(db, reader, capsys):
    sql = "SELECT run_id, layer, unit, label, similarity, interpretable FROM neurons ORDER BY run_id, layer, unit"
    code, out, _ = cli(capsys, "sql", db, sql, "--csv")
    assert code == 0
    cols, rows = reader.query(sql)
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == cols
    assert len(parsed) - 1 == len(rows) > 1000 - 1000  # every row, no cap
    assert parsed[1:] == [[_as_csv_field(v) for v in row] for row in rows]
    # floats read back to the very same numbers
    assert [float(r[4]) for r in parsed[1:]] == [row[4] for row in rows]


def test_sql_csv_is_never_truncated(db, reader, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT * FROM activations", "--csv", "--limit", "3")
    n = reader.query("SELECT count(*) FROM activations")[1][0][0]
    assert code == 0 and n > 3
    assert len(out.strip().splitlines()) == n + 1


def test_sql_json(db, reader, capsys):
    sql = "SELECT layer, unit, label, similarity FROM latest_neurons ORDER BY layer, unit"
    code, out, _ = cli(capsys, "sql", db, sql, "--json")
    assert code == 0
    cols, rows = reader.query(sql)
    assert json.loads(out) == [dict(zip(cols, row, strict=True)) for row in rows]


def test_sql_bad_sql_is_one_line_exit_2(db, capsys):
    code, out, err = cli(capsys, "sql", db, "SELEC 1")
    assert code == 2 and out == ""
    assert err.startswith("error: SQL error:") and err.count("\n") == 1
    code, _, err = cli(capsys, "sql", db, "SELECT no_such_column FROM neurons")
    assert code == 2 and "no_such_column" in err


@pytest.mark.parametrize(
    "stmt",
    ["INSERT INTO meta VALUES ('x', 'y')", "DELETE FROM neurons", "CREATE TABLE t (a INT)", "DROP VIEW p"],
)
def test_sql_write_statements_are_refused_clearly(db, reader, capsys, stmt):
    before = reader.query("SELECT count(*) FROM neurons")[1]
    code, _, err = cli(capsys, "sql", db, stmt)
    assert code == 2
    assert err.startswith("error: SQL error: the cache is opened read-only") and err.count("\n") == 1
    assert reader.query("SELECT count(*) FROM neurons")[1] == before


def test_sql_query_from_stdin(db, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT count(*) AS n FROM layers\n"))
    code, out, _ = cli(capsys, "sql", db, "-", "--csv")
    assert code == 0 and out.splitlines() == ["n", str(len(LAYERS))]
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    code, _, err = cli(capsys, "sql", db, "-")
    assert code == 2 and "empty query" in err


def test_sql_bad_cache_files(tmp_path, capsys):
    code, _, err = cli(capsys, "sql", tmp_path / "missing.duckdb", "SELECT 1")
    assert code == 2 and "no cache at" in err
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database\n" * 300)
    code, _, err = cli(capsys, "sql", junk, "SELECT 1")
    assert code == 2 and "not a DuckDB file" in err and err.count("\n") == 1
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    code, _, err = cli(capsys, "sql", plain, "SELECT 1")
    assert code == 2 and "not a dissect-tui cache" in err
    code, _, err = cli(capsys, "sql", "nosuchmodel", "SELECT 1")
    assert code == 2 and "no cache for 'nosuchmodel'" in err


def test_sql_model_name_resolves_in_cache_folder(db, tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.duckdb").write_bytes(db.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "sql", "tiny", "SELECT count(*) AS n FROM runs", "--csv")
    assert code == 0 and out.splitlines() == ["n", "2"]


# -- export: expectations computed from the reader, independently of the export SQL ----------------
def expected_rows(reader, run_id, cutoff=None, layers=None, keys=None, interpretable_only=False, text=None):
    text = text.strip() if text else None
    given = [float(cutoff)] if cutoff is not None else []  # an explicit cutoff is written as a column
    cutoff = reader.run(run_id)["cutoff"] if cutoff is None else cutoff
    top: dict[tuple[str, int], list[str]] = {}
    for layer, unit, _rank, concept, _score in reader.neuron_concepts(run_id, limit=5):
        top.setdefault((layer, unit), []).append(concept)
    n = reader.neurons(run_id)
    rows = []
    for layer, unit, label, cid, sim in zip(
        n["layer"], n["unit"], n["label"], n["concept_id"], n["similarity"], strict=True
    ):
        key = (str(layer), int(unit))
        texts = top.get(key, [])
        if layers and key[0] not in layers:
            continue
        if keys is not None and key not in keys:
            continue
        if interpretable_only and not sim > cutoff:
            continue
        if text and not any(text.lower() in t.lower() for t in [str(label), *texts]):
            continue
        rows.append(
            [key[0], key[1], str(label), float(sim), bool(sim > cutoff), int(cid), "; ".join(texts), run_id]
            + given
        )
    return rows


def read_csv(path: Path) -> tuple[list[str], list[list]]:
    with open(path, newline="", encoding="utf-8") as f:
        data = list(csv.reader(f))
    types = [str, int, str, float, lambda s: {"True": True, "False": False}[s], int, str, int]
    types += [float] * (len(data[0]) - len(types))
    return data[0], [[t(v) for t, v in zip(types, row, strict=True)] for row in data[1:]]


def test_export_header_and_all_rows(db, reader, tmp_path):
    out = tmp_path / "all.csv"
    n = export_neurons(reader, 1, out)
    header, rows = read_csv(out)
    assert header[:4] == ["layer", "unit", "description", "similarity"]  # CLIP-Dissect's columns
    assert header == list(COLUMNS)
    assert n == len(rows) == sum(LAYERS.values())
    assert rows == expected_rows(reader, 1)
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), key=list(LAYERS).index)  # network order


@pytest.mark.parametrize(
    "filters",
    [
        {"layers": ["layer4"]},
        {"layers": ["fc", "conv1"]},
        {"interpretable_only": True},
        {"cutoff": 0.35},
        {"cutoff": 0.35, "interpretable_only": True},
        {"text": "dog"},
        {"text": "DOG"},
        {"text": "it's"},
        {"text": "50%"},
        {"text": "%"},
        {"text": "_"},
        {"text": "ÜNÏ"},
        {"text": "  Dog "},
        {"text": "'; DROP TABLE neurons; --"},
        {"keys": [("layer4", 12), ("conv1", 0), ("fc", 99)]},
        {"keys": []},
        {"keys": [("layer1", 3), ("layer4", 5)], "layers": ["layer4"], "text": "a"},
    ],
)
@pytest.mark.parametrize("run_id", [1, 2])
def test_export_filters_match_independent_expectation(db, reader, tmp_path, filters, run_id):
    out = tmp_path / "f.csv"
    n = export_neurons(reader, run_id, out, **filters)
    _, rows = read_csv(out)
    expect = expected_rows(reader, run_id, **filters)
    assert rows == expect and n == len(expect)


def test_export_filters_are_not_vacuous(reader):
    total = sum(LAYERS.values())
    assert 0 < len(expected_rows(reader, 1, interpretable_only=True)) < total
    assert 0 < len(expected_rows(reader, 1, text="dog")) < total
    assert len(expected_rows(reader, 1, text="'; DROP TABLE neurons; --")) == 0
    assert len(expected_rows(reader, 1, text="%")) > 0  # "50% off"


def test_export_parquet_has_the_same_rows(db, reader, tmp_path):
    export_neurons(reader, 2, tmp_path / "n.csv", layers=["layer1", "layer4"])
    n = export_neurons(reader, 2, tmp_path / "n.parquet", layers=["layer1", "layer4"])
    con = duckdb.connect()
    cur = con.execute("SELECT * FROM read_parquet(?)", [str(tmp_path / "n.parquet")])
    assert [d[0] for d in cur.description] == list(COLUMNS)
    rows = [list(r) for r in cur.fetchall()]
    assert rows == read_csv(tmp_path / "n.csv")[1] and len(rows) == n == 32
    # an explicit format beats the suffix
    assert export_neurons(reader, 2, tmp_path / "n.data", fmt="parquet", layers=["fc"]) == LAYERS["fc"]
    count = con.execute("SELECT count(*) FROM read_parquet(?)", [str(tmp_path / "n.data")]).fetchall()
    assert count == [(LAYERS["fc"],)]


def test_export_bad_requests(reader, tmp_path):
    with pytest.raises(UserError, match=r"no layer 'layer9'.*layers: conv1, layer1, layer4, fc"):
        export_neurons(reader, 1, tmp_path / "x.csv", layers=["layer9"])
    with pytest.raises(UserError, match="name it .csv or .parquet"):
        export_neurons(reader, 1, tmp_path / "x.xlsx")
    with pytest.raises(CacheError, match="no run 9"):
        export_neurons(reader, 9, tmp_path / "x.csv")
    with pytest.raises(UserError, match="does not exist"):
        export_neurons(reader, 1, tmp_path / "nope" / "x.csv")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(reader, tmp_path):
    out = tmp_path / "x.csv"
    out.write_text("keep me")
    with pytest.raises(UserError, match="exists; pass --force"):
        export_neurons(reader, 1, out)
    assert out.read_text() == "keep me"
    assert export_neurons(reader, 1, out, overwrite=True) == sum(LAYERS.values())
    assert out.read_text().startswith("layer,unit,description,similarity,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_failed_export_leaves_nothing(reader, tmp_path, monkeypatch, suffix):
    def broken(table, path):
        Path(path).write_text("layer,unit\nhalf")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_export, "_write_csv", broken)
    monkeypatch.setattr("pyarrow.parquet.write_table", broken)
    with pytest.raises(UserError, match="No space left"):
        export_neurons(reader, 1, tmp_path / f"x.{suffix}")
    assert list(tmp_path.iterdir()) == []
    # and a failure does not touch an existing file even with overwrite
    (tmp_path / f"x.{suffix}").write_text("old")
    with pytest.raises(UserError):
        export_neurons(reader, 1, tmp_path / f"x.{suffix}", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"x.{suffix}"]
    assert (tmp_path / f"x.{suffix}").read_text() == "old"


# -- export CLI ----------------------------------------------------------------------------------
def test_export_cli(db, reader, tmp_path, capsys):
    out = tmp_path / "o.csv"
    argv = [
        "export",
        db,
        out,
        "--layer",
        "layer4",
        "--layer",
        "fc",
        "--cutoff",
        "0.3",
        "--interpretable-only",
    ]
    code, stdout, _ = cli(capsys, *argv, "--match", "'%_\"")
    assert code == 0 and stdout == f"wrote 0 neurons to {out}\n"
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "exists; pass --force" in err
    code, stdout, _ = cli(capsys, *argv, "--force")
    expect = expected_rows(reader, 2, cutoff=0.3, layers=["layer4", "fc"], interpretable_only=True)
    assert code == 0 and stdout == f"wrote {len(expect)} neurons to {out}\n"
    assert read_csv(out)[1] == expect  # latest run by default
    code, stdout, _ = cli(capsys, "export", db, tmp_path / "p.parquet", "--run", "1", "--neuron", "layer4:12")
    assert code == 0 and stdout == f"wrote 1 neuron to {tmp_path / 'p.parquet'}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["o.txt"], "name it .csv or .parquet"),
        (["o.csv", "--layer", "nope"], "no layer 'nope' in this cache; layers: conv1, layer1, layer4, fc"),
        (["o.csv", "--run", "5"], "no run 5"),
        (["o.csv", "--neuron", "layer4"], "expected LAYER:UNIT"),
    ],
)
def test_export_cli_errors(db, tmp_path, capsys, args, message):
    code, out, err = cli(capsys, "export", db, tmp_path / args[0], *args[1:])
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""
    assert list(tmp_path.iterdir()) == []


# -- docs/SQL.md ------------------------------------------------------------------------------------
def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def find_query(fragment: str) -> str:
    hits = [q for q in doc_queries() if fragment in q]
    assert len(hits) == 1, f"expected one example query containing {fragment!r}"
    return hits[0]


def test_every_doc_query_runs_and_returns_rows(reader):
    queries = doc_queries()
    assert len(queries) >= 6
    for sql in queries:
        cols, rows = reader.query(sql)
        assert cols and rows, sql


def test_doc_covers_every_relation_and_column(reader):
    text = DOC.read_text(encoding="utf-8")
    for name in RELATIONS:
        assert f"### {name}\n" in text or f"\n| {name} |" in text, name
    sections = re.split(r"\n### ", text)
    sql = "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
    _, tables = reader.query(sql)
    for (table,) in tables:
        section = next(s for s in sections if s.startswith(f"{table}\n"))
        section = section.split("\n## ")[0]
        cols = reader.query("SELECT column_name FROM duckdb_columns() WHERE table_name = ?", [table])[1]
        for (col,) in cols:
            assert re.search(rf"\b{col}\b", section), f"{table}.{col} undocumented"


def test_doc_image_recipes_still_answer_when_image_0_was_skipped(db, tmp_path):
    """Recipes about "an image" pick the first decoded one: image 0 may be unreadable."""
    copy = tmp_path / "skipped0.duckdb"
    copy.write_bytes(db.read_bytes())
    with duckdb.connect(str(copy)) as con:
        con.execute("UPDATE images SET ok = false, error = 'cannot identify image file' WHERE image_id = 0")
        for table in ("image_embeddings", "activation_rows", "top_images", "image_concepts", "image_softmax"):
            con.execute(f"DELETE FROM {table} WHERE image_id = 0")
    with open_cache(copy) as r:
        for fragment in ("p.image_id = (SELECT", "t.image_id = (SELECT"):
            sql = find_query(fragment)
            assert "image_id = 0" not in sql
            assert r.query(sql)[1], fragment


def test_doc_top_images_query(reader):
    _, rows = reader.query(find_query("t.unit = 12"))
    assert [(r[0], r[1]) for r in rows] == [(r[0], r[1]) for r in reader.top_images("layer4", 12, 10)]


def test_doc_dog_query(reader):
    _, rows = reader.query(find_query("label = 'dog'"))
    n = reader.neurons(reader.latest_run_id())
    expect = {
        (str(layer), int(u))
        for layer, u, lab in zip(n["layer"], n["unit"], n["label"], strict=True)
        if lab == "dog"
    }
    assert {(r[0], r[1]) for r in rows} == expect and expect


def test_doc_water_query_matches_numpy(reader):
    ((mean_water, n_water, mean_all),) = reader.query(find_query("'water'"))[1]
    ids, emb = reader.image_embeddings()
    cids, texts = reader.run_concepts(1)
    best = (emb @ reader.concept_embeddings("tiny:none", cids).T).argmax(axis=1)
    water = np.array([texts[b] == "water" for b in best])
    act_ids, acts = reader.unit_activations("layer4", 12)
    assert (act_ids == ids).all() and water.sum() == n_water > 0
    assert mean_water == pytest.approx(acts[water].mean(), rel=1e-5)
    assert mean_all == pytest.approx(acts.mean(), rel=1e-5)


def test_doc_interpretable_share_query(reader):
    rows = reader.query(find_query("AS share"))[1]
    n = reader.neurons(reader.latest_run_id())
    for layer, total, k, share in rows:
        mask = n["layer"] == layer
        assert (total, k) == (mask.sum(), n["interpretable"][mask].sum())
        assert share == pytest.approx(k / total, abs=5.1e-4)  # rounded to 3 places
    assert [r[0] for r in rows] == list(LAYERS)


def test_doc_p_query_matches_embeddings(reader):
    rows = reader.query(find_query("FROM p"))[1]
    ids, emb = reader.image_embeddings()
    cids, texts = reader.run_concepts(1)
    p = emb[list(ids).index(0)] @ reader.concept_embeddings("tiny:none", cids).T
    order = np.argsort(-p)[:10]
    assert [r[0] for r in rows] == [texts[i] for i in order]
    assert [r[1] for r in rows] == pytest.approx(p[order].tolist(), abs=1e-5)


def test_doc_relabel_query(reader):
    rows = reader.query(find_query("kind = 'relabel'"))[1]
    before, after = reader.neurons(1), reader.neurons(2)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (str(a), int(u), str(x), str(y))
        for a, u, x, y in zip(before["layer"], before["unit"], before["label"], after["label"], strict=True)
    ]
    assert any(r[6] for r in rows)


def test_sql_several_statements_print_one_table_each(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT 41 + 1 AS answer; SELECT 'second' AS which")
    assert code == 0
    assert "answer" in out and "42" in out and "which" in out and "second" in out
    assert out.index("answer") < out.index("which")
    code, _, err = cli(capsys, "sql", db, "SELECT 1; SELECT 2", "--csv")
    assert code == 2 and "one result" in err
