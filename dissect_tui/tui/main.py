"""Main screen: layer list, neuron table, live filters, cutoff, concept queries."""

from __future__ import annotations

import time

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, WorkerState, get_current_worker

from dissect_tui.errors import UserError
from dissect_tui.store.browse import NeuronTable as NeuronColumns
from dissect_tui.store.browse import load_neuron_table, load_top_concepts
from dissect_tui.text import printable
from dissect_tui.tui.base import HELP, QUIT, BrowseScreen, is_text_entry
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.dialogs import CutoffDialog, ExportDialog, TwoConceptDialog
from dissect_tui.tui.layers import LayerList
from dissect_tui.tui.model import SORT_KEYS, Filters, NeuronModel, QueryScores
from dissect_tui.tui.neuron_table import INTERPRETABLE, NeuronTable, sort_arrow
from dissect_tui.tui.session import BrowseSession

CUTOFF_STEP = 0.01
CUTOFF_KEYS = Binding.Group("τ", compact=True)  # the footer shows "+- τ"


def fmt_cutoff(value: float) -> str:
    """τ for the status line: 3 decimals, but never hundreds of digits for a typed 1e300."""
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"


class MainScreen(BrowseScreen):
    # The footer shows these in this order (after the table's ⏎ Open) and cuts what does not fit:
    # the essential keys first, with short names; the help screen and the command palette (Ctrl+P)
    # show the tooltip, the long name, and list the keys not shown in the footer as well.
    BINDINGS = [
        QUIT,
        HELP,
        Binding("escape", "back", "Back", tooltip="Leave the text box, or drop the CLIP ranking"),
        Binding("slash", "filter_text", "Filter", key_display="/", tooltip="Filter labels and top concepts"),
        Binding("c", "concept_query", "Query", tooltip="Concept query: rank neurons by any text (CLIP)"),
        Binding("2", "two_concepts", "A+B", tooltip="Two-concept search: rank neurons by “A B”"),
        Binding(
            "plus,equals_sign",
            "cutoff(1)",
            "τ+",
            key_display="+",
            tooltip="Raise the cutoff τ by 0.01",
            group=CUTOFF_KEYS,
        ),
        Binding(
            "minus",
            "cutoff(-1)",
            "τ-",
            key_display="-",
            tooltip="Lower the cutoff τ by 0.01",
            group=CUTOFF_KEYS,
        ),
        Binding("i", "toggle_interpretable", "✓only", tooltip="Show interpretable neurons only (score > τ)"),
        Binding(
            "s", "cycle_sort", "Sort", tooltip="Sort by the next column (layer, unit, label, score, query)"
        ),
        Binding("e", "export(False)", "Export", tooltip="Export the view as shown (.csv or .parquet)"),
        Binding("t", "type_cutoff", "Set τ", show=False, tooltip="Type an exact cutoff τ"),
        Binding("r", "reverse_sort", "Reverse", show=False, tooltip="Reverse the sort order"),
        Binding("l", "focus_layers", "Layers", show=False, tooltip="Go to the layer list"),
        Binding(
            "a", "all_layers", "All layers", show=False, tooltip="Select all layers (clear the layer filter)"
        ),
        Binding("m", "pin", "Pin", show=False, tooltip="Pin or unpin the highlighted neuron"),
        Binding("M", "pinned_only", "Pinned only", show=False, tooltip="Show pinned neurons only"),
        Binding("E", "export(True)", "Export pinned", show=False, tooltip="Export the pinned neurons"),
        Binding("x", "clear", "Clear filters", show=False, tooltip="Clear every filter and the ranking"),
    ]

    # Workers report through these messages (post_message is thread-safe); handlers run on the UI.
    class Loaded(Message):
        def __init__(self, run: dict, table: NeuronColumns, pins: list[tuple[str, int]], warning: str | None):
            super().__init__()
            self.run, self.table, self.pins, self.warning = run, table, pins, warning

    class TopsLoaded(Message):
        def __init__(self, tops: list[str]) -> None:
            super().__init__()
            self.tops = tops

    class QueryDone(Message):
        def __init__(self, query: QueryScores) -> None:
            super().__init__()
            self.query = query

    class QueryFailed(Message):
        def __init__(self, message: str, text: str) -> None:
            super().__init__()
            self.message, self.text = message, text

    def __init__(self, session: BrowseSession) -> None:
        super().__init__()
        self.session = session
        self.mode = "text"  # what the filter box does: 'text' filters, 'concept' ranks with CLIP
        self.busy: Text | None = None  # shown on the status line until a running CLIP ranking arrives
        self._query_worker: Worker | None = None
        self.view_rows = np.zeros(0, dtype=np.int64)
        self.last_update_ms = 0.0

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="title")
        with Horizontal(id="body"):
            with Vertical(id="side"):
                yield Static("  layer         n  ✓%", id="layers-title")
                yield LayerList(id="layers")
            with Vertical(id="center"):
                yield Static("", id="status")
                yield NeuronTable(id="table")
                yield Static("", id="preview")
                yield Input(placeholder="/ filter labels and top concepts", id="filter")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#table", NeuronTable).focus()
        self.load()

    def on_screen_resume(self) -> None:
        self.query_one("#table", NeuronTable).refresh()  # pins may have changed on the detail screen

    # -- loading (worker) --------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load(self) -> None:
        session = self.session
        cur = session.cursor()
        try:
            run = cur.run(session.requested_run)
            table = load_neuron_table(cur, run["run_id"], n_top=None)
            warning = session.open_sidecar(run)
            pins = session.sidecar.pins() if session.sidecar else []
            self.post_message(self.Loaded(run, table, pins, warning))
            # Paint first; the top concepts (for the text filter) follow, ~1 s per 100k neurons.
            self.post_message(self.TopsLoaded(load_top_concepts(cur, run["run_id"], table)))
        finally:
            cur.close()

    @on(Loaded)
    def _loaded(self, event: Loaded) -> None:
        run, table = event.run, event.table
        model = NeuronModel(table)
        for key in event.pins:
            row = model.row_of(*key)
            if row is not None:
                model.pinned[row] = True
        self.session.start(run, model)
        if event.warning:
            self.notify(printable(event.warning), severity="warning", markup=False)
        target = run.get("target") or "?"
        self.query_one("#title", Static).update(
            Text.assemble(
                (printable(target), "bold"),
                f" · run {run['run_id']} ({printable(run.get('kind'))}) · {printable(run.get('similarity'))}"
                f" · {printable(run.get('concept_set'))} · {len(table):,} neurons",
            )
        )
        self._fill_layers()
        self.refresh_view()

    @on(TopsLoaded)
    def _tops_loaded(self, event: TopsLoaded) -> None:
        model = self.session.model
        assert model is not None
        model.set_top_concepts(event.tops)
        self.refresh_view()
        row = self.query_one("#table", NeuronTable).current_row()
        self._preview(NeuronTable.Highlighted(row))

    # -- view --------------------------------------------------------------------------
    def _fill_layers(self) -> None:
        model = self.session.model
        assert model is not None
        self.query_one("#layers", LayerList).set_rows(model.layer_counts(self.session.filters.cutoff))

    def refresh_view(self, top: bool = False) -> None:
        """Recompute the view; ``top`` puts the cursor on its first row (a new ranking's best)."""
        s = self.session
        if s.model is None:
            return
        t0 = time.perf_counter()
        self.view_rows = s.model.view(s.filters, s.sort, s.reverse)
        table = self.query_one("#table", NeuronTable)
        table.set_view(s.model, self.view_rows, s.filters.cutoff, s.sort, s.reverse, top=top)
        self.last_update_ms = (time.perf_counter() - t0) * 1000
        self._update_status()

    def _update_status(self) -> None:
        s = self.session
        if s.model is None:
            return
        f = s.filters
        good = int(s.model.interpretable(f.cutoff).sum())
        parts: list[str | Text] = []
        if self.busy is not None:
            parts.append(self.busy)
        parts += [
            f"τ={fmt_cutoff(f.cutoff)} ({good:,}/{s.model.n:,} {INTERPRETABLE})",
            f"sort {s.sort}{sort_arrow(s.sort, s.reverse)}",
            f"{len(self.view_rows):,} shown",
        ]
        if f.layers:
            parts.append("layers " + ",".join(printable(s.model.table.layers[i]) for i in sorted(f.layers)))
        if f.text and self.mode != "text":  # in text mode the box itself shows it
            parts.append(f"filter “{printable(f.text)}”")
        if f.interpretable_only:
            parts.append(f"{INTERPRETABLE} only")
        if f.pinned_only:
            parts.append("pinned only")
        if s.model.query is not None:
            parts.append(f"ranked by “{printable(s.model.query.title)}”")
        if self.mode == "concept" and is_text_entry(self.focused):
            parts.append(Text.assemble(("concept query", "bold"), ": type, Enter"))
        # Plain text, never markup: layer names, the filter and the query come from the cache or the user.
        status = Text(" · ").join(Text(p) if isinstance(p, str) else p for p in parts)
        self.query_one("#status", Static).update(status)

    def on_descendant_focus(self) -> None:
        self._update_status()  # the concept-query hint shows while the box has focus

    def on_descendant_blur(self) -> None:
        self._update_status()

    @on(NeuronTable.Highlighted)
    def _preview(self, event: NeuronTable.Highlighted) -> None:
        model = self.session.model
        text = ""
        if model is not None and event.row is not None:
            tops = model.table.top_concepts[event.row]
            text = f"top concepts: {printable(tops)}" if tops else ""
            q = model.query
            if q is not None:  # the query scores, also those the table has no room for at 80 columns
                scores = [(q.title, q.scores)] + list(q.extra.items())
                text = " · ".join(
                    f"{printable(name)} {float(col[event.row]):.3f}" for name, col in scores
                ) + (f" · {text}" if text else "")
        self.query_one("#preview", Static).update(Text(text))  # no markup: [ ] in concept text

    # -- filter box --------------------------------------------------------------------
    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        if self.mode == "text":
            self.session.filters.text = event.value
            self.refresh_view()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        if self.mode == "concept":
            text = event.value.strip()
            if text:
                self.start_query([text], text, [])
        self.query_one("#table", NeuronTable).focus()

    def action_filter_text(self) -> None:
        self._set_mode("text")
        self.query_one("#filter", Input).focus()

    def action_concept_query(self) -> None:
        self._set_mode("concept")
        self.query_one("#filter", Input).focus()

    def _set_mode(self, mode: str) -> None:
        box = self.query_one("#filter", Input)
        if mode == self.mode:
            return
        self.mode = mode
        box.placeholder = (
            "concept query: any text, ranked with CLIP (Enter)"
            if mode == "concept"
            else "/ filter labels and top concepts"
        )
        # One box, two uses: a concept query starts empty, and the text filter stays applied
        # underneath it (the status line names it) until it is edited again with / or cleared with x.
        box.value = "" if mode == "concept" else self.session.filters.text
        self._update_status()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if is_text_entry(self.focused):
            # While the filter box has focus every key but Esc is text: the footer offers only Esc.
            return action == "back"
        if action == "back":  # Esc drops a ranking; without one it does nothing and is not offered
            return self.session.model is not None and self.session.model.query is not None
        return True

    # -- actions -------------------------------------------------------------------------
    @on(NeuronTable.Selected)
    def _open(self, event: NeuronTable.Selected) -> None:
        index = int(np.flatnonzero(self.view_rows == event.row)[0])
        self.app.push_screen(DetailScreen(self.session, self.view_rows.copy(), index), self._follow)

    def _follow(self, row: int | None) -> None:
        """Back from the detail screen: the table cursor on the neuron n/p led to."""
        if row is not None:
            self.query_one("#table", NeuronTable).move_to_row(row)

    def action_cutoff(self, steps: int) -> None:
        self.set_cutoff(round(self.session.filters.cutoff + steps * CUTOFF_STEP, 6))

    def set_cutoff(self, value: float) -> None:
        self.session.filters.cutoff = value
        if self.session.model is not None:
            self._fill_layers()
        self.refresh_view()

    def action_type_cutoff(self) -> None:
        def done(value: float | None) -> None:
            if value is not None:
                self.set_cutoff(value)

        self.app.push_screen(CutoffDialog(self.session.filters.cutoff, self._percentiles()), done)

    def _percentiles(self) -> str:
        model = self.session.model
        if model is None or not model.n:
            return ""
        q = np.quantile(model.table.similarity, [0.5, 0.9, 0.99])
        return f"median {q[0]:.3f} · p90 {q[1]:.3f} · p99 {q[2]:.3f}"

    def action_toggle_interpretable(self) -> None:
        self.session.filters.interpretable_only = not self.session.filters.interpretable_only
        self.refresh_view()

    def action_cycle_sort(self) -> None:
        s = self.session
        keys = [k for k in SORT_KEYS if k != "query" or (s.model and s.model.query)]
        s.sort = keys[(keys.index(s.sort) + 1) % len(keys)] if s.sort in keys else keys[0]
        s.reverse = False
        self.refresh_view()

    def action_reverse_sort(self) -> None:
        self.session.reverse = not self.session.reverse
        self.refresh_view()

    def action_focus_layers(self) -> None:
        layers = self.query_one("#layers", LayerList)
        if layers.highlighted is None and layers.option_count:
            layers.highlighted = 0
        layers.focus()

    def action_all_layers(self) -> None:
        self.query_one("#layers", LayerList).set_selected(frozenset())

    @on(LayerList.Changed)
    def _layers_changed(self, event: LayerList.Changed) -> None:
        self.session.filters.layers = event.selected
        self.refresh_view()

    def action_pin(self) -> None:
        row = self.query_one("#table", NeuronTable).current_row()
        if row is not None and self.session.model is not None:
            self.save_pin(*self.session.toggle_pin(row))
            self.query_one("#table", NeuronTable).refresh()

    @work(thread=True, group="pins", exit_on_error=False)
    def save_pin(self, layer: str, unit: int, pinned: bool) -> None:
        self.session.save_pin(layer, unit, pinned)

    def action_pinned_only(self) -> None:
        self.session.filters.pinned_only = not self.session.filters.pinned_only
        self.refresh_view()

    def action_clear(self) -> None:
        s = self.session
        s.filters = Filters(cutoff=s.filters.cutoff)
        self.query_one("#filter", Input).value = ""
        self.query_one("#layers", LayerList).set_selected(frozenset())
        if s.model is not None:
            s.model.set_query(None)
        s.sort, s.reverse = "layer", False
        self.refresh_view()
        self.refresh_bindings()

    def action_back(self) -> None:
        s = self.session
        if is_text_entry(self.focused):
            self.query_one("#table", NeuronTable).focus()
        elif s.model is not None and s.model.query is not None:
            s.model.set_query(None)
            if s.sort == "query":
                s.sort = "layer"
            self.refresh_view()
            self.refresh_bindings()

    # -- export --------------------------------------------------------------------------
    def action_export(self, pinned: bool) -> None:
        s = self.session
        if s.model is None:
            return
        # What is exported is what is shown: the on-screen order, τ and query scores.
        if pinned:
            rows = s.model.view(Filters(cutoff=s.filters.cutoff, pinned_only=True), s.sort, s.reverse)
        else:
            rows = self.view_rows
        if not len(rows):
            self.notify("nothing to export" + (" (no pinned neurons: press m)" if pinned else ""))
            return
        keys = [s.model.key(int(r)) for r in rows]
        extra: dict[str, list[float]] = {}
        q = s.model.query
        if q is not None:
            for name, col in [(q.title, q.scores), *q.extra.items()]:
                extra.setdefault(f"query: {name}", col[rows].astype(float).tolist())
        default = f"{s.cache_stem}-{'pinned' if pinned else 'view'}.csv"
        cutoff = s.filters.cutoff

        def done(choice: tuple[str, bool] | None) -> None:
            if choice:
                self.export(*choice, keys, cutoff, extra)

        self.app.push_screen(ExportDialog(default, len(keys)), done)

    @work(thread=True, group="export", exit_on_error=False)
    def export(
        self,
        path: str,
        overwrite: bool,
        keys: list[tuple[str, int]],
        cutoff: float,
        extra: dict[str, list[float]],
    ) -> None:
        from dissect_tui.store.export import export_neurons

        cur = self.session.cursor()
        try:
            n = export_neurons(
                cur,
                self.session.run_id,
                path,
                keys=keys,
                cutoff=cutoff,
                overwrite=overwrite,
                keep_order=True,
                extra=extra or None,
            )
        except (UserError, OSError) as exc:
            self.app.notify(f"export failed: {printable(exc)}", severity="error", markup=False)
            return
        finally:
            cur.close()
        self.app.notify(f"wrote {n:,} neuron{'s' if n != 1 else ''} to {printable(path)}", markup=False)

    # -- concept queries (CLIP, in a worker) -------------------------------------------
    def action_two_concepts(self) -> None:
        def done(pair: tuple[str, str] | None) -> None:
            if pair:
                a, b = self.session.last_pair = pair
                self.start_query([f"{a} {b}", a, b], f"{a} {b}", [a, b])

        self.app.push_screen(TwoConceptDialog(*self.session.last_pair), done)

    def start_query(self, texts: list[str], title: str, extra: list[str]) -> None:
        # A persistent line, not a toast: the first query loads CLIP (seconds), and a toast would
        # either vanish before the ranking arrives or cover the fresh results.
        first = "" if self.session.clip_loaded else " (loading CLIP)"
        self.busy = Text(f"⧗ ranking by “{printable(title)}”…{first}", style="reverse")
        self._update_status()
        self._query_worker = self.run_query(texts, title, extra)

    @on(Worker.StateChanged)
    def _query_state(self, event: Worker.StateChanged) -> None:
        # Success, failure or cancellation of the current query: the busy line goes.
        if event.worker is self._query_worker and event.state in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            self._query_worker = None
            self.busy = None
            self._update_status()

    @work(thread=True, exclusive=True, group="query", exit_on_error=False)
    def run_query(self, texts: list[str], title: str, extra: list[str]) -> None:
        worker = get_current_worker()
        model = self.session.model
        assert model is not None
        try:
            scores = self.session.explainer().query_scores(texts, model.table)
        except UserError as exc:
            self.post_message(self.QueryFailed(str(exc), title))
            return
        if worker.is_cancelled:
            return
        q = QueryScores(
            title=title, scores=scores[:, 0], extra={n: scores[:, i + 1] for i, n in enumerate(extra)}
        )
        if self.session.sidecar is not None:
            self.session.sidecar.remember_query(title)
        self.post_message(self.QueryDone(q))

    @on(QueryDone)
    def _query_done(self, event: QueryDone) -> None:
        s = self.session
        assert s.model is not None
        s.model.set_query(event.query)
        s.sort, s.reverse = "query", False
        self.refresh_view(top=True)  # a ranking opens at its best match
        self.refresh_bindings()  # Esc now drops it

    @on(QueryFailed)
    def _query_failed(self, event: QueryFailed) -> None:
        # Without CLIP weights, fall back to substring search over labels and top concepts.
        self.notify(
            f"{printable(event.message)} — showing a substring search instead",
            severity="warning",
            timeout=8,
            markup=False,
        )
        self._set_mode("text")
        self.query_one("#filter", Input).value = event.text
