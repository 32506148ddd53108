"""Neuron detail: top images, top concepts, activation histogram, percentile samples, related neurons."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ItemGrid, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from dissect_tui.store.browse import (
    NeuronDetail,
    correlated_units,
    neuron_detail,
    similar_labels,
    thumbnails,
)
from dissect_tui.store.compositions import stored_composition
from dissect_tui.text import printable
from dissect_tui.tui.base import HELP, QUIT, BrowseScreen
from dissect_tui.tui.charts import bar_chart, histogram
from dissect_tui.tui.compose import ComposeScreen, Composition
from dissect_tui.tui.images import Thumb
from dissect_tui.tui.neuron_table import INTERPRETABLE, NOT_INTERPRETABLE, PIN
from dissect_tui.tui.session import BrowseSession

N_TOP_IMAGES = 10


class DetailScreen(BrowseScreen):
    """One neuron of ``rows`` (row indices of the session's model), stepped through with n/p.

    Dismisses with the row it was left on when it steps through the main view (``follows_view``),
    so the main screen can put its cursor there; with None for a related neuron opened from here.
    """

    BINDINGS = [
        QUIT,
        HELP,
        Binding("escape,backspace", "back", "Back", tooltip="Back to the table"),
        Binding("n,right", "step(1)", "Next", key_display="n/→", tooltip="Next neuron of the view"),
        Binding("p,left", "step(-1)", "Prev", key_display="p/←", tooltip="Previous neuron of the view"),
        Binding("c", "compose", "A+B", tooltip="Two-concept explanation of this neuron"),
        Binding("m", "pin", "Pin", tooltip="Pin or unpin this neuron"),
        # The page scrolls, also while a list has focus (its own PgDn/End would move in ten rows).
        Binding("pagedown,space", "scroll_page(1)", "Page down", show=False, priority=True),
        Binding("pageup", "scroll_page(-1)", "Page up", show=False, priority=True),
        Binding("end", "scroll_edge(1)", "End of the page", show=False, priority=True),
        Binding("home", "scroll_edge(-1)", "Top of the page", show=False, priority=True),
    ]

    class Loaded(Message):
        def __init__(self, detail: NeuronDetail, thumbs, similar, correlated, n_used: int, stored) -> None:
            super().__init__()
            self.detail, self.thumbs, self.similar = detail, thumbs, similar
            self.correlated, self.n_used, self.stored = correlated, n_used, stored

    def __init__(
        self, session: BrowseSession, rows: np.ndarray, index: int, follows_view: bool = True
    ) -> None:
        super().__init__()
        assert session.model is not None
        self.session = session
        self.model = session.model
        self.follows_view = follows_view  # stepping through the main view, not a related neuron
        self.rows = rows
        self.index = index
        self.detail: NeuronDetail | None = None

    @property
    def row(self) -> int:
        return int(self.rows[self.index])

    @property
    def key(self) -> tuple[str, int]:
        return self.model.key(self.row)

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
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#d-body").focus()
        self.show_neuron()

    # -- loading ---------------------------------------------------------------------------
    def show_neuron(self) -> None:
        layer, unit = self.key
        t = self.model.table
        sim = float(t.similarity[self.row])
        good = sim > self.session.filters.cutoff
        pin = f" {PIN} pinned" if self.model.pinned[self.row] else ""
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
        session = self.session
        cur = session.cursor()
        try:
            detail = neuron_detail(cur, session.run_id, layer, unit, n_images=N_TOP_IMAGES)
            ids = [r[1] for r in detail.top_images] + [i for _, s in detail.samples for i, _, _ in s]
            thumbs = thumbnails(cur, ids)
            similar = similar_labels(cur, session.run_id, layer, unit)
            correlated, n_used = correlated_units(cur, layer, unit)
            from_cache = stored_composition(cur.con, session.run_id, layer, unit)
        finally:
            cur.close()
        stored = session.sidecar.composition(layer, unit) if session.sidecar is not None else None
        if from_cache is not None:
            # `dissect-tui compose` results, unless this browser computed one since
            made_here = session.sidecar.composition_time(layer, unit) if session.sidecar is not None else None
            if stored is None or made_here is None or from_cache[3].timestamp() > made_here:
                stored = from_cache[:3]
        self.post_message(self.Loaded(detail, thumbs, similar, correlated, n_used, stored))

    @on(Loaded)
    def _show(self, event: Loaded) -> None:
        d, thumbs = event.detail, event.thumbs
        if (d.layer, d.unit) != self.key:
            return  # the user already moved on
        self.detail = d
        image_cls = self.session.image_cls
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
        shown: set[int] = set()
        for band, items in d.samples:
            # Distinct images: with few probe images the bands overlap, and an image is shown once.
            fresh = [item for item in items if item[0] not in shown]
            shown.update(i for i, _, _ in fresh)
            samples.mount(Static(band if fresh or not items else f"{band}: the images above", classes="band"))
            if fresh:
                strip = Horizontal(classes="band-row")
                samples.mount(strip)
                strip.mount_all(
                    Thumb(thumbs.get(i), f"{act:.3f}\n{_tail(path, 14)}", image_cls) for i, act, path in fresh
                )
        sim_list = self.query_one("#similar", OptionList)
        sim_list.clear_options()
        sim_list.add_options(
            [
                Option(Text(f"{printable(lay)}:{u}  {printable(lab)}  ({s:.2f})"), id=f"{lay}\t{u}")
                for lay, u, lab, s in event.similar
            ]
        )
        if sim_list.option_count:  # a focused list shows where Enter goes, before any arrow key
            sim_list.highlighted = 0
        corr = self.query_one("#correlated", OptionList)
        corr.clear_options()
        opts = []
        for u, r in event.correlated:
            row = self.model.row_of(d.layer, u)
            label = self.model.table.label[row] if row is not None else "?"
            opts.append(
                Option(
                    Text(f"{printable(d.layer)}:{u}  {printable(label)}  (r={r:.2f})"), id=f"{d.layer}\t{u}"
                )
            )
        corr.add_options(opts or [Option(f"no correlation data ({event.n_used} images)", disabled=True)])
        if opts:
            corr.highlighted = 0
        self.show_composition(event.stored)

    def show_composition(self, stored: Composition | None) -> None:
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
        # Back in the table on the neuron n/p led to, not where Enter was.
        self.dismiss(self.row if self.follows_view else None)

    def action_scroll_page(self, direction: int) -> None:
        body = self.query_one("#d-body", VerticalScroll)
        if direction > 0:
            body.scroll_page_down(animate=False)
        else:
            body.scroll_page_up(animate=False)

    def action_scroll_edge(self, direction: int) -> None:
        body = self.query_one("#d-body", VerticalScroll)
        if direction > 0:
            body.scroll_end(animate=False)
        else:
            body.scroll_home(animate=False)

    def action_step(self, delta: int) -> None:
        new = self.index + delta
        if 0 <= new < len(self.rows):
            self.index = new
            self.show_neuron()
        else:
            self.notify("last neuron of the view" if delta > 0 else "first neuron of the view", timeout=2)

    def action_pin(self) -> None:
        self.save_pin(*self.session.toggle_pin(self.row))
        self.show_neuron()

    @work(thread=True, group="pins", exit_on_error=False)
    def save_pin(self, layer: str, unit: int, pinned: bool) -> None:
        self.session.save_pin(layer, unit, pinned)

    def action_compose(self) -> None:
        screen = ComposeScreen(self.session, self.key, self.model.table.label[self.row])
        self.app.push_screen(screen, self._composed)

    def _composed(self, result: Composition | None) -> None:
        if result:
            self.show_composition(result)

    @on(OptionList.OptionSelected)
    def _jump(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is None:
            return
        layer, unit = event.option.id.rsplit("\t", 1)
        row = self.model.row_of(layer, int(unit))
        if row is not None:
            self.app.push_screen(DetailScreen(self.session, np.array([row]), 0, follows_view=False))


def _tail(path: str, width: int) -> str:
    """The end of an image path for a caption (made printable: paths come from the cache)."""
    name = printable(path.rsplit("/", 1)[-1])
    return name if len(name) <= width else "…" + name[-(width - 1) :]
