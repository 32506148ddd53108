"""Two-concept explanation of one neuron (paper A.4), computed in a cancellable worker."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ItemGrid, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, ProgressBar, Static
from textual.worker import Worker, WorkerState, get_current_worker

from dissect_tui.errors import UserError
from dissect_tui.text import printable
from dissect_tui.tui.base import HELP, QUIT, BrowseModal
from dissect_tui.tui.charts import bar_chart
from dissect_tui.tui.session import BrowseSession

BREADTHS = (10, 20, 100)

# (breadth used, best pairs, best singles): what Explainer.compose returns and the sidecar stores.
Composition = tuple[int, list[tuple[str, float]], list[tuple[str, float]]]


class ComposeScreen(BrowseModal):
    """Dismisses with the last finished Composition, or None."""

    class Progress(Message):
        def __init__(self, done: int, total: int) -> None:
            super().__init__()
            self.done, self.total = done, total

    class Computed(Message):
        def __init__(self, result: Composition) -> None:
            super().__init__()
            self.result = result

    class Failed(Message):
        def __init__(self, message: str) -> None:
            super().__init__()
            self.message = message

    BINDINGS = [
        # A modal screen hides the app's bindings: q and ? must still work here.
        QUIT,
        HELP,
        Binding("escape", "close", "Back", tooltip="Cancel the computation, or back"),
        Binding("1", "breadth(10)", "Top 10"),
        Binding("2", "breadth(20)", "Top 20"),
        Binding("3", "breadth(100)", "Top 100"),
        Binding("r,enter", "run", "Compute"),
    ]
    DEFAULT_CSS = """
    ComposeScreen { align: center middle; }
    ComposeScreen > VerticalScroll { width: 100; max-width: 100%; height: auto; max-height: 100%; border: round $accent; background: $surface; padding: 0 1; }
    ComposeScreen ProgressBar { margin: 1 0 0 0; }
    ComposeScreen #c-results { height: auto; }
    """

    def __init__(self, session: BrowseSession, key: tuple[str, int], label: str, breadth: int = 10) -> None:
        super().__init__()
        self.session = session
        self.key = key
        self.label = label
        self.breadth = breadth
        self.result: Composition | None = None
        self._worker: Worker | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="c-box"):  # at 80x24 the two top-10 lists need scrolling
            yield Static(self._title(), id="c-title")
            yield Static("", id="c-status")
            yield ProgressBar(id="c-progress", show_eta=False)
            with ItemGrid(id="c-results", min_column_width=44):
                yield Static("", id="c-pairs")
                yield Static("", id="c-singles")
        yield Footer(compact=True)

    def _title(self) -> Text:
        layer, unit = self.key
        return Text.assemble(
            ("Two-concept explanation ", "bold"),
            f"of {printable(layer)}:{unit} (label: {printable(self.label)}) · breadth: top {self.breadth} concepts "
            f"→ {self.breadth * (self.breadth - 1):,} pairs",
        )

    def on_mount(self) -> None:
        self.query_one("#c-box").focus()
        sidecar = self.session.sidecar
        stored = sidecar.composition(*self.key) if sidecar is not None else None
        if stored is not None:
            self.breadth = stored[0]
            self.query_one("#c-title", Static).update(self._title())
            self._show(stored, "saved result (r recomputes; 1/2/3 choose the breadth)")
        else:
            self.action_run()

    # -- actions -----------------------------------------------------------------------------
    def action_breadth(self, n: int) -> None:
        self.breadth = n
        self.query_one("#c-title", Static).update(self._title())
        self.action_run()

    def action_run(self) -> None:
        self.query_one("#c-status", Static).update("loading CLIP and encoding pairs…")
        self.query_one("#c-progress", ProgressBar).update(total=None, progress=0)
        self._worker = self.compute(self.breadth)

    def action_close(self) -> None:
        if self._worker is not None and self._worker.state in (WorkerState.PENDING, WorkerState.RUNNING):
            self._worker.cancel()
            self._worker = None
            if self.result is not None:  # the title must describe the result still shown
                self.breadth = self.result[0]
                self.query_one("#c-title", Static).update(self._title())
                self.query_one("#c-progress", ProgressBar).update(total=1, progress=1)
            self.query_one("#c-status", Static).update(
                "cancelled" + (f"; showing the top {self.result[0]} result" if self.result else "")
            )
            return
        self.dismiss(self.result)

    # -- worker ------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="compose", exit_on_error=False)
    def compute(self, breadth: int) -> None:
        worker = get_current_worker()
        from dissect_tui.explain import Cancelled

        def progress(done: int, total: int) -> None:
            self.post_message(self.Progress(done, total))

        session = self.session
        try:
            result = session.explainer().compose(*self.key, breadth, progress, lambda: worker.is_cancelled)
        except Cancelled:
            return
        except UserError as exc:
            self.post_message(self.Failed(str(exc)))
            return
        if worker.is_cancelled:
            return
        if session.sidecar is not None:
            session.sidecar.save_composition(*self.key, result[0], result[1], result[2])
        self.post_message(self.Computed(result))

    @on(Progress)
    def _progress(self, event: Progress) -> None:
        if self._worker is None:
            return  # cancelled: a late report must not move the bar of the result still shown
        self.query_one("#c-progress", ProgressBar).update(total=event.total, progress=event.done)

    @on(Computed)
    def _computed(self, event: Computed) -> None:
        self._show(event.result, f"computed from the top {event.result[0]} concepts; saved")

    @on(Failed)
    def _failed(self, event: Failed) -> None:
        self.query_one("#c-status", Static).update(Text(printable(event.message), style="red"))
        self._worker = None

    def _show(self, result: Composition, status: str) -> None:
        self.result = result
        self._worker = None
        _, pairs, singles = result
        self.query_one("#c-status", Static).update(Text(status, style="dim"))
        bar = self.query_one("#c-progress", ProgressBar)
        bar.update(total=1, progress=1)
        left = Text("Best pairs\n", style="bold")
        left.append_text(bar_chart(pairs[:10], width=42))
        right = Text("Best single concepts (same rescoring)\n", style="bold")
        right.append_text(bar_chart(singles[:10], width=42, highlight=self.label))
        self.query_one("#c-pairs", Static).update(left)
        self.query_one("#c-singles", Static).update(right)
