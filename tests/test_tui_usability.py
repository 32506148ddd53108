"""The browser at 80×24 and 120×40: palette, activity line, samples, sort arrows, 16 colours,
detail-screen keys, dialogs, help, resizing. Pilot tests on the small generated cache."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from cache_factory import make_cache
from pilot_helpers import settle
from rich.color import ColorSystem

from dissect_tui.store.reader import open_cache
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.dialogs import ExportDialog, TwoConceptDialog
from dissect_tui.tui.images import prepare_graphics
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.neuron_table import NeuronTable

pytestmark = pytest.mark.anyio
SMALL, LARGE = (80, 24), (120, 40)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("usability") / "tiny.duckdb")


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    return Path(shutil.copy(built_cache, tmp_path / "tiny.duckdb"))


def make_app(path: Path, graphics: str = "none", **kwargs) -> BrowserApp:
    image_cls = prepare_graphics(graphics) if graphics != "none" else None
    kwargs.setdefault("color_system", "truecolor")
    return BrowserApp(open_cache(path), graphics=graphics, image_cls=image_cls, **kwargs)


def lines(app) -> list[str]:
    return [strip.text for strip in app.screen._compositor.render_strips()]


class Ranking:
    """Query scores without CLIP; ``gate`` (if given) holds the query until the test releases it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate

    def query_scores(self, texts, table):
        if self.gate is not None:
            assert self.gate.wait(30)
        return np.random.default_rng(3).normal(size=(len(table), len(texts)))


# -- command palette ---------------------------------------------------------------------------
async def test_command_palette_lists_every_action_and_runs_one(cache):
    from textual.command import CommandPalette

    app = make_app(cache)
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        main = app.screen
        titles = {c.title for c in app.get_system_commands(main)}
        for b in [*MainScreen.BINDINGS, *BrowserApp.BINDINGS]:
            if b.action not in ("command_palette", "back"):  # Esc: nothing to go back from yet
                assert (b.tooltip or b.description) in titles, b
        assert "Open" in titles  # the table's Enter
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"export the view", "enter")
        await settle(app, pilot)
        assert isinstance(app.screen, ExportDialog)


# -- a CLIP ranking: one persistent line, no toast, a one-line status ----------------------------
async def test_a_running_query_shows_a_persistent_line_until_its_ranking_arrives(cache, monkeypatch):
    gate = threading.Event()
    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: Ranking(gate))
    async with app.run_test(size=LARGE, notifications=True) as pilot:
        await settle(app, pilot)
        scr = app.screen
        await pilot.press("c", *"wet fur")
        await pilot.pause()
        assert "concept query: type, Enter" in str(scr.query_one("#status").render())
        await pilot.press("enter")
        for _ in range(5):  # the worker is blocked on the gate: the line stays, however long CLIP takes
            await pilot.pause()
            status = str(scr.query_one("#status").render())
            assert "ranking by “wet fur”" in status and "loading CLIP" in status
        assert not app.screen.query("Toast")  # no toast over the table
        gate.set()
        await settle(app, pilot)
        status = scr.query_one("#status")
        text = str(status.render())
        assert scr.session.model.query is not None and "ranked by “wet fur”" in text
        assert "ranking by" not in text and "type, Enter" not in text
        assert status.size.height == 1  # one line at 120 columns
        assert not app.screen.query("Toast")


async def test_a_failing_query_clears_the_busy_line(cache, monkeypatch):
    release = threading.Event()

    class Broken:
        def query_scores(self, texts, table):
            release.wait(5)  # still running when settle() starts: its failure must not escape the wait
            raise RuntimeError("tower fell over")

    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: Broken())
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        await pilot.press("c", *"dog", "enter")
        assert "ranking by" in str(app.screen.query_one("#status").render())
        asyncio.get_running_loop().call_later(0.1, release.set)
        await settle(app, pilot)
        assert "ranking by" not in str(app.screen.query_one("#status").render())
        assert app.return_code is None
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert errors == ["error: RuntimeError: tower fell over"]


# -- sort arrows: ▲ ascending, ▼ descending, for every column --------------------------------------
async def test_sort_arrow_means_the_same_for_every_column(cache):
    app = make_app(cache)
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        scr = app.screen
        table = scr.query_one(NeuronTable)
        width = table.scrollable_content_region.width

        def header() -> str:
            return table._header(width).plain

        def status() -> str:
            return str(scr.query_one("#status").render())

        assert "layer▲" in header() and "sort layer▲" in status()  # conv1 … fc: ascending
        while scr.session.sort != "score":
            await pilot.press("s")
        sims = [float(scr.session.model.table.similarity[r]) for r in table.rows]
        assert sims == sorted(sims, reverse=True)
        assert "score▼" in header() and "sort score▼" in status()  # largest first: descending
        await pilot.press("r")
        sims = [float(scr.session.model.table.similarity[r]) for r in table.rows]
        assert sims == sorted(sims) and "score▲" in header() and "sort score▲" in status()
        while scr.session.sort != "label":
            await pilot.press("s")
        assert "label▲" in header()
        await pilot.press("r")
        assert "label▼" in header()


# -- 16 colours ------------------------------------------------------------------------------------
def _downgraded(style) -> tuple:
    """(foreground, background) as a 16-colour terminal shows them."""

    def one(color):
        if color is None or color.is_default:
            return None
        return color.downgrade(ColorSystem.STANDARD).number

    return one(style.color), one(style.bgcolor)


