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
from textual.widgets import Footer, Input, SelectionList, Static
from textual.widgets.selection_list import Selection
from textual.worker import get_current_worker

from dissect_tui.errors import UserError
from dissect_tui.store.browse import NeuronTable as NeuronColumns
from dissect_tui.store.browse import load_neuron_table, load_top_concepts
from dissect_tui.text import printable
from dissect_tui.tui.base import BrowseScreen, is_text_entry
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.dialogs import CutoffDialog, ExportDialog, TwoConceptDialog
from dissect_tui.tui.model import SORT_KEYS, Filters, NeuronModel, QueryScores
from dissect_tui.tui.neuron_table import INTERPRETABLE, NeuronTable
from dissect_tui.tui.session import BrowseSession

CUTOFF_STEP = 0.01


def fmt_cutoff(value: float) -> str:
    """τ for the status line: 3 decimals, but never hundreds of digits for a typed 1e300."""
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"


class MainScreen(BrowseScreen):
    BINDINGS = [
        Binding("slash", "filter_text", "Filter", key_display="/"),
        Binding("c", "concept_query", "Concept query"),
        Binding("2", "two_concepts", "Two concepts"),
        Binding("plus,equals_sign", "cutoff(1)", "τ+", key_display="+"),
        Binding("minus", "cutoff(-1)", "τ-", key_display="-"),
        Binding("t", "type_cutoff", "Set τ"),
        Binding("i", "toggle_interpretable", "Interpretable"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse", show=False),
        Binding("l", "focus_layers", "Layers", show=False),
        Binding("a", "all_layers", "All layers", show=False),
        Binding("m", "pin", "Pin", show=False),
        Binding("M", "pinned_only", "Pinned only", show=False),
        Binding("e", "export(False)", "Export"),
        Binding("E", "export(True)", "Export pinned", show=False),
        Binding("x", "clear", "Clear filters", show=False),
        Binding("escape", "back", "Drop the CLIP ranking", show=False),
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
        self.view_rows = np.zeros(0, dtype=np.int64)
        self.last_update_ms = 0.0
        self._layer_rows: list[tuple[str, int, int]] = []  # (layer, neurons, interpretable)

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="title")
        with Horizontal(id="body"):
            with Vertical(id="side"):
                yield Static("layer          n  ✓%", id="layers-title")
                yield SelectionList[int](id="layers")
            with Vertical(id="center"):
                yield Static("", id="status")
                yield NeuronTable(id="table")
                yield Static("", id="preview")
                yield Input(placeholder="/ filter labels and top concepts", id="filter")
        yield Footer()

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
        sel = self.query_one("#layers", SelectionList)
        chosen = set(self.session.filters.layers)
        highlighted = sel.highlighted
        sel.clear_options()
        options = []
        self._layer_rows = model.layer_counts(self.session.filters.cutoff)
        for i in range(len(self._layer_rows)):
            options.append(Selection(self._layer_prompt(i, i in chosen), i, i in chosen))
        sel.add_options(options)
        if highlighted is not None and highlighted < len(options):
            sel.highlighted = highlighted

    def _layer_prompt(self, i: int, chosen: bool) -> Text:
        # The checkbox shows selection by colour only: "●" says it in a monochrome terminal too.
        name, n, good = self._layer_rows[i]
        pct = 100.0 * good / n if n else 0.0
        return Text(f"{'●' if chosen else ' '}{printable(name)[:8]:<8} {n:>5} {pct:>3.0f}%")

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
        assert s.model is not None
        f = s.filters
        good = int(s.model.interpretable(f.cutoff).sum())
        parts: list[str | Text] = [
            f"τ={fmt_cutoff(f.cutoff)} ({good:,}/{s.model.n:,} {INTERPRETABLE})",
            f"sort {s.sort}{'▲' if s.reverse else '▼'}",
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
        if self.mode == "concept":
            parts.append(Text.assemble(("concept query", "bold"), ": type, Enter"))
        # Plain text, never markup: layer names, the filter and the query come from the cache or the user.
        status = Text(" · ").join(Text(p) if isinstance(p, str) else p for p in parts)
        self.query_one("#status", Static).update(status)

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
        if self.session.model is not None:
            self._update_status()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # While the filter box has focus every key but Esc is text: don't offer + - s … in the footer.
        return action == "back" or not is_text_entry(self.focused)

    def on_key(self, event) -> None:
        if event.key == "escape" and isinstance(self.focused, Input):
            self.query_one("#table", NeuronTable).focus()
            event.stop()

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
        sel = self.query_one("#layers", SelectionList)
        if sel.highlighted is None and sel.option_count:
            sel.highlighted = 0
        sel.focus()

    def action_all_layers(self) -> None:
        self.query_one("#layers", SelectionList).deselect_all()

    @on(SelectionList.SelectedChanged, "#layers")
    def _layers_changed(self, event: SelectionList.SelectedChanged) -> None:
        self.session.filters.layers = frozenset(event.selection_list.selected)
        sel = event.selection_list
        for i in range(min(sel.option_count, len(self._layer_rows))):
            sel.replace_option_prompt_at_index(i, self._layer_prompt(i, i in self.session.filters.layers))
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
        self.query_one("#layers", SelectionList).deselect_all()
        if s.model is not None:
            s.model.set_query(None)
        s.sort, s.reverse = "layer", False
        self.refresh_view()

    def action_back(self) -> None:
        s = self.session
        if s.model is not None and s.model.query is not None:
            s.model.set_query(None)
            if s.sort == "query":
                s.sort = "layer"
            self.refresh_view()

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
                a, b = pair
                self.start_query([f"{a} {b}", a, b], f"{a} {b}", [a, b])

        self.app.push_screen(TwoConceptDialog(), done)

    def start_query(self, texts: list[str], title: str, extra: list[str]) -> None:
        self.notify(
            f"ranking neurons by “{printable(title)}” (loading CLIP the first time)…", timeout=3, markup=False
        )
        self.run_query(texts, title, extra)

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
