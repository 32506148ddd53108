"""Pilot-driven tests of `dissect-tui browse` on a small generated cache."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from cache_factory import make_cache
from pilot_helpers import settle

from dissect_tui.cli import main as cli_main
from dissect_tui.store.reader import open_cache
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.help import HelpScreen
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.neuron_table import NeuronTable
from dissect_tui.tui.sql import SqlScreen

SIZE = (80, 24)


pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin, asyncio backend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.duckdb")


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    """A private copy, so each test's sidecar (pins, compositions) starts empty."""
    return Path(shutil.copy(built_cache, tmp_path / "tiny.duckdb"))


def make_app(path: Path, graphics: str = "none") -> BrowserApp:
    return BrowserApp(open_cache(path), graphics=graphics, image_cls=None)


def main_screen(app: BrowserApp) -> MainScreen:
    screen = app.screen
    assert isinstance(screen, MainScreen), type(screen)
    return screen


def shown(app: BrowserApp) -> list[tuple[str, int]]:
    scr = main_screen(app)
    return [scr.session.model.key(int(r)) for r in scr.query_one(NeuronTable).rows]


def expected_neurons(
    path: Path, sql_where: str = "TRUE", params: list | None = None
) -> list[tuple[str, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [
            (r[0], int(r[1]))
            for r in con.execute(
                "SELECT n.layer, n.unit FROM neurons n JOIN layers l USING (layer) "
                f"WHERE {sql_where} ORDER BY l.position, n.unit",
                params or [],
            ).fetchall()
        ]
    finally:
        con.close()


async def test_main_screen_lists_every_neuron(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert shown(app) == expected_neurons(cache)
        title = str(app.screen.query_one("#title").render())
        assert "46 neurons" in title


async def test_text_filter_matches_labels_and_top_concepts(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"cat")
        rows = shown(app)
        want = expected_neurons(
            cache,
            "lower(n.label) LIKE '%cat%' OR EXISTS (SELECT 1 FROM neuron_concepts nc JOIN concepts c "
            "USING (concept_id) WHERE nc.layer = n.layer AND nc.unit = n.unit AND nc.rank <= 5 "
            "AND lower(c.text) LIKE '%cat%')",
        )
        assert rows == want and 0 < len(rows) < 46
        # Escape leaves the box; the filter stays.
        await pilot.press("escape")
        assert isinstance(app.focused, NeuronTable)
        assert shown(app) == want


async def test_text_filter_stays_under_a_concept_query(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"cat[x", "backspace", "backspace", "escape")
        filtered = shown(app)
        assert 0 < len(filtered) < 46
        await pilot.press("c")  # the box empties for the query; the filter keeps applying
        scr = main_screen(app)
        box = scr.query_one("#filter")
        assert box.value == "" and shown(app) == filtered
        assert "filter “cat”" in str(scr.query_one("#status").render())
        await pilot.press("escape", "slash")  # back to the text filter: the box shows it again
        assert box.value == "cat" and shown(app) == filtered
        await pilot.press("escape", "x")
        assert len(shown(app)) == 46 and box.value == ""
        await pilot.press("slash", *"[/b]", "escape", "c")  # markup-like text is shown as typed
        assert "filter “[/b]”" in str(scr.query_one("#status").render())


def footer_text(app: BrowserApp) -> str:
    """The footer line as it is drawn."""
    from textual.widgets import Footer

    footer = app.screen.query_one(Footer)
    return app.screen._compositor.render_strips()[footer.region.y].text


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_footer_shows_the_essential_keys_first_and_esc_while_typing(cache, size):
    def offered(app) -> set[str]:
        return {b.binding.action for b in app.screen.active_bindings.values()}

    app = make_app(cache)
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        footer = footer_text(app)
        # q and ? never fall off the edge, and the palette key is always there.
        assert "q Quit" in footer and "? Help" in footer and "^p Commands" in footer, footer
        assert footer.index("q Quit") < footer.index("/ Filter") < footer.index("c Query")
        if size[0] >= 120:
            for key in ("2 A+B", "+- τ", "i ✓only", "s Sort", "e Export", ": SQL"):
                assert key in footer, (key, footer)
        assert {"app.quit", "app.help", "cutoff(1)", "cycle_sort"} <= offered(app)
        await pilot.press("slash")
        await pilot.pause()
        typing = offered(app)
        assert not typing & {"quit", "app.quit", "app.help", "sql", "cutoff(1)", "cutoff(-1)", "cycle_sort"}
        footer = footer_text(app)
        assert "esc Back" in footer and "Quit" not in footer and "Filter" not in footer, footer
        await pilot.press("q", "plus")  # typed, not run
        assert main_screen(app).query_one("#filter").value == "q+" and app.return_code is None
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.focused, NeuronTable)
        assert {"app.quit", "app.help", "cutoff(1)", "cycle_sort"} <= offered(app)
        assert "esc Back" not in footer_text(app)  # nothing to go back from


ODD_TEXTS = ["50%", "it's", "ÜNÏCODE", "'; DROP TABLE neurons; --", "x" * 5000, '"%_\\', "   "]


async def test_odd_filter_text_is_harmless(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash")
        scr = main_screen(app)
        hay = [
            f"{a}\t{b}".casefold()
            for a, b in zip(scr.session.model.table.label, scr.session.model.table.top_concepts, strict=True)
        ]
        for text in ODD_TEXTS:
            app.screen.query_one("#filter").value = text
            await pilot.pause()
            needle = text.strip().casefold()
            want = [scr.session.model.key(i) for i, h in enumerate(hay) if needle in h]
            assert shown(app) == want, text
            if not want:  # an empty view says why, and Enter/m on it do nothing
                table = scr.query_one(NeuronTable)
                assert "no neuron matches" in table.render_line(2).text
                table.focus()
                await pilot.press("enter", "m")
                assert app.screen is scr and not scr.session.model.pinned.any()
                scr.query_one("#filter").focus()
        assert len(shown(app)) == 46  # blank text: no filter
    assert len(expected_neurons(cache)) == 46  # the cache is untouched


async def test_layer_filter_one_and_several(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("l", "space")  # first layer: conv1
        await pilot.pause()
        assert {k[0] for k in shown(app)} == {"conv1"}
        await pilot.press("down", "down", "space")  # and layer4
        await pilot.pause()
        assert shown(app) == expected_neurons(cache, "n.layer IN ('conv1', 'layer4')")
        assert "layers conv1,layer4" in str(app.screen.query_one("#status").render())
        # Selection is marked by a symbol, not only by the checkbox colour.
        sel = app.screen.query_one("#layers")
        marks = [str(sel.get_option_at_index(i).prompt)[0] for i in range(sel.option_count)]
        assert marks == ["●", "○", "●", "○"]
        await pilot.press("tab", "a")
        await pilot.pause()
        assert len(shown(app)) == 46


async def test_cutoff_steps_and_interpretable_only(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        scr = main_screen(app)
        assert scr.session.filters.cutoff == pytest.approx(0.16)  # the run's cutoff
        await pilot.press("i")
        assert shown(app) == expected_neurons(cache, "n.similarity > 0.16")
        for _ in range(15):
            await pilot.press("plus")
        assert scr.session.filters.cutoff == pytest.approx(0.31)
        assert shown(app) == expected_neurons(cache, "n.similarity > 0.31")
        status = str(app.screen.query_one("#status").render())
        assert "τ=0.310" in status and f"({len(shown(app))}/46" in status
        await pilot.press("minus")
        assert scr.session.filters.cutoff == pytest.approx(0.30)
        # Exact value through the dialog; a bad value is refused without closing it.
        await pilot.press("t")
        box = app.screen.query_one("#value")
        box.value = "abc"
        await pilot.press("enter")
        assert "enter a number" in str(app.screen.query_one("#error").render())
        box.value = "0.4"
        await pilot.press("enter")
        await pilot.pause()
        assert scr.session.filters.cutoff == pytest.approx(0.4)
        assert shown(app) == expected_neurons(cache, "n.similarity > 0.4")
        # Layer counts follow the cutoff.
        layers = [str(o.prompt) for o in app.screen.query_one("#layers")._options]
        n_conv1 = len(expected_neurons(cache, "n.layer = 'conv1' AND n.similarity > 0.4"))
        assert layers[0].split()[-1] == f"{100 * n_conv1 / 8:.0f}%"
        await pilot.press("i")
        assert len(shown(app)) == 46


async def test_sorting_by_score_and_reverse(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        scr = main_screen(app)
        while scr.session.sort != "score":
            await pilot.press("s")
        sims = [scr.session.model.table.similarity[int(r)] for r in scr.query_one(NeuronTable).rows]
        assert sims == sorted(sims, reverse=True)
        await pilot.press("r")
        sims = [scr.session.model.table.similarity[int(r)] for r in scr.query_one(NeuronTable).rows]
        assert sims == sorted(sims)
        while scr.session.sort != "label":
            await pilot.press("s")
        labels = [scr.session.model.table.label[int(r)] for r in scr.query_one(NeuronTable).rows]
        assert labels == sorted(labels)


async def test_open_neuron_next_previous_back_related(cache):
    app = make_app(cache)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("down", "down", "enter")
        await settle(app, pilot)
        det = app.screen
        assert isinstance(det, DetailScreen)
        assert det.key == ("conv1", 2)
        rdr = open_cache(cache)
        try:
            tops = rdr.top_images("conv1", 2, limit=10)
        finally:
            rdr.close()
        captions = [str(s.render()) for s in det.query("#top-images .thumb-caption")]
        assert len(captions) == 10
        assert all(
            c.startswith(f"#{rank} {act:.3f}") for c, (rank, _, act, _) in zip(captions, tops, strict=True)
        )
        assert "conv1:2" in str(det.query_one("#d-title").render())
        concepts = str(det.query_one("#concepts").render())
        assert det.detail is not None and det.detail.concepts[0][0] in concepts
        assert len(det.detail.activations) == 80
        assert [b for b, _ in det.detail.samples] == ["top 0.1%", "top 1%", "top 5%"]
        await pilot.press("n")
        await settle(app, pilot)
        assert det.key == ("conv1", 3)
        await pilot.press("p", "p")
        await settle(app, pilot)
        assert det.key == ("conv1", 1)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("home", "enter")
        await settle(app, pilot)
        det = app.screen
        sim = det.query_one("#similar")
        corr = det.query_one("#correlated")
        assert sim.option_count > 0 and corr.option_count > 0
        # conv1:0 is labelled "dog": the nearest label is another "dog" neuron (cosine 1).
        first = sim.get_option_at_index(0)
        assert "dog" in str(first.prompt) and "(1.00)" in str(first.prompt)
        # The most correlated unit agrees with numpy over all 80 images (fewer than the sample cap).
        rdr = open_cache(cache)
        try:
            _, acts = rdr.layer_activations("conv1")
        finally:
            rdr.close()
        r = np.corrcoef(acts.T)[0]
        r[0] = -np.inf
        assert str(corr.get_option_at_index(0).prompt).startswith(f"conv1:{int(np.argmax(r))} ")
        assert f"r={r.max():.2f}" in str(corr.get_option_at_index(0).prompt)
        rs = [float(str(corr.get_option_at_index(i).prompt).rsplit("r=", 1)[1].rstrip(")"))
              for i in range(corr.option_count)]  # fmt: skip
        assert rs == sorted(rs, reverse=True) and all(-1 <= r <= 1 for r in rs)
        # Selecting one opens it; Esc comes back.
        sim.focus()
        sim.highlighted = 0
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, DetailScreen) and app.screen is not det
        await pilot.press("escape")
        assert app.screen is det


async def test_next_follows_the_filtered_view(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"dog", "enter")
        view = shown(app)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.screen.key == view[0]
        await pilot.press("right")
        await settle(app, pilot)
        assert app.screen.key == view[1]
        # Esc comes back with the table cursor on the neuron n/→ led to, not where Enter was.
        await pilot.press("escape")
        await pilot.pause()
        table = main_screen(app).query_one(NeuronTable)
        assert main_screen(app).session.model.key(table.current_row()) == view[1]


async def test_missing_thumbnail_shows_placeholder(tmp_path):
    from dissect_tui.store.writer import CacheWriter

    src = make_cache(tmp_path / "a.duckdb")
    with CacheWriter(tmp_path / "b.duckdb", base=src) as w:
        w.con.execute("DELETE FROM thumbnails WHERE image_id IN (SELECT image_id FROM top_images "
                      "WHERE layer = 'conv1' AND unit = 0 AND rank = 1)")  # fmt: skip
        w.commit()
    app = make_app(tmp_path / "b.duckdb", graphics="none")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        first = app.screen.query("#top-images Thumb").first()
        assert "no thumbnail" in str(first.query_one(".thumb-missing").render())


async def test_help_screen_lists_keys(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        from dissect_tui.tui.app import help_sections
        from dissect_tui.tui.help import help_table

        rendered = "".join(seg.text for seg in app.console.render(help_table(help_sections())))
        for needle in (
            "Two-concept search",
            "Concept query",
            "Type an exact cutoff",
            "Export the view",
            "Next neuron",
            "Previous neuron",
            "SQL over the cache",
            "Quit",
            "Command palette",
        ):
            assert needle in rendered, needle
        # Every key once: the table's moves are not listed again after the navigation section,
        # the global keys not again in each screen.
        lines = rendered.splitlines()
        for key in ("↑/↓", "PgUp/PgDn", "Home/End", "q ", "? ", ": "):
            assert sum(line.startswith(key) for line in lines) == 1, key
        # Keys read as on the keyboard, not as Textual's internal names.
        assert "Esc" in rendered and "Ctrl+L" in rendered and "Ctrl+P" in rendered and "PgDn" in rendered
        assert not any(name in rendered for name in ("escape", "pagedown", "ctrl+"))
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_sql_screen_runs_queries_read_only(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("colon")
        assert isinstance(app.screen, SqlScreen)
        box = app.screen.query_one("#sql-input")
        box.text = "SELECT layer, count(*) AS n FROM neurons WHERE layer = 'layer1' GROUP BY layer"
        await pilot.press("f5")
        await settle(app, pilot)
        table = app.screen.query_one("#sql-result")
        assert table.row_count == 1
        assert [str(c) for c in table.get_row_at(0)] == ["layer1", "16"]
        app.screen.query_one("#sql-input").focus()
        box.text = "DELETE FROM neurons"
        await pilot.press("f5")
        await settle(app, pilot)
        status = str(app.screen.query_one("#sql-status").render())
        assert "SQL error" in status and "read-only" in status.lower()
        # DuckDB's read-only mode still lets COPY write a file: the locked-down connection refuses it.
        box.text = f"COPY neurons TO '{cache.parent / 'leak.csv'}'"
        await pilot.press("f5")
        await settle(app, pilot)
        assert "only the cache can be read" in str(app.screen.query_one("#sql-status").render())
        assert not (cache.parent / "leak.csv").exists()
        box.text = "SELEC nonsense"
        await pilot.press("f5")
        await settle(app, pilot)
        assert "SQL error" in str(app.screen.query_one("#sql-status").render())
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
    assert len(expected_neurons(cache)) == 46


async def test_export_view_and_pinned(cache, tmp_path):
    pytest.importorskip("dissect_tui.store.export")
    app = make_app(cache)
    out = tmp_path / "view.csv"
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"sky", "escape")
        view = shown(app)
        await pilot.press("e")
        app.screen.query_one("#path").value = str(out)
        await pilot.press("enter")
        await settle(app, pilot)
        # Pin two neurons and export only those, as Parquet.
        await pilot.press("x", "home", "m", "down", "m")
        await pilot.press("E")
        app.screen.query_one("#path").value = str(tmp_path / "pinned.parquet")
        await pilot.press("enter")
        await settle(app, pilot)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["layer", "unit", "description", "similarity"]
    assert [(r[0], int(r[1])) for r in rows[1:]] == view
    import pyarrow.parquet as pq

    pinned = pq.read_table(tmp_path / "pinned.parquet").to_pylist()
    assert sorted((r["layer"], r["unit"]) for r in pinned) == [("conv1", 0), ("conv1", 1)]


async def test_pins_persist_in_sidecar(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("down", "m")
        await settle(app, pilot)
    assert (cache.parent / "tiny.duckdb.browse.sqlite").exists()
    app = make_app(cache)  # a new session
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("M")
        assert shown(app) == [("conv1", 1)]


async def test_pins_on_a_full_disk_say_so_once_and_name_the_file(cache, monkeypatch):
    """The sidecar fails after the browser started (the disk filled up): each pin's save fails,
    one error toast names the file — the same line is not stacked for every further pin."""
    import sqlite3

    from dissect_tui.store import sidecar as sidecar_module

    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)

        def full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(sidecar_module.sqlite3, "connect", full)
        for _ in range(4):
            await pilot.press("m", "down")
            await settle(app, pilot)
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert errors == [
            f"error: the browser's file {cache.parent / 'tiny.duckdb.browse.sqlite'}: database or disk is full"
        ]
        assert app.return_code is None and len(main_screen(app).session.model.pinned.nonzero()[0]) == 4


async def test_concept_query_without_clip_falls_back_to_substring(cache, monkeypatch):
    """When the run's CLIP cannot be loaded (Explainer raises UserError, see test_explain.py),
    the query turns into a substring search. Stubbed here so this test needs no torch."""
    from dissect_tui.errors import UserError

    class NoClip:
        def query_scores(self, texts, table):
            raise UserError("concept queries need this run's CLIP (tiny:none): not on this machine")

    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: NoClip())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("c", *"dog", "enter")
        await settle(app, pilot)
        scr = main_screen(app)
        assert scr.mode == "text" and scr.session.filters.text == "dog"
        assert scr.session.model.query is None
        assert shown(app) and all("dog" in scr.session.model.table.label[scr.session.model.row_of(*k)]
                                  + scr.session.model.table.top_concepts[scr.session.model.row_of(*k)] for k in shown(app))  # fmt: skip


# -- the command line: bad caches give one clear line, no traceback -------------------------
def _run_cli(args, capsys) -> tuple[int, str]:
    code = cli_main(["browse", *args])
    err = capsys.readouterr().err
    return code, err


def test_bad_caches(tmp_path, capsys):
    code, err = _run_cli([str(tmp_path / "missing.duckdb")], capsys)
    assert code == 2 and "no cache at" in err and "Traceback" not in err

    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"this is not a database" * 100)
    code, err = _run_cli([str(junk)], capsys)
    assert code == 2 and "not a DuckDB file" in err

    empty = tmp_path / "empty.duckdb"
    empty.touch()
    code, err = _run_cli([str(empty)], capsys)
    assert code == 2 and "empty" in err

    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    code, err = _run_cli([str(other)], capsys)
    assert code == 2 and "not a dissect-tui cache" in err

    newer = tmp_path / "newer.duckdb"
    con = duckdb.connect(str(newer))
    con.execute(
        "CREATE TABLE meta (key VARCHAR, value VARCHAR); INSERT INTO meta VALUES ('schema_version', '99')"
    )
    con.close()
    code, err = _run_cli([str(newer)], capsys)
    assert code == 2 and "schema version 99" in err and "upgrade" in err

    norun = tmp_path / "norun.duckdb"
    con = duckdb.connect(str(norun))
    con.execute(
        "CREATE TABLE meta (key VARCHAR, value VARCHAR); INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE runs (run_id INTEGER)"
    )
    con.close()
    code, err = _run_cli([str(norun)], capsys)
    assert code == 2 and "no finished run" in err

    code, err = _run_cli(["--cache-dir", str(tmp_path / "nowhere"), "resnet50"], capsys)
    assert code == 2 and "no cache for 'resnet50'" in err


def test_unknown_run_is_a_clear_error(cache, capsys):
    code, err = _run_cli([str(cache), "--run", "7"], capsys)
    assert code == 2 and "no run 7" in err


def test_cache_locked_by_a_writer(cache, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(cache)!r}); print('ok', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ok"
        code, err = _run_cli([str(cache)], capsys)
        assert code == 2 and "open for writing by another process" in err
    finally:
        holder.kill()
        holder.wait()


async def test_sql_long_query_is_cancellable(cache):
    """Esc stops a running query (DuckDB interrupt) instead of leaving it to block the app's exit."""
    import anyio

    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("colon")
        scr = app.screen
        box = scr.query_one("#sql-input")
        box.text = ""
        await pilot.press("f5")
        assert "type a query" in str(scr.query_one("#sql-status").render())
        box.text = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"  # minutes
        await pilot.press("f5")
        for _ in range(200):
            if scr._query_cursor is not None:
                break
            await pilot.pause(0.01)
        await pilot.pause(0.3)
        await pilot.press("escape")
        with anyio.fail_after(30):
            await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen is scr and "cancelled" in str(scr.query_one("#sql-status").render())
        box.text = "SELECT NULL AS x"
        await pilot.press("f5")
        await settle(app, pilot)
        assert [str(c) for c in scr.query_one("#sql-result").get_row_at(0)] == ["NULL"]
        assert str(scr.query_one("#sql-status").render()).startswith("1 row ")


async def test_export_checks_folder_and_asks_before_overwriting(cache, tmp_path):
    pytest.importorskip("dissect_tui.store.export")
    from dissect_tui.tui.dialogs import ExportDialog

    out = tmp_path / "view.csv"
    out.write_text("old\n")
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("e")
        dialog = app.screen
        dialog.query_one("#path").value = str(tmp_path / "missing" / "x.csv")
        await pilot.press("enter")
        assert app.screen is dialog and "does not exist" in str(dialog.query_one("#error").render())
        dialog.query_one("#path").value = str(out)
        await pilot.press("enter")
        assert app.screen is dialog and "Enter again to overwrite" in str(dialog.query_one("#error").render())
        await pilot.press("enter")
        await settle(app, pilot)
        assert not isinstance(app.screen, ExportDialog)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["layer", "unit"] and len(rows) == 1 + 46


async def test_80_columns_keep_query_scores_and_status_readable(cache, monkeypatch):
    """At 80x24 a two-concept ranking must not push A and B off screen, nor the status past the edge."""

    class Fake:
        def query_scores(self, texts, table):
            rng = np.random.default_rng(0)
            return rng.uniform(-1, 1, size=(len(table), len(texts)))

    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: Fake())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        scr = main_screen(app)
        scr.start_query(["red car", "red", "car"], "red car", ["red", "car"])
        await settle(app, pilot)
        q = scr.session.model.query
        table = scr.query_one(NeuronTable)
        width = table.scrollable_content_region.width
        header = table._header(width).plain
        assert len(header) <= width and "red ca▼" in header
        row = table.current_row()
        line = table._row_text(row, width).plain
        assert len(line) <= width and f"{q.scores[row]:.3f}" in line
        # Columns the table has no room for are left out whole, header and rows alike ...
        n = table.query_columns(width)
        tail = line.split()[-(n + 1) :]
        assert tail[0] in ("✓", "·") and len(header.split("✓", 1)[1]) == 8 * n
        # ... and the preview line carries all three scores.
        preview = str(scr.query_one("#preview").render())
        for name, col in [("red car", q.scores), *q.extra.items()]:
            assert f"{name} {col[row]:.3f}" in preview
        scr.session.filters.pinned_only = True
        scr.set_cutoff(1e300)
        await pilot.pause()
        status = scr.query_one("#status")
        text = str(status.render())
        assert "τ=1e+300" in text and "pinned only" in text and "ranked by" in text
        assert status.size.height >= 2  # wrapped, not cut at the edge


async def test_compose_cancel_keeps_the_shown_result_and_scrolls_at_80x24(cache, monkeypatch):
    """Cancelling a wider composition leaves the previous result with a title that matches it."""
    import time

    import anyio

    from dissect_tui.explain import Cancelled
    from dissect_tui.tui.compose import ComposeScreen

    class Slow:
        def compose(self, layer, unit, breadth, progress, cancelled):
            if breadth == 10:
                return (
                    10,
                    [(f"p{i} q{i}", 1.0 - i / 10) for i in range(10)],
                    [(f"s{i}", 0.5) for i in range(10)],
                )
            end = time.monotonic() + 20  # breadth 100: runs until Esc (bounded, so a failure cannot hang)
            while not cancelled() and time.monotonic() < end:
                time.sleep(0.01)
            raise Cancelled

    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: Slow())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        comp = app.screen
        assert isinstance(comp, ComposeScreen) and comp.result[0] == 10
        assert comp.query_one("#c-box").max_scroll_y > 0  # both top-10 lists reachable at 80x24
        await pilot.press("3")
        await pilot.pause(0.1)
        assert "top 100" in str(comp.query_one("#c-title").render())
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.screen is comp
        title = str(comp.query_one("#c-title").render())
        assert "top 10 " in title and "90 pairs" in title
        assert "cancelled" in str(comp.query_one("#c-status").render())
        await pilot.press("escape")
        assert isinstance(app.screen, DetailScreen)
        # q quits from the (modal) composition screen too, even mid-computation.
        await pilot.press("c", "3")
        await pilot.pause(0.1)
        await pilot.press("q")
        with anyio.fail_after(10):
            await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.return_code == 0


def test_label_sort_ignores_case():
    from dissect_tui.store.browse import NeuronTable as Columns
    from dissect_tui.tui.model import Filters, NeuronModel

    labels = ["Mrs", "ball", "Zebra", "apple"]
    n = len(labels)
    table = Columns(["l"], np.zeros(n, np.int32), np.arange(n), labels, np.zeros(n), np.arange(n), [""] * n)
    model = NeuronModel(table)
    assert [labels[i] for i in model.view(Filters(), "label")] == ["apple", "ball", "Mrs", "Zebra"]


async def test_two_browsers_share_a_cache(cache):
    first = make_app(cache)
    async with first.run_test(size=SIZE) as pilot:
        await settle(first, pilot)
        second = make_app(cache)  # opens read-only while the first holds it
        async with second.run_test(size=SIZE) as pilot2:
            await settle(second, pilot2)
            assert len(shown(second)) == 46


def test_ui_modules_do_not_import_torch():
    code = (
        "import sys, dissect_tui.tui.app, dissect_tui.tui.main, dissect_tui.tui.detail, dissect_tui.tui.sql, "
        "dissect_tui.tui.help, dissect_tui.tui.compose, dissect_tui.tui.session, dissect_tui.tui.base, "
        "dissect_tui.tui.layers, dissect_tui.commands.browse, dissect_tui.store.browse, "
        "dissect_tui.store.sidecar; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_filter_model_matches_brute_force(built_cache):
    """The in-memory filter agrees with a direct computation on random filter combinations."""
    from dissect_tui.store.browse import load_neuron_table
    from dissect_tui.tui.model import Filters, NeuronModel

    rdr = open_cache(built_cache)
    try:
        table = load_neuron_table(rdr, rdr.latest_run_id())
    finally:
        rdr.close()
    model = NeuronModel(table)
    rng = np.random.default_rng(1)
    for _ in range(50):
        layers = frozenset(int(i) for i in rng.choice(4, size=rng.integers(0, 3), replace=False))
        f = Filters(layers=layers, cutoff=float(rng.uniform(0, 0.5)), interpretable_only=bool(rng.integers(2)),
                    text=str(rng.choice(["", "a", "DOG", "ét", "50%"])))  # fmt: skip
        got = model.view(f, "score")
        want = [
            i for i in range(len(table))
            if (not layers or table.layer_idx[i] in layers)
            and (not f.interpretable_only or table.similarity[i] > f.cutoff)
            and f.text.casefold() in (table.label[i] + "\t" + table.top_concepts[i]).casefold()
        ]  # fmt: skip
        want.sort(key=lambda i: -table.similarity[i])
        assert list(got) == want


# -- failures inside workers: one line, never a traceback -----------------------------------
async def test_a_failing_worker_is_one_error_line_and_the_app_goes_on(cache, monkeypatch):
    import dissect_tui.tui.detail as detail_mod

    def broken(*args, **kwargs):
        raise RuntimeError("disk [/x] on fire\nsecond line")

    monkeypatch.setattr(detail_mod, "neuron_detail", broken)
    app = make_app(cache)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, DetailScreen) and app.return_code is None
        errors = [n for n in app._notifications if n.severity == "error"]
        assert [n.message for n in errors] == ["error: RuntimeError: disk [/x] on fire"]
        assert not errors[0].markup
        await pilot.press("escape", "down")  # still usable
        assert isinstance(app.screen, MainScreen) and main_screen(app).query_one(NeuronTable).cursor == 1
        await pilot.press("q")
    assert app.return_code == 0


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (RuntimeError("read [/x] failed\nat byte 7"), "error: RuntimeError: read [/x] failed"),
        ("user", "error: cannot read [/x] neurons"),
    ],
)
async def test_a_failing_load_ends_the_app_with_one_line(cache, monkeypatch, capsys, exc, line):
    import dissect_tui.tui.main as main_mod
    from dissect_tui.errors import CacheError

    def broken(*args, **kwargs):
        raise CacheError("cannot read [/x] neurons") if exc == "user" else exc

    monkeypatch.setattr(main_mod, "load_neuron_table", broken)
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        # Not settle(): waiting on the failed worker re-raises its error if the app has not
        # removed it yet; what matters is that the app ends, so wait for its return code.
        for _ in range(200):
            if app.return_code is not None:
                break
            await pilot.pause(0.01)
    assert app.return_code == 2
    assert capsys.readouterr().err.splitlines() == [line]  # what Textual prints on exit


