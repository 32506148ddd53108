"""What every browser screen shares: worker failures reported in one place, text-entry detection.

Every worker runs with ``exit_on_error=False``; Textual then posts ``Worker.StateChanged`` to the
screen that started it (the message does not bubble), and every screen inherits the one handler
below: a one-line error, never a traceback.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from rich.text import Text
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Input, TextArea
from textual.worker import Worker, WorkerState

from dissect_tui.errors import UserError
from dissect_tui.text import printable

if TYPE_CHECKING:
    from textual.app import App

# A worker of this group loads the run: without it there is nothing to browse, so its failure ends
# the app with `error: …` and exit status 2, as a bad cache does before the app starts.
FATAL_GROUPS = frozenset({"load"})


def error_line(exc: BaseException | None) -> str:
    """``error: …`` on one line, safe to show: the first line of the message, control characters made visible."""
    if exc is None:
        return "error: unknown failure"
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if not isinstance(exc, UserError):  # an unexpected failure: its kind helps a bug report
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return "error: " + printable(message)


ERROR_TOAST_S = 10
# The line of the error toast on screen now, per app: the same failure again (every pin on a full
# disk) is not stacked a second time over the table while the first is still up.
_shown_errors: WeakKeyDictionary[App, tuple[str, float]] = WeakKeyDictionary()


def report_worker_error(app: App, worker: Worker) -> None:
    """Show a failed worker's error as one line; a failed load ends the app (exit 2)."""
    line = error_line(worker.error)
    if worker.group in FATAL_GROUPS:
        app.exit(return_code=2, message=Text(line))
        return
    shown = _shown_errors.get(app)
    now = time.monotonic()
    if shown is not None and shown[0] == line and now - shown[1] < ERROR_TOAST_S:
        return
    _shown_errors[app] = (line, now)
    app.notify(line, severity="error", timeout=ERROR_TOAST_S, markup=False)


# The app's q and ?, repeated first in each screen's bindings so the footer shows them first
# (Textual lists the focused widget's and the screen's bindings before the app's).
QUIT = Binding("q", "app.quit", "Quit")
HELP = Binding("question_mark", "app.help", "Help", key_display="?", tooltip="Help: every key")


def is_text_entry(widget: Widget | None) -> bool:
    """True while keys go to a text box: single-key bindings then type, so the footer hides them."""
    return isinstance(widget, Input | TextArea)


class ReportsWorkerErrors:
    """Mixin for the browser's screens: their workers' failures are reported, the app stays usable."""

    app: App

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            report_worker_error(self.app, event.worker)


class BrowseScreen(ReportsWorkerErrors, Screen):
    """A full browser screen."""


class BrowseModal(ReportsWorkerErrors, ModalScreen):
    """A browser screen over another one (dialogs, the composition, help)."""
