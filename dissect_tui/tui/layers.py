"""The layer list of the main screen: several layers can be selected, none means all.

An OptionList with the selection drawn as a glyph (● selected, ○ not) rather than a coloured
checkbox: Textual's SelectionList box shows an X in every row on a 16-colour terminal, so every
layer looked selected, and a near-invisible dark X on 256 colours.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from dissect_tui.text import printable

SELECTED = "●"
NOT_SELECTED = "○"
NAME_WIDTH = 9


class LayerList(OptionList):
    """Rows of (layer, neurons, interpretable); Space, Enter or a click toggles the highlighted one."""

    BINDINGS = [Binding("space", "toggle_layer", "Select layer", show=False)]

    class Changed(Message):
        """The selection changed (indices into the layer rows; empty: all layers)."""

        def __init__(self, selected: frozenset[int]) -> None:
            super().__init__()
            self.selected = selected

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[tuple[str, int, int]] = []
        self.selected: frozenset[int] = frozenset()

    @staticmethod
    def prompt(name: str, n: int, good: int, chosen: bool) -> Text:
        pct = 100.0 * good / n if n else 0.0
        shown = printable(name)
        if len(shown) > NAME_WIDTH:
            shown = shown[: NAME_WIDTH - 1] + "…"
        line = f"{SELECTED if chosen else NOT_SELECTED} {shown:<{NAME_WIDTH}} {n:>5} {pct:>3.0f}%"
        return Text(line, style="bold" if chosen else "")

    def set_rows(self, rows: list[tuple[str, int, int]]) -> None:
        """Show new counts (a new τ), keeping the selection and the highlight."""
        highlighted = self.highlighted
        self.rows = rows
        self.selected = frozenset(i for i in self.selected if i < len(rows))
        self.clear_options()
        self.add_options([Option(self.prompt(*row, i in self.selected)) for i, row in enumerate(rows)])
        if rows:
            self.highlighted = min(highlighted or 0, len(rows) - 1)

    def set_selected(self, selected: frozenset[int]) -> None:
        if selected == self.selected:
            return
        self.selected = selected
        for i, row in enumerate(self.rows):
            self.replace_option_prompt_at_index(i, self.prompt(*row, i in selected))
        self.post_message(self.Changed(selected))

    def action_toggle_layer(self) -> None:
        i = self.highlighted
        if i is not None and 0 <= i < len(self.rows):
            self.set_selected(self.selected ^ {i})

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()  # Enter or a click: the same toggle
        self.highlighted = event.option_index
        self.action_toggle_layer()
