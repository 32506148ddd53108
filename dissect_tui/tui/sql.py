"""SQL screen: a multi-line editor, a query in a worker, its result as a table of plain text.

Keys: F5 or Ctrl+J runs (Ctrl+Enter too where the terminal reports it; a plain terminal sends
Enter for it, which starts a new line); Ctrl+A selects all; Esc cancels a running query, else
goes from the result back to the editor, and from the editor back to the main screen.

The connection is locked down before the first query (store.lockdown): the SQL reads the cache
and nothing else. Cells, column names and error messages come from the cache and are shown as
plain text with control characters made visible, never parsed as markup.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, Static, TextArea

from dissect_tui.errors import UserError
from dissect_tui.sql_format import cell, is_number
from dissect_tui.store.browse import interrupt, run_user_query
from dissect_tui.store.reader import CacheReader
from dissect_tui.text import printable
from dissect_tui.tui.base import HELP, QUIT, BrowseScreen
from dissect_tui.tui.session import BrowseSession

MAX_ROWS = 1000
CELL_CHARS = 80  # longer cells are cut with …
EXAMPLE = (
    "SELECT n.layer, count(*) AS n, avg(n.similarity) AS mean_score\n"
    "FROM latest_neurons n JOIN layers l USING (layer)\n"
    "GROUP BY n.layer, l.position\n"
    "ORDER BY l.position"
)
# The query text of each app, kept while the screen is closed.
_DRAFTS: weakref.WeakKeyDictionary[App, str] = weakref.WeakKeyDictionary()


@functools.cache
def _sql_tokens() -> Callable[[str], Any] | None:
    """Pygments' SQL lexer (Pygments comes with rich), or None: highlighting is optional."""
    try:
        from pygments.lexers.sql import SqlLexer
    except ImportError:
        return None
    return SqlLexer(stripnl=False, ensurenl=False).get_tokens


def _highlight_name(token: Any) -> str | None:
    from pygments import token as t

    for kind, name in (
        (t.Comment, "comment"),
        (t.Keyword, "keyword"),
        (t.Literal.String, "string"),
        (t.Literal.Number, "number"),
        (t.Name.Builtin, "type"),
        (t.Operator, "operator"),
    ):
        if token in kind:
            return name
    return None


class SqlEditor(TextArea):
    """The query editor: SQL colours from Pygments (no tree-sitter needed), Ctrl+A selects all."""

    BINDINGS = [Binding("ctrl+a", "select_all", "Select all", key_display="^A")]

    def _build_highlight_map(self) -> None:
        # TextArea highlights by tree-sitter, which is not installed; fill its map from Pygments
        # instead: {line: [(start byte, end byte, highlight name)]}. These are TextArea internals:
        # should they change, the editor goes on without colours.
        try:
            self._pygments_highlights()
        except (AttributeError, TypeError):
            super()._build_highlight_map()

    def _pygments_highlights(self) -> None:
        self._line_cache.clear()
        highlights = self._highlights
        highlights.clear()
        tokens = _sql_tokens()
        if tokens is None:
            return
        row, col = 0, 0  # position in bytes of the line's UTF-8 text
        for token, value in tokens(self.text):
            name = _highlight_name(token)
            for i, part in enumerate(value.split("\n")):
                if i:
                    row, col = row + 1, 0
                width = len(part.encode("utf-8"))
                if name and width:
                    highlights[row].append((col, col + width, name))
                col += width


