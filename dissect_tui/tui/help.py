"""Help screen: every key of every screen, from sections the app builds out of the screens' bindings.

This module imports no other screen: the app passes the sections in (no import cycle).
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Footer, Static

from dissect_tui.tui.base import BrowseModal

HelpSection = tuple[str, list[tuple[str, str]]]

# Navigation of the neuron table, once (the table's own bindings are not listed again).
NAV = [
    ("↑/↓  j/k", "move in the neuron table"),
    ("PgUp/PgDn  Ctrl+B/F", "page up, page down"),
    ("Home/End  g/G", "first, last"),
    ("Tab / Shift+Tab", "move focus: layers, table, filter box"),
    ("Space / Enter (layers)", "select or clear a layer (several allowed; none = all)"),
]


# Textual's key names as a user reads them on the keyboard.
KEY_NAMES = {
    "slash": "/", "plus": "+", "equals_sign": "=", "minus": "-", "question_mark": "?", "colon": ":",
    "escape": "Esc", "enter": "Enter", "backspace": "Backspace", "space": "Space", "up": "↑", "down": "↓",
    "left": "←", "right": "→", "pageup": "PgUp", "pagedown": "PgDn", "home": "Home", "end": "End",
}  # fmt: skip


def key_name(key: str) -> str:
    key = key.strip()
    if key.startswith("ctrl+"):
        return "Ctrl+" + KEY_NAMES.get(key[5:], key[5:].upper())
    return KEY_NAMES.get(key, key)


def binding_keys(b: Binding) -> str:
    """The keys of a binding as a user types them."""
    return b.key_display or " / ".join(key_name(k) for k in b.key.split(","))


def binding_rows(bindings: Iterable[BindingType], global_keys: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(keys as typed, what they do: the tooltip, else the footer's short name) for every described
    binding; a screen's copy of an app-wide key (``app.`` action on one of ``global_keys``) is left
    out, as the "Everywhere" section lists it."""
    skip = set(global_keys)
    out = []
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        keys = binding_keys(b)
        if b.action.startswith("app.") and keys in skip:
            continue
        out.append((keys, b.tooltip or b.description))
    return out


def help_table(sections: list[HelpSection]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0), expand=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for title, rows in sections:
        table.add_row(Text(title, style="bold underline"), "")
        for key, what in rows:
            table.add_row(Text(key), Text(what))
        table.add_row("", "")
    return table


class HelpScreen(BrowseModal):
    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close", key_display="Esc")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90; max-width: 100%; height: 90%; border: round $accent; background: $surface; padding: 0 1; }
    """

    def __init__(self, sections: list[HelpSection]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(
                Text.assemble(
                    ("dissect-tui browse — keys", "bold"),
                    "  (scores: SoftWPMI; a neuron is interpretable when its score > τ; ✓ marks it)\n",
                )
            )
            yield Static(help_table(self.sections))
        yield Footer(compact=True)
