"""The browser's SQL screen (Pilot, 80×24 and 120×40): editor, keys, counts, time, Esc, hostile cells."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cache_factory import make_cache
from pilot_helpers import settle
from rich.text import Text

from dissect_tui.store.lockdown import is_locked_down
from dissect_tui.store.reader import open_cache
from dissect_tui.tui import sql as sql_screen
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.sql import SqlEditor, SqlScreen

pytestmark = pytest.mark.anyio
OSC52 = "\x1b]52;c;cHduZWQ=\x07"
TITLE = "\x1b]0;renamed\x07"
CONTROL = ("\x1b", "\x07")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    concepts = [f"dog{OSC52}", f"cat{TITLE}", "[/x] closing", "[@click=app.quit]quit", "water", "sky", "tree"]
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.duckdb", concepts=concepts)


@pytest.fixture
def cache(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return Path(shutil.copy(built, tmp_path / "tiny.duckdb"))


async def open_sql(app: BrowserApp, pilot) -> SqlScreen:
    await settle(app, pilot)
    await pilot.press("colon")
    screen = app.screen
    assert isinstance(screen, SqlScreen)
    return screen


async def run(app: BrowserApp, pilot, sql: str, key: str = "f5") -> SqlScreen:
    screen = app.screen
    editor = screen.query_one("#sql-input", SqlEditor)
    editor.focus()
    editor.text = sql
    await pilot.press(key)
    await settle(app, pilot)
    return screen


def status(screen: SqlScreen) -> str:
    return str(screen.query_one("#sql-status").render())


def cells(screen: SqlScreen, row: int = 0) -> list:
    return list(screen.query_one("#sql-result").get_row_at(row))


def labels(screen: SqlScreen) -> list:
    return [c.label for c in screen.query_one("#sql-result").ordered_columns]


async def test_multi_line_editor_runs_with_f5_or_ctrl_j(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        editor = screen.query_one("#sql-input", SqlEditor)
        assert app.focused is editor
        editor.text = ""
        for key in ["S", "E", "L", "E", "C", "T", "enter", "4", "2", "enter", "A", "S", "space", "x"]:
            await pilot.press(key)
        await settle(app, pilot)
        assert editor.text == "SELECT\n42\nAS x"  # Enter starts a new line, it does not run
        assert screen.query_one("#sql-result").row_count == 0
        await pilot.press("f5")
        await settle(app, pilot)
        assert [str(c) for c in cells(screen)] == ["42"]
        await run(app, pilot, "SELECT 'ctrl j' AS how", key="ctrl+j")
        assert [str(c) for c in cells(screen)] == ["ctrl j"]


async def test_footer_shows_run_and_select_all(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_sql(app, pilot)
        shown = {b.binding.action: b.binding for b in app.screen.active_bindings.values() if b.binding.show}
        assert shown["run"].key_display == "F5/^J" and shown["select_all"].description == "Select all"
        assert "back" in shown


async def test_ctrl_a_selects_all_so_typing_replaces_the_query(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        editor = screen.query_one("#sql-input", SqlEditor)
        assert "\n" in editor.text  # the example spans lines
        await pilot.press("ctrl+a", "1")
        assert editor.text == "1"


async def test_sql_keywords_are_coloured(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        editor = screen.query_one("#sql-input", SqlEditor)
        editor.text = "SELECT 'é' AS x -- note\nFROM runs"
        await pilot.pause()
        marks = {(row, name) for row, spans in editor._highlights.items() for *_, name in spans}
        assert {(0, "keyword"), (0, "string"), (0, "comment"), (1, "keyword")} <= marks
        # Byte offsets: the comment starts after the two-byte é.
        comment = next(s for s in editor._highlights[0] if s[2] == "comment")
        assert comment[0] == len("SELECT 'é' AS x ".encode())


async def test_counts_every_row_and_times_from_submit_to_screen(cache, monkeypatch):
    """'1,000 of 2,500 rows'; the time shown is what the user waited: worker start, query, rendering."""
    app = BrowserApp(open_cache(cache))
    now = [100.0]
    real_query = sql_screen.run_user_query
    real_add_rows = sql_screen.DataTable.add_rows

    def slow_query(*args, **kwargs):
        now[0] += 5.0  # the query takes 5 s
        return real_query(*args, **kwargs)

    def slow_render(self, rows):
        now[0] += 2.0  # and putting its rows in the table 2 s
        return real_add_rows(self, rows)

    monkeypatch.setattr(sql_screen, "run_user_query", slow_query)
    monkeypatch.setattr(sql_screen.DataTable, "add_rows", slow_render)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        screen.clock = lambda: now[0]
        await run(app, pilot, "SELECT range AS i FROM range(2500)")
        assert screen.query_one("#sql-result").row_count == 1000
        assert status(screen) == "1,000 of 2,500 rows · 7.00 s"
        await run(app, pilot, "SELECT 1 AS one")
        assert status(screen) == "1 row · 7.00 s"
        await run(app, pilot, "SELECT range AS i FROM range(1000)")
        assert status(screen) == "1,000 rows · 7.00 s"


async def test_count_of_a_non_select_statement(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        await run(
            app, pilot, "CREATE TEMP TABLE t AS SELECT range AS i FROM range(1500); PRAGMA table_info('t')"
        )
        assert [str(c) for c in cells(screen)][:2] == ["0", "i"]
        await run(app, pilot, "CALL duckdb_functions()")  # not a SELECT: counted by reading the rest
        con = open_cache(cache)
        try:
            n = con.con.execute("SELECT count(*) FROM duckdb_functions()").fetchall()[0][0]
        finally:
            con.close()
        assert n > 1000 and status(screen).startswith(f"1,000 of {n:,} rows")


async def test_escape_leaves_on_the_first_press(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        await run(app, pilot, "SELECT range AS i FROM range(5)")
        await pilot.press("tab")
        assert app.focused is screen.query_one("#sql-result")
        await pilot.press("escape")  # from the result back to the editor
        assert app.focused is screen.query_one("#sql-input")
        await pilot.press("escape")  # from the editor back to the main screen
        assert isinstance(app.screen, MainScreen)
        await pilot.press("colon")  # the query is still there
        assert app.screen.query_one("#sql-input", SqlEditor).text == "SELECT range AS i FROM range(5)"


async def test_escape_cancels_a_long_query_then_leaves(cache):
    import anyio

    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        screen.query_one(
            "#sql-input", SqlEditor
        ).text = "SELECT count(*) FROM range(1000000000000) t WHERE hash(t.range) % 7 = 1"
        await pilot.press("f5")
        assert screen._query_cursor is not None  # set before the worker starts: Esc always cancels
        assert status(screen).startswith("running…")
        await pilot.press("escape")
        with anyio.fail_after(60):
            await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen is screen and "cancelled" in status(screen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_the_screen_locks_the_connection_and_refusals_read_plainly(cache, tmp_path):
    app = BrowserApp(open_cache(cache))  # built without `dissect-tui browse`, so not locked yet
    async with app.run_test(size=(80, 24)) as pilot:
        assert not is_locked_down(app.session.reader.con)
        screen = await open_sql(app, pilot)
        assert is_locked_down(app.session.reader.con)
        await run(app, pilot, f"COPY neurons TO '{tmp_path / 'leak.csv'}'")
        assert "only the cache can be read here" in status(screen)
        await run(app, pilot, "INSTALL httpfs")
        assert "only the cache can be read here" in status(screen)
        assert not (tmp_path / "leak.csv").exists() and not (tmp_path / ".duckdb").exists()


async def test_stored_text_is_shown_as_plain_text(cache):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_sql(app, pilot)
        await run(
            app,
            pilot,
            f"SELECT text, 1 AS \"{TITLE}[b]n[/b]\" FROM concepts WHERE text NOT IN ('water', 'sky', 'tree') "
            "ORDER BY concept_id",
        )
        table = screen.query_one("#sql-result")
        assert table.row_count == 4
        got = [cells(screen, i)[0] for i in range(4)]
        assert all(isinstance(c, Text) for c in got)
        assert [c.plain for c in got] == [
            "dog␛]52;c;cHduZWQ=␇",
            "cat␛]0;renamed␇",
            "[/x] closing",
            "[@click=app.quit]quit",
        ]
        assert [lab.plain for lab in labels(screen)] == ["text", "␛]0;renamed␇[b]n[/b]"]
        await pilot.pause()
        assert app.is_running and app.screen is screen  # no markup crash, no action
        await run(app, pilot, "SELECT CAST(text AS INTEGER) FROM concepts WHERE text LIKE 'cat%'")
        text = status(screen)
        assert "SQL error" in text and "␛]0;renamed␇" in text
        assert not any(c in text for c in CONTROL)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_layout_leaves_room_for_editor_and_result(cache, size):
    app = BrowserApp(open_cache(cache))
    async with app.run_test(size=size) as pilot:
        screen = await open_sql(app, pilot)
        await run(app, pilot, "SELECT range AS i, 'row ' || range AS label FROM range(100)")
        editor = screen.query_one("#sql-input").region
        result = screen.query_one("#sql-result").region
        status_box = screen.query_one("#sql-status").region
        assert 5 <= editor.height <= 12
        assert result.height >= size[1] // 2 - 2  # most of the screen shows rows
        assert editor.bottom <= status_box.y < result.y  # editor, then status, then result
        assert result.bottom <= size[1] - 1  # the footer keeps its line
        assert editor.width == result.width == size[0]