# -- export: what is exported is what is shown ------------------------------------------------
class FakeRanking:
    """Query scores without CLIP: a fixed random ranking."""

    def query_scores(self, texts, table):
        rng = np.random.default_rng(7)
        scores = rng.normal(size=(len(table), len(texts))) * 3
        scores[-1] = scores.min() - 1  # the last neuron of the layer order is the worst match
        return scores


async def _export_ranked_view(app, pilot, path: Path) -> tuple[list[tuple[str, int]], np.ndarray, MainScreen]:
    """τ = 0.3 with `+`, a two-concept ranking "red car"; exports the view; returns it and its scores."""
    await settle(app, pilot)
    scr = main_screen(app)
    for _ in range(14):
        await pilot.press("plus")
    assert scr.session.filters.cutoff == pytest.approx(0.30)
    scr.start_query(["red car", "red", "car"], "red car", ["red", "car"])
    await settle(app, pilot)
    view = shown(app)
    rows = scr.query_one(NeuronTable).rows
    await pilot.press("e")
    app.screen.query_one("#path").value = str(path)
    await pilot.press("enter")
    await settle(app, pilot)
    return view, rows, scr


async def test_export_passes_the_view_to_the_store(cache, tmp_path, monkeypatch):
    import dissect_tui.store.export as export_mod

    calls = []
    monkeypatch.setattr(export_mod, "export_neurons", lambda *a, **k: calls.append((a, k)) or len(k["keys"]))
    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: FakeRanking())
    async with app.run_test(size=SIZE) as pilot:
        view, rows, scr = await _export_ranked_view(app, pilot, tmp_path / "v.csv")
        q = scr.session.model.query
    [(args, kwargs)] = calls
    assert kwargs["keys"] == view and kwargs["keep_order"] is True
    assert kwargs["cutoff"] == pytest.approx(0.30)
    assert list(kwargs["extra"]) == ["query: red car", "query: red", "query: car"]
    np.testing.assert_allclose(kwargs["extra"]["query: red car"], q.scores[rows])
    np.testing.assert_allclose(kwargs["extra"]["query: car"], q.extra["car"][rows])