class SqlScreen(BrowseScreen):
    """The browser's SQL screen. Its worker posts messages; it never calls back into the screen."""

    class Result(Message):
        def __init__(self, token: int, cols: list[str], rows: list[tuple]) -> None:
            super().__init__()
            self.token, self.cols, self.rows = token, cols, rows

    class Failed(Message):
        def __init__(self, token: int, message: str) -> None:
            super().__init__()
            self.token, self.message = token, message

    class Counted(Message):
        def __init__(self, token: int, total: int | None) -> None:
            super().__init__()
            self.token, self.total = token, total

    BINDINGS = [
        QUIT,
        HELP,
        Binding("f5,ctrl+j,ctrl+enter", "run", "Run", key_display="F5/^J", priority=True),
        Binding("escape", "back", "Back/cancel", key_display="Esc"),
        Binding("ctrl+l", "focus_query", "Edit query"),
    ]
    DEFAULT_CSS = """
    SqlScreen #sql-input { height: 35%; min-height: 5; max-height: 12; border: round $primary-darken-2; }
    SqlScreen #sql-input:focus { border: round $accent; }
    """

    def __init__(self, session: BrowseSession) -> None:
        super().__init__()
        self.session = session
        self._query_cursor: CacheReader | None = None  # the cursor of the query in flight
        self._token = 0  # numbers the queries: a late result of a replaced one is dropped
        self._started = 0.0  # clock at submit
        self._ticker: Any = None
        self.clock: Callable[[], float] = time.perf_counter  # tests may replace it

    def compose(self) -> ComposeResult:
        yield Static(
            "[b]SQL[/b] over the cache (read-only; tables: runs layers neurons neuron_concepts "
            "top_images images concepts activations …)",
            id="sql-title",
        )
        yield SqlEditor(_DRAFTS.get(self.app, EXAMPLE), id="sql-input", soft_wrap=True, tab_behavior="focus")
        yield Static("F5 or Ctrl+J runs the query", id="sql-status")
        yield DataTable(id="sql-result", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        from dissect_tui.store.lockdown import lock_down

        # `dissect-tui browse` locks the connection at start; an app built otherwise is locked here,
        # before any user SQL can run (run_user_query refuses an unlocked connection).
        try:
            lock_down(self.session.reader.con)
        except UserError as exc:
            self._status(Text(printable(exc), style="red"))
        editor = self.query_one("#sql-input", SqlEditor)
        editor.focus()
        editor.move_cursor(editor.document.end)

    @on(TextArea.Changed, "#sql-input")
    def _keep_draft(self, event: TextArea.Changed) -> None:
        _DRAFTS[self.app] = event.text_area.text

    def on_unmount(self) -> None:
        # Leaving or quitting must not wait for a long query: the app exits only after its
        # worker threads return.
        self._cancel()
        self._stop_ticker()

    # -- actions ---------------------------------------------------------------------------
    def _cancel(self) -> bool:
        running = self._query_cursor
        if running is None:
            return False
        interrupt(running)
        return True

    def action_back(self) -> None:
        if self._cancel():
            self._status("cancelling…")
        elif self.focused is self.query_one("#sql-result"):
            self.query_one("#sql-input", SqlEditor).focus()
        else:
            self.app.pop_screen()

    def action_focus_query(self) -> None:
        self.query_one("#sql-input", SqlEditor).focus()

    def action_run(self) -> None:
        sql = self.query_one("#sql-input", SqlEditor).text
        if not sql.strip():
            self._status("type a query, e.g. SELECT * FROM runs")
            return
        self._cancel()  # a new query replaces one still running
        self._token += 1
        self._reset()
        self._started = self.clock()
        cursor = self.session.cursor()
        self._query_cursor = cursor  # set before the worker starts, so Esc can always cancel it
        self._stop_ticker()
        self._ticker = self.set_interval(0.1, self._tick)
        self._update_status()
        self.run_sql(sql, cursor, self._token)

    # -- the query ---------------------------------------------------------------------------
    @work(thread=True, group="sql", exit_on_error=False)
    def run_sql(self, sql: str, cur: CacheReader, token: int) -> None:
        from dissect_tui.store.user_sql import count_result

        try:
            try:
                cols, rows = run_user_query(cur, sql, limit=MAX_ROWS + 1)
            except UserError as exc:
                self.post_message(self.Failed(token, str(exc)))
                return
            self.post_message(self.Result(token, cols, rows))
            if len(rows) <= MAX_ROWS:
                return
            try:
                total: int | None = count_result(cur, sql, len(rows))
            except (UserError, KeyboardInterrupt):
                total = None  # cancelled or failed: the rows shown stand
            self.post_message(self.Counted(token, total))
        finally:
            if self._query_cursor is cur:
                self._query_cursor = None
            cur.close()

    # State of the latest query, rendered by _update_status.
    _n = 0  # rows shown
    _more = False  # the result has more rows than shown
    _total: int | None = None  # counted rows, when _more
    _counted = False  # counting is over (``_total`` None then: stopped)
    _elapsed: float | None = None  # submit → result on screen; None while running
    _error: str | None = None
    _empty = False  # the statement returned no result

    def _reset(self) -> None:
        self._n, self._more, self._total, self._counted = 0, False, None, False
        self._elapsed, self._error, self._empty = None, None, False

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def _tick(self) -> None:
        self._update_status()

    def _status(self, message: str | Text) -> None:
        self.query_one("#sql-status", Static).update(message if isinstance(message, Text) else Text(message))

    def _update_status(self) -> None:
        if self._error is not None:
            self._stop_ticker()
            self._status(Text(printable(self._error), style="red"))
            return
        if self._elapsed is None:
            self._status(f"running… {self.clock() - self._started:.1f} s (Esc cancels)")
            return
        took = _seconds(self._elapsed)
        if self._empty:
            text = f"ok (no result) · {took}"
        elif not self._more:
            text = f"{self._n:,} row{'s' if self._n != 1 else ''} · {took}"
        elif not self._counted:
            counting = self.clock() - self._started - self._elapsed
            text = f"{self._n:,} of … rows · {took} · counting {counting:.1f} s (Esc stops)"
        elif self._total is None:
            text = f"{self._n:,} of more than {self._n:,} rows · {took} (count stopped)"
        else:
            text = f"{self._n:,} of {self._total:,} rows · {took}"
        if not self._more or self._counted:
            self._stop_ticker()
        self._status(text)

    def on_sql_screen_failed(self, event: Failed) -> None:
        token, message = event.token, event.message
        if token != self._token:
            return
        self._error = message
        # A stale table under an error would read as this query's result.
        self.query_one("#sql-result", DataTable).clear(columns=True)
        self._update_status()

    def on_sql_screen_result(self, event: Result) -> None:
        token, cols, rows = event.token, event.cols, event.rows
        if token != self._token:
            return
        table = self.query_one("#sql-result", DataTable)
        table.clear(columns=True)
        self._more = len(rows) > MAX_ROWS
        rows = rows[:MAX_ROWS]
        self._n, self._empty = len(rows), not cols
        if cols:
            # Text, never str: DataTable parses str labels and cells as markup.
            numeric = [
                any(r[i] is not None for r in rows) and all(r[i] is None or is_number(r[i]) for r in rows)
                for i in range(len(cols))
            ]
            for name, right in zip(cols, numeric, strict=True):
                table.add_column(Text(printable(name), justify="right" if right else "left"))
            table.add_rows(
                [[_cell_text(v, right) for v, right in zip(r, numeric, strict=True)] for r in rows]
            )
        self.call_after_refresh(self._shown, token)

    def _shown(self, token: int) -> None:
        """The result is on screen: the time the user waited ends here."""
        if token == self._token:
            self._elapsed = self.clock() - self._started
            self._update_status()

    def on_sql_screen_counted(self, event: Counted) -> None:
        token, total = event.token, event.total
        if token == self._token:
            self._total, self._counted = total, True
            if self._elapsed is not None:
                self._update_status()


def _cell_text(value: object, right: bool) -> Text:
    text = cell(value)
    if len(text) > CELL_CHARS:
        text = text[: CELL_CHARS - 1] + "…"
    return Text(text, style="dim" if value is None else "", justify="right" if right else "left")


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"
