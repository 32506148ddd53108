"""Help screen: every key of every screen, generated from the screens' bindings."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

NAV = [
    ("↑/↓  j/k", "move in the neuron table"),
    ("PgUp/PgDn  g/G", "page, first, last"),
    ("Tab / Shift+Tab", "move focus: layers, table, filter box"),
    ("Space (layers)", "select or clear a layer (several allowed; none = all)"),
    ("Esc", "leave a box or dialog, go back"),
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


def _rows(bindings) -> list[tuple[str, str]]:
    out = []
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        keys = b.key_display or " / ".join(key_name(k) for k in b.key.split(","))
        out.append((keys, b.description))
    return out


def help_table() -> Table:
    from dissect_tui.tui.app import BrowserApp
    from dissect_tui.tui.compose import ComposeScreen
    from dissect_tui.tui.detail import DetailScreen
    from dissect_tui.tui.main import MainScreen
    from dissect_tui.tui.neuron_table import NeuronTable
    from dissect_tui.tui.sql import SqlScreen

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0), expand=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    sections = [
        ("Everywhere", _rows(BrowserApp.BINDINGS)),
        ("Navigation", NAV),
        ("Main screen", _rows(MainScreen.BINDINGS) + _rows(NeuronTable.BINDINGS)),
        ("Neuron detail", _rows(DetailScreen.BINDINGS)),
        ("Two-concept explanation", _rows(ComposeScreen.BINDINGS)),
        ("SQL screen", _rows(SqlScreen.BINDINGS)),
    ]
    for title, rows in sections:
        table.add_row(f"[b u]{title}[/]", "")
        for key, what in rows:
            table.add_row(key, what)
        table.add_row("", "")
    return table


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close", key_display="Esc")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90; max-width: 100%; height: 90%; border: round $accent; background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(
                "[b]dissect-tui browse — keys[/b]  (scores: SoftWPMI; a neuron is interpretable "
                "when its score > τ; ✓ marks it)\n"
            )
            yield Static(help_table())
        yield Footer()