async def test_export_writes_the_shown_cutoff_order_and_query_scores(cache, tmp_path, monkeypatch):
    out = tmp_path / "ranked.csv"
    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: FakeRanking())
    async with app.run_test(size=SIZE) as pilot:
        view, rows, scr = await _export_ranked_view(app, pilot, out)
        q = scr.session.model.query
    with open(out, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [(r["layer"], int(r["unit"])) for r in written] == view  # the on-screen order
    sims = [float(r["similarity"]) for r in written]
    assert [r["interpretable"] == "True" for r in written] == [s > 0.30 for s in sims]
    assert any(0.16 < s <= 0.30 for s in sims)  # rows the run's own cutoff would call interpretable
    np.testing.assert_allclose([float(r["query: red car"]) for r in written], q.scores[rows], rtol=1e-6)


# -- where the cursor goes ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["concept", "two"])
async def test_a_ranking_opens_at_its_best_row(cache, monkeypatch, how):
    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: FakeRanking())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        table = main_screen(app).query_one(NeuronTable)
        await pilot.press("G")  # the cursor at the bottom, the table scrolled down
        assert table.cursor == 45 and table.scroll_offset.y > 0
        if how == "concept":
            await pilot.press("c", *"dog", "enter")
        else:
            await pilot.press("2", *"red", "tab", *"car", "enter")
        await settle(app, pilot)
        q = main_screen(app).session.model.query
        assert q is not None
        assert table.cursor == 0 and table.current_row() == int(np.argmax(q.scores))
        assert table.scroll_offset.y == 0


async def test_interpretable_only_keeps_the_cursor_near_its_neuron(cache):
    app = make_app(cache)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        scr = main_screen(app)
        table = scr.query_one(NeuronTable)
        scr.set_cutoff(0.33)  # about half the neurons fall below τ
        await pilot.pause()
        before = list(table.rows)
        good = scr.session.model.interpretable(scr.session.filters.cutoff)
        # A neuron below τ with several below-τ neurons above it: its old index points elsewhere.
        pos = next(
            i for i, r in enumerate(before) if not good[r] and sum(not good[x] for x in before[:i]) >= 2
        )
        for _ in range(pos):
            await pilot.press("down")
        assert table.cursor == pos
        await pilot.press("i")
        kept = [i for i, r in enumerate(before) if good[r]]
        nearest = min(kept, key=lambda i: (abs(i - pos), i < pos))  # the following one on a tie
        assert table.current_row() == before[nearest]
        # Back to all neurons: the cursor stays on that neuron.
        await pilot.press("i")
        assert table.current_row() == before[nearest]
