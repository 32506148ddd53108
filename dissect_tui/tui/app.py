"""The `dissect-tui browse` application: state shared by the screens, and the cursors they query with.

No torch here: the CLIP text tower is loaded by dissect_tui.explain, imported inside a worker
the first time a concept query or composition needs it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import Input, TextArea

from dissect_tui.store.reader import CacheReader
from dissect_tui.store.sidecar import Sidecar, run_key, sidecar_path
from dissect_tui.text import printable


def is_text_entry(widget: Widget | None) -> bool:
    """True while keys go to a text box: single-key bindings then type, so the footer hides them."""
    return isinstance(widget, Input | TextArea)


class BrowserApp(App):
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
        self.reader = reader
        self.requested_run = run_id
        self.graphics = graphics
        self.image_cls = image_cls
        self._sidecar_file = sidecar_file
        self.sidecar: Sidecar | None = None
        self.run_info: dict[str, Any] = {}
        self._explainer: Any = None
        self._explainer_lock = threading.Lock()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("quit", "help", "sql") and is_text_entry(self.focused):
            return False  # q ? : are typed into the box, not run
        return True

    def on_mount(self) -> None:
        from dissect_tui.tui.main import MainScreen

        self.push_screen(MainScreen())

    # -- shared services -------------------------------------------------------------
    def cursor(self) -> CacheReader:
        """A reader on its own DuckDB cursor, for one worker thread (close it when done)."""
        return CacheReader(self.reader.con.cursor(), self.reader.path)

    def open_sidecar(self, run: dict[str, Any]) -> Sidecar | None:
        """The writable sidecar for this run, or None when no writable place exists."""
        if self.reader.path is None:
            return None
        try:
            path = self._sidecar_file or sidecar_path(self.reader.path)
            self.sidecar = Sidecar(path, run_key(run))
        except Exception as exc:  # saving is a convenience: browsing must go on without it
            self.call_from_thread(
                self.notify, f"results will not be saved: {printable(exc)}", severity="warning", markup=False
            )
            self.sidecar = None
        return self.sidecar

    def explainer(self) -> Any:
        """The CLIP-backed explainer (loads torch and the text tower); call from a worker thread."""
        with self._explainer_lock:
            if self._explainer is None:
                from dissect_tui.explain import Explainer

                self._explainer = Explainer(self.cursor, self.run_info)
            return self._explainer

    # -- global actions ----------------------------------------------------------------
    def action_help(self) -> None:
        from dissect_tui.tui.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_sql(self) -> None:
        from dissect_tui.tui.sql import SqlScreen

        if not isinstance(self.screen, SqlScreen):
            self.push_screen(SqlScreen())
