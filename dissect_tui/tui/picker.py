"""`dissect-tui browse` without a cache named: a list of the caches in cache/ to choose from.

A small app of its own, run before the browser: arrows and Enter choose, q or Esc leave. File
names are shown as plain text (a cache folder is shared; a name may hold anything).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from dissect_tui.text import printable


def _describe(path: Path) -> Text:
    try:
        st = path.stat()
        size = f"{st.st_size / 2**20:,.1f} MB"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
    except OSError:
        size, when = "?", "?"
    line = Text(printable(path.name), style="bold")
    line.append(f"  {size} · {when}", style="dim")
    return line


class CachePicker(App[Path | None]):
    """Returns the chosen cache's path, or None when the user leaves."""

    TITLE = "dissect-tui: choose a cache"
    BINDINGS = [Binding("q,escape", "leave", "Quit"), Binding("enter", "choose", "Open", show=True)]

    def __init__(self, caches: list[Path], folder: Path) -> None:
        super().__init__()
        self.caches = caches
        self.folder = folder

    def compose(self) -> ComposeResult:
        yield Static(Text(f"caches in {printable(self.folder)}/ (newest first) — Enter opens, q quits"))
        yield OptionList(*(Option(_describe(p), id=str(i)) for i, p in enumerate(self.caches)), id="caches")
        yield Footer()

    def on_mount(self) -> None:
        options = self.query_one("#caches", OptionList)
        options.highlighted = 0
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.exit(self.caches[int(event.option.id or 0)])

    def action_choose(self) -> None:
        options = self.query_one("#caches", OptionList)
        if options.highlighted is not None:
            self.exit(self.caches[options.highlighted])

    def action_leave(self) -> None:
        self.exit(None)
