"""SQL screen: run a read-only query over the cache in a worker and show the result."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from dissect_tui.errors import UserError
from dissect_tui.store.browse import interrupt, run_user_query
from dissect_tui.store.reader import CacheReader

MAX_ROWS = 1000
EXAMPLE = (
    "SELECT n.layer, count(*) AS n, avg(n.similarity) AS mean_score FROM latest_neurons n "
    "JOIN layers l USING (layer) GROUP BY n.layer, l.position ORDER BY l.position"
)


class SqlScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+l", "focus_query", "Edit query"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(
            "[b]SQL[/b] over the cache (read-only; tables: runs layers neurons neuron_concepts "
            "top_images images concepts activations …)",
            id="sql-title",
        )
        yield Input(value=EXAMPLE, id="sql-input")
        yield Static("Enter runs the query", id="sql-status")
        yield DataTable(id="sql-result", zebra_stripes=True)
        yield Footer()

    def __init__(self) -> None:
        super().__init__()
        self._query_cursor: CacheReader | None = None  # the cursor of the query in flight

    def on_mount(self) -> None:
        self.query_one("#sql-input", Input).focus()

    def on_unmount(self) -> None:
        # Leaving or quitting must not wait for a long query: the app exits only after its
        # worker threads return.
        self._cancel()

    def _cancel(self) -> bool:
        running = self._query_cursor
        if running is None:
            return False
        interrupt(running)
        return True

    def action_back(self) -> None:
        if self._cancel():
            self.query_one("#sql-status", Static).update("cancelling…")
        elif self.focused is self.query_one("#sql-result"):
            self.query_one("#sql-input", Input).focus()
        else:
            self.app.pop_screen()

    def action_focus_query(self) -> None:
        self.query_one("#sql-input", Input).focus()

    @on(Input.Submitted, "#sql-input")
    def _submit(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            self.query_one("#sql-status", Static).update("type a query, e.g. SELECT * FROM runs")
            return
        self._cancel()  # a new query replaces one still running
        self.query_one("#sql-status", Static).update("running… (Esc cancels)")
        self.run_sql(event.value)

    @work(thread=True, exclusive=True, group="sql")
    def run_sql(self, sql: str) -> None:
        cur = self.app.cursor()
        self._query_cursor = cur
        t0 = time.perf_counter()
        try:
            cols, rows = run_user_query(cur, sql, limit=MAX_ROWS + 1)
        except UserError as exc:
            self.app.call_from_thread(self._show_error, str(exc))
            return
        finally:
            if self._query_cursor is cur:
                self._query_cursor = None
            cur.close()
        self.app.call_from_thread(self._show, cols, rows, time.perf_counter() - t0)

    def _show_error(self, message: str) -> None:
        # A stale table under an error would read as this query's result.
        self.query_one("#sql-result", DataTable).clear(columns=True)
        self.query_one("#sql-status", Static).update(Text(message, style="red"))  # no markup: [ ] in SQL

    def _show(self, cols: list[str], rows: list[tuple], seconds: float) -> None:
        table = self.query_one("#sql-result", DataTable)
        table.clear(columns=True)
        more = len(rows) > MAX_ROWS
        rows = rows[:MAX_ROWS]
        if cols:
            table.add_columns(*cols)
            table.add_rows([tuple(_cell(v) for v in r) for r in rows])
        note = f" (first {MAX_ROWS})" if more else ""
        noun = "row" if len(rows) == 1 else "rows"
        self.query_one("#sql-status", Static).update(f"{len(rows):,} {noun}{note} in {seconds * 1000:.0f} ms")
        if rows:
            table.focus()


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"