async def test_states_are_readable_in_16_colours(cache):
    app = make_app(cache, color_system="standard")  # TERM=screen
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        assert app.current_theme.ansi  # the terminal's own palette
        scr = app.screen
        await pilot.press("l", "space")  # select conv1
        await pilot.press("tab")  # back to the table
        await pilot.pause()
        layers = scr.query_one("#layers")
        rows = [
            app.screen._compositor.render_strips()[layers.region.y + i].text[: layers.region.width]
            for i in range(layers.option_count)
        ]
        assert rows[0].lstrip().startswith("●") and all(r.lstrip().startswith("○") for r in rows[1:])
        assert not any("X" in r for r in rows)  # no checkbox that reads "selected" on every row
        table = scr.query_one(NeuronTable)
        strips = app.screen._compositor.render_strips()
        y0 = table.region.y + 1  # the header is the table's first line

        def style_of(y: int):
            """The style under the label column of the table's line y."""
            x, target = 0, table.region.x + 14
            for seg in strips[y]:
                if x <= target < x + len(seg.text):
                    return seg.style
                x += len(seg.text)
            raise AssertionError(f"nothing drawn at column {target}")

        cursor, other = _downgraded(style_of(y0)), _downgraded(style_of(y0 + 2))
        assert cursor != other  # the cursor row stands out
        assert cursor[0] != cursor[1]  # and its text is visible on its background


# -- the detail screen ---------------------------------------------------------------------------
async def test_samples_are_rows_of_distinct_images_at_their_natural_size(cache):
    app = make_app(cache, graphics="halfcell")
    async with app.run_test(size=LARGE) as pilot:
        await settle(app, pilot)
        await pilot.press("down", "enter")
        await settle(app, pilot)
        det = app.screen
        assert isinstance(det, DetailScreen)
        # 80 probe images: the top 0.1% and 1% bands are the same single image.
        ids = [i for _, items in det.detail.samples for i, _, _ in items]
        assert len(set(ids)) < len(ids)
        shown = [t for t in det.query("#samples Thumb")]
        captions = [str(t.query_one(".thumb-caption").render()) for t in shown]
        assert len(shown) == len(set(ids)) and len(set(captions)) == len(captions)  # each image once
        bands = [str(s.render()) for s in det.query("#samples .band")]
        assert bands[1].startswith("top 1%") and "above" in bands[1]
        for row in det.query("#samples .band-row"):
            thumbs = list(row.query("Thumb"))
            assert len({t.region.y for t in thumbs}) == 1  # one row per band
        pictures = list(det.query("#samples .thumb-image"))
        assert pictures and all(p.region.width <= 20 for p in pictures)  # not stretched to 120 columns


async def test_detail_lists_show_their_highlight_and_page_keys_scroll_the_page(cache):
    app = make_app(cache)
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        det = app.screen
        similar = det.query_one("#similar")
        similar.focus()
        await pilot.pause()
        assert similar.highlighted == 0  # Enter would open this one: it shows before any arrow key
        body = det.query_one("#d-body")
        await pilot.press("home")
        await pilot.pause()
        assert body.scroll_y == 0 and similar.highlighted == 0
        y = body.scroll_y
        await pilot.press("pagedown")
        await pilot.pause()
        assert body.scroll_y > y and similar.highlighted == 0  # the page moved, not the list
        await pilot.press("end")
        await pilot.pause()
        assert body.scroll_y == body.max_scroll_y and similar.highlighted == 0


# -- dialogs -----------------------------------------------------------------------------------
async def test_two_concept_dialog_remembers_a_and_b_and_swaps_them(cache, monkeypatch):
    app = make_app(cache)
    monkeypatch.setattr(app.session, "explainer", lambda: Ranking())
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        await pilot.press("2", *"red", "tab", *"car", "enter")
        await settle(app, pilot)
        assert app.screen.session.model.query.title == "red car"
        await pilot.press("2")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, TwoConceptDialog)
        assert dialog.query_one("#a").value == "red" and dialog.query_one("#b").value == "car"
        await pilot.press("ctrl+t")
        assert dialog.query_one("#a").value == "car" and dialog.query_one("#b").value == "red"
        dialog.query_one("#b").focus()
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.screen.session.model.query.title == "car red"


async def test_export_shows_the_absolute_path(cache, tmp_path, monkeypatch):
    import dissect_tui.store.export as export_mod

    calls = []
    monkeypatch.setattr(export_mod, "export_neurons", lambda cur, run, path, **k: calls.append(path) or 46)
    monkeypatch.chdir(tmp_path)
    app = make_app(cache)
    async with app.run_test(size=SMALL, notifications=True) as pilot:
        await settle(app, pilot)
        await pilot.press("e")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#path").value = "view.csv"
        await pilot.pause()
        where = str(dialog.query_one("#where").render())
        assert where == f"→ {tmp_path / 'view.csv'}"
        await pilot.press("enter")
        await settle(app, pilot)
        assert calls == [str(tmp_path / "view.csv")]
        assert [n.message for n in app._notifications] == [f"wrote 46 neurons to {tmp_path / 'view.csv'}"]


# -- resizing --------------------------------------------------------------------------------------
async def test_shrinking_the_window_keeps_the_cursor_row_on_screen(cache):
    app = make_app(cache)
    async with app.run_test(size=(80, 50)) as pilot:
        await settle(app, pilot)
        table = app.screen.query_one(NeuronTable)
        for _ in range(40):
            await pilot.press("down")
        assert table.cursor == 40 and table.scroll_offset.y < 40 - 20  # visible in the tall window
        await pilot.resize_terminal(80, 24)
        await settle(app, pilot)
        top = table.scroll_offset.y
        visible_rows = table.scrollable_content_region.height - 1  # the header takes a line
        assert top <= table.cursor < top + visible_rows
