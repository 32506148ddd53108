"""A virtual neuron table: renders only the visible lines, so 100k rows cost nothing to show.

Textual's DataTable builds every row up front; re-filtering 100k neurons per keystroke would
take seconds. This widget holds the row indices of the current view and formats a row only
when its line is drawn.
"""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from dissect_tui.methods import DEFAULT_CUTOFF
from dissect_tui.text import printable
from dissect_tui.tui.model import NeuronModel

INTERPRETABLE = "✓"
NOT_INTERPRETABLE = "·"
PIN = "◆"
ASCENDING_KEYS = ("layer", "unit", "label")  # the rest (score, query) sort best first


def sort_arrow(sort: str, reverse: bool) -> str:
    """One convention for every column: ▲ smallest first (ascending), ▼ largest first (descending)."""
    ascending = (sort in ASCENDING_KEYS) != reverse
    return "▲" if ascending else "▼"


class NeuronTable(ScrollView, can_focus=True):
    """Columns: pin, layer, unit, label, score, interpretable mark (+ query scores when ranked)."""

    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup,ctrl+b", "page(-1)", "Page up", show=False),
        Binding("pagedown,ctrl+f", "page(1)", "Page down", show=False),
        Binding("home,g", "jump(0)", "First", show=False),
        Binding("end,G", "jump(-1)", "Last", show=False),
        Binding("enter", "select", "Open", show=True),
    ]
    COMPONENT_CLASSES = {"neuron-table--header", "neuron-table--cursor", "neuron-table--good"}
    DEFAULT_CSS = """
    NeuronTable { height: 1fr; overflow-x: hidden; }
    NeuronTable > .neuron-table--header { text-style: bold; background: $panel; }
    NeuronTable > .neuron-table--cursor { background: $block-cursor-blurred-background; }
    NeuronTable:focus > .neuron-table--cursor {
        background: $block-cursor-background; color: $block-cursor-foreground; text-style: $block-cursor-text-style;
    }
    NeuronTable > .neuron-table--good { color: $success; }
    """

    class Selected(Message):
        def __init__(self, row: int) -> None:
            super().__init__()
            self.row = row

    class Highlighted(Message):
        def __init__(self, row: int | None) -> None:
            super().__init__()
            self.row = row

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model: NeuronModel | None = None
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)
        self.cursor = 0
        self.cutoff = DEFAULT_CUTOFF
        self.sort = "layer"
        self.reverse = False

    # -- data ------------------------------------------------------------------------
    def set_view(
        self,
        model: NeuronModel,
        rows: np.ndarray,
        cutoff: float,
        sort: str,
        reverse: bool,
        *,
        top: bool = False,
    ) -> None:
        """Show ``rows``. ``top``: put the cursor on the first row (a fresh ranking opens at its best);
        otherwise it stays on the same neuron, or the nearest one still shown (in the old view's order)."""
        old_rows, old_cursor = self.rows, self.cursor
        keep = self.current_row()
        self.model, self.rows, self.cutoff, self.sort, self.reverse = model, rows, cutoff, sort, reverse
        self.cursor = 0
        if not top and keep is not None and len(rows):
            hit = np.flatnonzero(rows == keep)
            if len(hit):
                self.cursor = int(hit[0])
            else:
                self.cursor = _nearest_kept(old_rows, old_cursor, rows)
        self.virtual_size = Size(0, len(rows) + 1)
        self._scroll_cursor_visible()
        self.refresh()
        self.post_message(self.Highlighted(self.current_row()))

    def current_row(self) -> int | None:
        return int(self.rows[self.cursor]) if 0 <= self.cursor < len(self.rows) else None

    def move_to_row(self, row: int) -> bool:
        hit = np.flatnonzero(self.rows == row)
        if not len(hit):
            return False
        self.cursor = int(hit[0])
        self._scroll_cursor_visible()
        self.refresh()
        self.post_message(self.Highlighted(self.current_row()))
        return True

    # -- actions ---------------------------------------------------------------------
    def action_cursor(self, delta: int) -> None:
        self._set_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._set_cursor(self.cursor + direction * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        self._set_cursor(0 if where == 0 else len(self.rows) - 1)

    def action_select(self) -> None:
        row = self.current_row()
        if row is not None:
            self.post_message(self.Selected(row))

    def _set_cursor(self, index: int) -> None:
        if not len(self.rows):
            return
        index = max(0, min(index, len(self.rows) - 1))
        if index != self.cursor:
            self.cursor = index
            self._scroll_cursor_visible()
            self.refresh()
            self.post_message(self.Highlighted(self.current_row()))

    def _scroll_cursor_visible(self) -> None:
        # Line 0 is the header, so row i lives on virtual line i + 1.
        self.scroll_to_region(Region(0, self.cursor, 1, 2), animate=False, immediate=True, force=True)

    def on_resize(self) -> None:
        # A smaller window must not leave the cursor row below the bottom edge.
        self.call_after_refresh(self._scroll_cursor_visible)

    def on_click(self, event) -> None:  # mouse works, but is never required
        index = int(self.scroll_offset.y) + event.y - 1
        if 0 <= index < len(self.rows):
            if index == self.cursor:
                self.action_select()
            self._set_cursor(index)

    # -- rendering -------------------------------------------------------------------
    def query_columns(self, width: int) -> int:
        """How many query score columns fit (the composed one first, then A and B alone)."""
        if not (self.model and self.model.query):
            return 0
        layers = self.model.table.layers
        lw = min(max((len(s) for s in layers), default=5), 16, max(5, width // 5))
        n = 1 + len(self.model.query.extra)
        # At 80 columns A and B alone do not fit beside a readable label: the preview line shows them.
        while n > 1 and width - (2 + lw + 1 + 5 + 1 + 1 + 8 + 2 + 8 * n) < 8:
            n -= 1
        return n

    def _widths(self, width: int) -> tuple[int, int, int, int]:
        layers = self.model.table.layers if self.model else []
        lw = min(max((len(s) for s in layers), default=5), 16, max(5, width // 5))
        qw = 8 * self.query_columns(width)
        fixed = 2 + lw + 1 + 5 + 1 + 1 + 8 + 2 + qw
        return lw, 5, max(8, width - fixed), qw

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            return self._strip(self._header(width), width, "neuron-table--header")
        index = int(self.scroll_offset.y) + y - 1
        if self.model is not None and not len(self.rows) and y == 2:
            return self._strip(
                Text("  no neuron matches the filters (x clears them)", style="dim"), width, None
            )
        if self.model is None or index >= len(self.rows):
            return Strip.blank(width, self.rich_style)
        text = self._row_text(int(self.rows[index]), width)
        style = "neuron-table--cursor" if index == self.cursor else None
        return self._strip(text, width, style)

    def _strip(self, text: Text, width: int, component: str | None) -> Strip:
        base = self.rich_style
        if component:
            base = base + self.get_component_rich_style(component)
        text.stylize(base, 0)
        text.truncate(width, pad=True)
        segments = list(text.render(self.app.console))
        return Strip(segments, width).simplify()

    def _header(self, width: int) -> Text:
        lw, uw, labw, qw = self._widths(width)
        arrow = sort_arrow(self.sort, self.reverse)

        def h(name: str, key: str) -> str:
            return name + (arrow if self.sort == key else "")

        parts = f"  {h('layer', 'layer'):<{lw}} {h('unit', 'unit'):>{uw}} {h('label', 'label'):<{labw}} {h('score', 'score'):>8} {INTERPRETABLE}"
        if qw and self.model and self.model.query:
            q = self.model.query
            qt = printable(q.title)
            title = qt[:6] + arrow if self.sort == "query" else qt[:7]  # 7 cells, arrow included
            extra = list(q.extra)[: qw // 8 - 1]
            parts += f" {title:>7}" + "".join(f" {printable(k)[:7]:>7}" for k in extra)
        return Text(parts)

    def _row_text(self, row: int, width: int) -> Text:
        assert self.model is not None
        t = self.model.table
        lw, uw, labw, qw = self._widths(width)
        layer = printable(t.layers[int(t.layer_idx[row])])
        label = printable(t.label[row])
        if len(label) > labw:
            label = label[: labw - 1] + "…"
        if len(layer) > lw:
            layer = layer[: lw - 1] + "…"
        sim = float(t.similarity[row])
        good = sim > self.cutoff
        pin = PIN if self.model.pinned[row] else " "
        text = Text(f"{pin} {layer:<{lw}} {int(t.unit[row]):>{uw}} {label:<{labw}} {sim:>8.4f} ")
        text.append(INTERPRETABLE if good else NOT_INTERPRETABLE, style="bold green" if good else "dim")
        q = self.model.query
        if qw and q is not None:
            text.append(f" {float(q.scores[row]):>7.3f}")
            for col in list(q.extra.values())[: qw // 8 - 1]:
                text.append(f" {float(col[row]):>7.3f}", style="dim")
        return text


def _nearest_kept(old_rows: np.ndarray, old_cursor: int, rows: np.ndarray) -> int:
    """Index in ``rows`` of the row nearest to ``old_rows[old_cursor]`` in the old order that ``rows``
    still holds (the following one on a tie), or 0 when none is."""
    kept = np.flatnonzero(np.isin(old_rows, rows))
    if not len(kept):
        return 0
    after = kept[kept > old_cursor]
    before = kept[kept < old_cursor]
    if len(after) and (not len(before) or after[0] - old_cursor <= old_cursor - before[-1]):
        j = int(after[0])
    else:
        j = int(before[-1])
    return int(np.flatnonzero(rows == old_rows[j])[0])
