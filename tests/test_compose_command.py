"""`dissect-tui compose`: two-concept explanations in batch, stored in the cache (issue 11)."""

from __future__ import annotations

import shutil

import duckdb
import pytest
from test_explain import explainer, make_clip_cache

from dissect_tui.cli import main
from dissect_tui.store.compositions import stored_composition
from dissect_tui.store.reader import open_cache


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    return make_clip_cache(tmp_path_factory.mktemp("compose"))[0]


@pytest.fixture
def cache(clip_cache, tmp_path):
    path = tmp_path / "c.duckdb"
    shutil.copyfile(clip_cache, path)
    return path


def rows(db, sql, params=None):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compose_stores_what_the_browser_computes_for_each_neuron(cache, capsys):
    rc, out, err = cli(
        capsys,
        "compose",
        cache,
        "--layer",
        "layer1",
        "--unit",
        "3",
        "--unit",
        "5",
        "--breadth",
        "4",
        "--quiet",
    )
    assert rc == 0, err
    assert "best pair" in out and "stored 2 compositions" in out
    ex, reader = explainer(cache)
    try:
        for unit in (3, 5):
            breadth, pairs, singles = ex.compose("layer1", unit, 4)
            assert breadth == 4 and len(pairs) == 12
            got = rows(
                cache,
                "SELECT kind, rank, text, score FROM compositions WHERE run_id = 1 AND layer = 'layer1' "
                "AND unit = ? AND breadth = 4 ORDER BY kind, rank",
                [unit],
            )
            want_pairs = [("pair", i + 1, t, s) for i, (t, s) in enumerate(pairs[:10])]
            want_singles = [("single", i + 1, t, s) for i, (t, s) in enumerate(singles[:10])]
            assert [(k, r, t) for k, r, t, _ in got] == [
                (k, r, t) for k, r, t, _ in want_pairs + want_singles
            ]
            assert [s for *_, s in got] == pytest.approx([s for *_, s in want_pairs + want_singles], abs=1e-5)
            assert pairs[0][0] in out
    finally:
        reader.close()
    # a second call replaces that breadth's rows, never duplicates them
    assert (
        cli(capsys, "compose", cache, "--layer", "layer1", "--unit", "3", "--breadth", "4", "--quiet")[0] == 0
    )
    assert rows(cache, "SELECT count(*) FROM compositions WHERE unit = 3 AND breadth = 4") == [(10 + 4,)]


def test_every_neuron_of_a_layer_by_default_and_keep(cache, capsys):
    rc, out, err = cli(
        capsys, "compose", cache, "--layer", "conv1", "--breadth", "3", "--keep", "2", "--quiet"
    )
    assert rc == 0, err
    n_units = rows(cache, "SELECT n_units FROM layers WHERE layer = 'conv1'")[0][0]
    assert rows(cache, "SELECT count(DISTINCT unit), max(rank) FROM compositions WHERE layer = 'conv1'") == [
        (n_units, 2)
    ]
    with open_cache(cache) as r:  # the file is still a valid cache, and the browser's reader finds the result
        found = stored_composition(r.con, 1, "conv1", 0)
    assert found is not None and found[0] == 3 and len(found[1]) == 2 and len(found[2]) == 2


def test_no_save_leaves_the_cache_byte_identical(cache, capsys):
    before = cache.read_bytes()
    rc, out, err = cli(capsys, "compose", cache, "--layer", "layer1", "--unit", "0", "--no-save", "--quiet")
    assert rc == 0, err and "best pair" in out and "stored" not in out
    assert cache.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--layer", "layer1", "--breadth", "1"], "--breadth must be between 2 and 100"),
        (["--layer", "layer1", "--keep", "0"], "--keep must be at least 1"),
        (["--layer", "nope[/x]\x1b]52;c;AA==\x07"], "no layer 'nope[/x]"),
        (["--layer", "layer1", "--unit", "999"], "no unit 999"),
        (["--layer", "layer1", "--clip", "ViT-B-32:/gone.pt"], "CLIP checkpoint file not found: /gone.pt"),
    ],
)
def test_bad_input_is_one_line(cache, capsys, argv, expected):
    before = cache.read_bytes()
    rc, out, err = cli(capsys, "compose", cache, "--quiet", *argv)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "\x1b" not in err and "\x07" not in err
    assert cache.read_bytes() == before


def test_an_older_cache_without_the_relation_gets_it(cache, capsys):
    with duckdb.connect(str(cache)) as con:
        con.execute("DROP TABLE compositions")
    with open_cache(cache) as r:  # still a complete cache
        assert stored_composition(r.con, 1, "layer1", 0) is None
    assert (
        cli(capsys, "compose", cache, "--layer", "layer1", "--unit", "0", "--breadth", "3", "--quiet")[0] == 0
    )
    assert rows(cache, "SELECT count(*) > 0 FROM compositions") == [(True,)]


def test_ctrl_c_leaves_the_cache_untouched(cache, capsys, monkeypatch):
    from dissect_tui import explain

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(explain.Explainer, "compose_many", interrupted)
    before = cache.read_bytes()
    rc, out, err = cli(capsys, "compose", cache, "--layer", "layer1", "--quiet")
    assert rc == 130 and "Traceback" not in err
    assert cache.read_bytes() == before
    assert sorted(p.name for p in cache.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_browser_shows_stored_compositions_at_once(cache, capsys, anyio_backend):
    from dissect_tui.tui.app import BrowserApp
    from dissect_tui.tui.detail import DetailScreen

    assert cli(capsys, "compose", cache, "--layer", "conv1", "--breadth", "3", "--quiet")[0] == 0
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(4):
            await app.workers.wait_for_complete()
            await pilot.pause()
        await pilot.press("enter")
        for _ in range(4):
            await app.workers.wait_for_complete()
            await pilot.pause()
        det = app.screen
        assert isinstance(det, DetailScreen)
        layer, unit = det.key
        best = rows(
            cache,
            "SELECT text FROM compositions WHERE layer = ? AND unit = ? AND kind = 'pair' AND rank = 1 "
            "AND breadth = 3",
            [layer, unit],
        )
        assert best, (layer, unit)
        shown = str(det.query_one("#composition").render())
        assert "from the top 3 concepts" in shown and best[0][0] in shown
