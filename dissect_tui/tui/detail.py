"""Neuron detail: top images, top concepts, activation histogram, percentile samples, related neurons."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ItemGrid, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from dissect_tui.errors import UserError
from dissect_tui.store.browse import (
    NeuronDetail,
    correlated_units,
    neuron_detail,
    similar_labels,
    thumbnails,
)
from dissect_tui.text import printable
from dissect_tui.tui.charts import bar_chart, histogram
from dissect_tui.tui.images import Thumb
from dissect_tui.tui.neuron_table import INTERPRETABLE, NOT_INTERPRETABLE, PIN
from dissect_tui.tui.workers import ReportsWorkerErrors

if TYPE_CHECKING:
    from dissect_tui.tui.main import MainScreen

N_TOP_IMAGES = 10


class DetailScreen(ReportsWorkerErrors, Screen):
    BINDINGS = [
        Binding("escape,backspace", "back", "Back"),
        Binding("n,right", "step(1)", "Next", key_display="n/→"),
        Binding("p,left", "step(-1)", "Previous", key_display="p/←"),
        Binding("c", "compose", "Two-concept explanation"),
        Binding("m", "pin", "Pin"),
    ]

    def __init__(self, main: MainScreen, index: int, rows: np.ndarray | None = None) -> None:
        super().__init__()
        self.main = main
        self.follows_view = rows is None  # stepping through the main view, not a related neuron
        self.rows = main.view_rows.copy() if rows is None else rows
        self.index = index
        self.detail: NeuronDetail | None = None

    @property
    def row(self) -> int:
        return int(self.rows[self.index])

    @property
    def key(self) -> tuple[str, int]:
        assert self.main.model is not None
        return self.main.model.key(self.row)

    def compose(self) -> ComposeResult:
        yield Static("", id="d-title")
        with VerticalScroll(id="d-body"):
            yield Static("Top images", classes="section")
            yield ItemGrid(id="top-images", min_column_width=15)
            with ItemGrid(id="charts", min_column_width=38):
                with Vertical(classes="panel"):
                    yield Static("Top concepts (score)", classes="section")
                    yield Static("", id="concepts")
                with Vertical(classes="panel"):
                    yield Static("Activations over all probe images", classes="section")
                    yield Static("", id="hist")
            yield Static("Samples from the top 0.1% / 1% / 5% of activations", classes="section")
            yield Vertical(id="samples")
            with ItemGrid(id="related", min_column_width=38):
                with Vertical(classes="panel"):
                    yield Static("Similar labels (Enter opens)", classes="section")
                    yield OptionList(id="similar")
                with Vertical(classes="panel"):
                    yield Static("Correlated activations, same layer", classes="section")
                    yield OptionList(id="correlated")
            yield Static("Two-concept explanation (press c)", classes="section")
            yield Static("", id="composition")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#d-body").focus()
        self.show_neuron()

    # -- loading ---------------------------------------------------------------------------
    def show_neuron(self) -> None:
        assert self.main.model is not None
        layer, unit = self.key
        t = self.main.model.table
        sim = float(t.similarity[self.row])
        good = sim > self.main.filters.cutoff
        pin = f" {PIN} pinned" if self.main.model.pinned[self.row] else ""
        title = Text.assemble(
            (f"{printable(layer)}:{unit}", "bold"),
            f"  {printable(t.label[self.row])}  ",
            (f"{sim:.4f} ", ""),
            (
                INTERPRETABLE + " interpretable" if good else NOT_INTERPRETABLE + " below τ",
                "green" if good else "dim",
            ),
            pin,
            (f"   [{self.index + 1}/{len(self.rows)}]", "dim"),
        )
        self.query_one("#d-title", Static).update(title)
        self.load(layer, unit)

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False)
    def load(self, layer: str, unit: int) -> None:
        app = self.app
        run = app.run_info
        cur = app.cursor()
        try:
            detail = neuron_detail(cur, run["run_id"], layer, unit, n_images=N_TOP_IMAGES)
            ids = [r[1] for r in detail.top_images] + [i for _, s in detail.samples for i, _, _ in s]
            thumbs = thumbnails(cur, ids)
            similar = similar_labels(cur, run["run_id"], layer, unit)
            correlated, n_used = correlated_units(cur, layer, unit)
        except UserError as exc:
            app.call_from_thread(self.notify, printable(exc), severity="error", markup=False)
            return
        finally:
            cur.close()
        stored = app.sidecar.composition(layer, unit) if app.sidecar is not None else None
        app.call_from_thread(self._show, detail, thumbs, similar, correlated, n_used, stored)

    def _show(self, d: NeuronDetail, thumbs, similar, correlated, n_used, stored) -> None:
        if (d.layer, d.unit) != self.key:
            return  # the user already moved on
        self.detail = d
        image_cls = self.app.image_cls
        grid = self.query_one("#top-images", ItemGrid)
        grid.remove_children()
        grid.mount_all(
            Thumb(thumbs.get(image_id), f"#{rank} {act:.3f}\n{_tail(path, 14)}", image_cls)
            for rank, image_id, act, path in d.top_images
        )
        width = max(30, self.size.width // 2 - 4) if self.size.width >= 80 else max(30, self.size.width - 4)
        self.query_one("#concepts", Static).update(bar_chart(d.concepts, width=width, highlight=d.label))
        self.query_one("#hist", Static).update(histogram(d.activations, width=min(width, 60)))
        samples = self.query_one("#samples", Vertical)
        samples.remove_children()
        for band, items in d.samples:
            row = ItemGrid(min_column_width=15)
            samples.mount(Static(band, classes="band"))
            samples.mount(row)
            row.mount_all(
                Thumb(thumbs.get(i), f"{act:.3f}\n{_tail(path, 14)}", image_cls) for i, act, path in items
            )
        sim_list = self.query_one("#similar", OptionList)
        sim_list.clear_options()
        sim_list.add_options(
            [
                Option(Text(f"{printable(lay)}:{u}  {printable(lab)}  ({s:.2f})"), id=f"{lay}\t{u}")
                for lay, u, lab, s in similar
            ]
        )
        corr = self.query_one("#correlated", OptionList)
        corr.clear_options()
        t = self.main.model.table if self.main.model else None
        opts = []
        for u, r in correlated:
            row = self.main.model.row_of(d.layer, u) if self.main.model else None
            label = t.label[row] if t is not None and row is not None else "?"
            opts.append(
                Option(
                    Text(f"{printable(d.layer)}:{u}  {printable(label)}  (r={r:.2f})"), id=f"{d.layer}\t{u}"
                )
            )
        corr.add_options(opts or [Option(f"no correlation data ({n_used} images)", disabled=True)])
        self.show_composition(stored)

    def show_composition(self, stored) -> None:
        box = self.query_one("#composition", Static)
        if not stored:
            box.update(Text("not computed yet", style="dim"))
            return
        breadth, pairs, singles = stored
        out = Text(f"from the top {breadth} concepts — best pairs:\n", style="dim")
        out.append_text(bar_chart(pairs[:5], width=60))
        out.append("\nbest single (rescored): ", style="dim")
        if singles:
            out.append(f"{printable(singles[0][0])} {singles[0][1]:.3f}")
        box.update(out)

    # -- actions ---------------------------------------------------------------------------
    def action_back(self) -> None:
        if self.follows_view:  # back in the table on the neuron n/p led to, not where Enter was
            self.main.follow(self.row)
        self.app.pop_screen()

    def action_step(self, delta: int) -> None:
        new = self.index + delta
        if 0 <= new < len(self.rows):
            self.index = new
            self.show_neuron()
        else:
            self.notify("last neuron of the view" if delta > 0 else "first neuron of the view", timeout=2)

    def action_pin(self) -> None:
        self.main.toggle_pin(self.row)
        self.show_neuron()

    def action_compose(self) -> None:
        from dissect_tui.tui.compose import ComposeScreen

        self.app.push_screen(ComposeScreen(self.key, self.main.model.table.label[self.row]), self._composed)

    def _composed(self, result) -> None:
        if result:
            self.show_composition(result)

    @on(OptionList.OptionSelected)
    def _jump(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is None or self.main.model is None:
            return
        layer, unit = event.option.id.rsplit("\t", 1)
        row = self.main.model.row_of(layer, int(unit))
        if row is not None:
            self.app.push_screen(DetailScreen(self.main, 0, rows=np.array([row])))


def _tail(path: str, width: int) -> str:
    """The end of an image path for a caption (made printable: paths come from the cache)."""
    name = printable(path.rsplit("/", 1)[-1])
    return name if len(name) <= width else "…" + name[-(width - 1) :]
