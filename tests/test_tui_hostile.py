"""A shared cache is hostile input: every string it holds reaches the terminal as plain, inert text.

The cache below has labels, concepts, layer names, run fields and image paths full of terminal
control sequences (OSC 52 writes the clipboard, OSC 0 renames the window, NUL) and Rich/Textual
markup (``[/x]`` crashes a markup parser, ``[@click=app.quit]`` becomes a clickable action). Every
screen is rendered exactly as it would go to the terminal and checked for both.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from cache_factory import make_cache
from pilot_helpers import settle
from rich.console import Console

from dissect_tui.store.reader import open_cache
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.main import MainScreen

pytestmark = pytest.mark.anyio

OSC52 = "\x1b]52;c;SGVsbG8=\x07"
TITLE = "\x1b]0;pwned\x07"
HOSTILE = ["[/x]", "[@click=app.quit]", OSC52, TITLE, "\x00", "[b]"]
EVIL = "[/x][@click=app.quit]" + OSC52 + TITLE + "\x00[b]"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def built_hostile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "hostile.duckdb"
    concepts = [f"dog{h}" for h in HOSTILE] + ["cat [/x] [@click=app.quit]boom[/]", "plain", "x" + EVIL]
    layers = {"conv[/x]": 4, "l[@click=app.quit]q": 4, TITLE: 4, "fc[b]\x00": 4}
    make_cache(path, layers=layers, concepts=concepts)
    con = duckdb.connect(str(path))
    try:
        con.execute(
            "UPDATE runs SET target = ?, similarity = ?, concept_set = ?, kind = ?",
            ["t" + EVIL, "s" + EVIL, "c" + EVIL, "index" + TITLE],
        )
        con.execute("UPDATE images SET path = path || ?", [EVIL])
    finally:
        con.close()
    return path


@pytest.fixture
def hostile(built_hostile, tmp_path) -> Path:
    return Path(shutil.copy(built_hostile, tmp_path / "hostile.duckdb"))


def terminal_output(app: BrowserApp) -> tuple[str, str, list[dict]]:
    """What the current screen writes to a terminal, its plain text, and every segment's style metadata."""
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(),
                      force_terminal=True, color_system="truecolor", legacy_windows=False)  # fmt: skip
    console.print(update)
    strips = app.screen._compositor.render_strips()
    metas = [seg.style.meta for strip in strips for seg in strip if seg.style is not None and seg.style.meta]
    plain = "\n".join(strip.text for strip in strips)
    return console.file.getvalue(), plain, metas


def assert_inert(app: BrowserApp, where: str) -> str:
    """Checks the current screen and returns its plain text."""
    out, plain, metas = terminal_output(app)
    assert "\x1b]" not in out, f"{where}: an OSC sequence reaches the terminal"
    assert "\x07" not in out and "\x00" not in out, f"{where}: BEL/NUL reach the terminal"
    actions = [m["@click"] for m in metas if "@click" in m]
    assert not any("quit" in str(a) for a in actions), f"{where}: live action from data {actions}"
    return plain


class FakeClip:
    """Query scores and a composition made of hostile texts (no torch needed)."""

    def query_scores(self, texts, table):
        rng = np.random.default_rng(len(texts))
        return rng.normal(size=(len(table), len(texts)))

    def compose(self, layer, unit, breadth, progress, cancelled):
        pairs = [
            (f"{a} {b}", 1.0 - i / 10) for i, (a, b) in enumerate(zip(HOSTILE[:-1], HOSTILE[1:], strict=True))
        ]
        singles = [(h, 0.5) for h in HOSTILE]
        return breadth, pairs, singles


def make_app(path: Path) -> BrowserApp:
    app = BrowserApp(open_cache(path), graphics="none", image_cls=None)
    return app


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_every_screen_shows_hostile_text_inert(hostile, tmp_path, monkeypatch, size):
    import dissect_tui.store.export as export_mod

    monkeypatch.setattr(export_mod, "export_neurons", lambda *a, **k: 3)
    app = make_app(hostile)
    monkeypatch.setattr(app.session, "explainer", lambda: FakeClip())
    async with app.run_test(size=size, notifications=True) as pilot:
        await settle(app, pilot)
        scr = app.screen
        assert isinstance(scr, MainScreen) and scr.session.model is not None and scr.session.model.n == 16
        out = assert_inert(app, "main")
        assert "␛" in out  # the stand-in is shown instead
        # Layer list with selections, a filter, interpretable only, pins.
        await pilot.press("l", "space", "down", "space", "tab", "m", "i", "i")
        await pilot.press("slash", *"[/x", "escape")
        assert_inert(app, "main with filters")
        await pilot.press("x")
        # A concept query and a two-concept search whose texts are markup.
        await pilot.press("c", *"[/x] dog", "enter")
        await settle(app, pilot)
        assert scr.session.model.query is not None and scr.session.model.query.title == "[/x] dog"
        assert_inert(app, "main ranked")
        await pilot.press("2", *"car[/]", "tab", *"[@click=app.quit]b", "enter")
        await settle(app, pilot)
        assert (
            scr.session.model.query is not None
            and scr.session.model.query.title == "car[/] [@click=app.quit]b"
        )
        assert_inert(app, "main two-concept ranking")
        await pilot.press("2")  # the dialog comes back with the last A and B
        await pilot.pause()
        assert_inert(app, "two-concept dialog")
        await pilot.press("escape")
        # Detail, compose, back.
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, DetailScreen)
        assert_inert(app, "detail")
        await pilot.press("c")
        await settle(app, pilot)
        out = assert_inert(app, "compose")
        assert "␛]52;c;SGVsbG8=␇" in out  # the pairs, shown as text
        await pilot.press("escape")
        await settle(app, pilot)
        assert isinstance(app.screen, DetailScreen)
        assert_inert(app, "detail with composition")
        await pilot.press("escape", "question_mark")
        await pilot.pause()
        assert_inert(app, "help")
        await pilot.press("escape", "t")
        await pilot.pause()
        assert_inert(app, "cutoff dialog")
        await pilot.press("escape", "e")
        await pilot.pause()
        box = app.screen.query_one("#path")
        box.value = str(tmp_path / ("missing" + EVIL) / "a.csv")
        await pilot.press("enter")
        await pilot.pause()
        assert_inert(app, "export dialog error")
        box.value = str(tmp_path / "out[b]x.csv") + "\x1b]0;pwned\x07"
        await pilot.press("enter")
        await pilot.pause()
        assert_inert(app, "export dialog control characters")
        assert "control character" in str(app.screen.query_one("#error").render())
        box.value = str(tmp_path / "out[b][@click=app.quit]x[i].csv")
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, MainScreen)
        for _ in range(50):  # the toast is mounted a few refreshes after the worker's notify
            if app.screen.query("Toast"):
                break
            await pilot.pause()
        out = assert_inert(app, "export notice")
        assert "wrote 3 neurons" in out
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0
