"""The browser's export is what the screen shows: store.export.export_neurons with the cutoff on
screen (and a `cutoff` column), the on-screen row order (keep_order) and extra score columns."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import duckdb
import pytest
from cache_factory import make_cache

from dissect_tui.store import open_cache
from dissect_tui.store.export import COLUMNS, export_neurons


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = make_cache(tmp_path_factory.mktemp("contract") / "c.duckdb", cutoff=0.16)
    with duckdb.connect(str(path)) as con:  # scores on both sides of the browser's tau = 0.3
        con.execute("UPDATE neurons SET similarity = 0.29 WHERE layer = 'fc' AND unit = 0")
        con.execute("UPDATE neurons SET similarity = 0.31 WHERE layer = 'fc' AND unit = 1")
        con.execute("UPDATE neurons SET similarity = 0.30 WHERE layer = 'fc' AND unit = 2")
    return path


@pytest.fixture()
def reader(db):
    with open_cache(db) as r:
        yield r


def rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        data = list(csv.DictReader(f))
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    return header, data


def test_interpretable_uses_the_cutoff_given_and_writes_it(reader, tmp_path):
    """The browser's case: tau = 0.3 on screen, a neuron at 0.29 is not interpretable in the file,
    although it is at the run's own cutoff (0.16)."""
    keys = [("fc", 0), ("fc", 1), ("fc", 2)]
    out = tmp_path / "view.csv"
    assert export_neurons(reader, 1, out, keys=keys, cutoff=0.3) == 3
    header, data = rows(out)
    assert header == [*COLUMNS, "cutoff"]
    got = {(r["layer"], int(r["unit"])): (r["interpretable"], float(r["cutoff"])) for r in data}
    assert got == {("fc", 0): ("False", 0.3), ("fc", 1): ("True", 0.3), ("fc", 2): ("False", 0.3)}
    export_neurons(reader, 1, out, keys=keys, overwrite=True)  # the run's cutoff, 0.16
    header, data = rows(out)
    assert "cutoff" not in header and [r["interpretable"] for r in data] == ["True", "True", "True"]
    export_neurons(reader, 1, out, keys=keys, cutoff=0.3, interpretable_only=True, overwrite=True)
    assert [(r["layer"], r["unit"]) for r in rows(out)[1]] == [("fc", "1")]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_keep_order_and_extra_columns(reader, tmp_path, suffix):
    # the screen's order: sorted by a query score, layers interleaved; a filtered-out neuron
    keys = [("layer4", 3), ("conv1", 7), ("fc", 0), ("layer4", 0), ("conv1", 1)]
    scores = [0.9, 0.5, -0.25, float("nan"), 0.1]
    out = tmp_path / f"view.{suffix}"
    n = export_neurons(
        reader,
        1,
        out,
        keys=keys,
        cutoff=0.3,
        text="o",  # keeps most: a label or top concept with an "o"
        keep_order=True,
        extra={"query: a red car": scores, "rank": [1, 2, 3, 4, 5]},
    )
    if suffix == "csv":
        header, data = rows(out)
        table = [{k: r[k] for k in header} for r in data]
    else:
        tbl = duckdb.sql(f"SELECT * FROM read_parquet('{out}')")
        header = tbl.columns
        table = [dict(zip(header, map(str, r), strict=True)) for r in tbl.fetchall()]
    assert header == [*COLUMNS, "cutoff", "query: a red car", "rank"]
    got = [(r["layer"], int(r["unit"])) for r in table]
    assert len(got) == n and 0 < n <= len(keys)
    assert got == [k for k in keys if k in got]  # the order of keys, whatever the filter kept
    for r in table:
        i = keys.index((r["layer"], int(r["unit"])))
        value = float(r["query: a red car"]) if r["query: a red car"] not in ("", "None") else math.nan
        assert (math.isnan(value) and math.isnan(scores[i])) or value == scores[i]
        assert float(r["rank"]) == i + 1


def test_without_keep_order_rows_stay_in_network_order(reader, tmp_path):
    keys = [("fc", 3), ("conv1", 2), ("layer4", 5)]
    out = tmp_path / "x.csv"
    export_neurons(reader, 1, out, keys=keys, extra={"score": [3.0, 1.0, 2.0]})
    header, data = rows(out)
    assert [(r["layer"], int(r["unit"]), float(r["score"])) for r in data] == [
        ("conv1", 2, 1.0),
        ("layer4", 5, 2.0),
        ("fc", 3, 3.0),
    ]
    assert header == [*COLUMNS, "score"]


def test_extra_columns_are_checked(reader, tmp_path):
    out = tmp_path / "x.csv"
    with pytest.raises(ValueError, match="need keys"):
        export_neurons(reader, 1, out, extra={"s": [1.0]})
    with pytest.raises(ValueError, match="2 values for 1 keys"):
        export_neurons(reader, 1, out, keys=[("fc", 0)], extra={"s": [1.0, 2.0]})
    with pytest.raises(ValueError, match="standard column"):
        export_neurons(reader, 1, out, keys=[("fc", 0)], extra={"similarity": [1.0]})
    assert list(tmp_path.iterdir()) == []


def test_current_callers_are_unchanged(reader, tmp_path):
    """No cutoff, no order, no extras: the columns and rows the CLI always wrote."""
    out = tmp_path / "x.csv"
    n = export_neurons(reader, 1, out, keys=[("fc", 1), ("conv1", 0)])
    header, data = rows(out)
    assert header == list(COLUMNS) and n == 2
    assert [(r["layer"], r["unit"]) for r in data] == [("conv1", "0"), ("fc", "1")]
