"""The `dissect-tui browse` application: owns the session and pushes the first screen.

Import graph (checked by a test, no cycles): app → main → detail → compose; every screen →
session, base, widgets. Screens never import the app: they get the session in their constructor
and answer with Textual messages or ``dismiss`` results, as harlequin's components do.

No torch here: the CLIP text tower is loaded by dissect_tui.explain, imported inside a worker
the first time a concept query or composition needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding

from dissect_tui.store.reader import CacheReader
from dissect_tui.tui.base import ReportsWorkerErrors, is_text_entry
from dissect_tui.tui.compose import ComposeScreen
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.help import NAV, HelpScreen, HelpSection, binding_rows
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.neuron_table import NeuronTable
from dissect_tui.tui.session import BrowseSession
from dissect_tui.tui.sql import SqlScreen


class BrowserApp(ReportsWorkerErrors, App):
    """Browse one run of a cache. ``reader`` is an open read-only CacheReader."""

    CSS_PATH = "browse.tcss"
    TITLE = "dissect-tui"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("colon", "sql", "SQL", key_display=":"),
    ]

    def __init__(
        self,
        reader: CacheReader,
        run_id: int | None = None,
        graphics: str = "none",
        image_cls: Any = None,
        sidecar_file: Path | None = None,
    ) -> None:
        super().__init__()
        self.graphics = graphics
        self.session = BrowseSession(
            reader, requested_run=run_id, image_cls=image_cls, sidecar_file=sidecar_file
        )

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("quit", "help", "sql") and is_text_entry(self.focused):
            return False  # q ? : are typed into the box, not run
        return True

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.session))

    def cursor(self) -> CacheReader:
        """A reader on its own DuckDB cursor (the SQL screen's way to the cache)."""
        return self.session.cursor()

    # -- global actions ----------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(help_sections()))

    def action_sql(self) -> None:
        if not isinstance(self.screen, SqlScreen):
            self.push_screen(SqlScreen())


def help_sections() -> list[HelpSection]:
    """Every key of every screen, from the screens' own bindings."""
    return [
        ("Everywhere", binding_rows(BrowserApp.BINDINGS)),
        ("Navigation", NAV),
        ("Main screen", binding_rows(MainScreen.BINDINGS) + binding_rows(NeuronTable.BINDINGS)),
        ("Neuron detail", binding_rows(DetailScreen.BINDINGS)),
        ("Two-concept explanation", binding_rows(ComposeScreen.BINDINGS)),
        ("SQL screen", binding_rows(SqlScreen.BINDINGS)),
    ]
