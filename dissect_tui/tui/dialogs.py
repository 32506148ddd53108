"""Small modal dialogs: exact cutoff, export path, two-concept search."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from dissect_tui.text import has_control


class _Dialog(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    DEFAULT_CSS = """
    _Dialog { align: center middle; }
    _Dialog > Vertical { width: 64; max-width: 100%; height: auto; border: round $accent; padding: 0 1; background: $surface; }
    _Dialog .hint { color: $text-muted; }
    _Dialog .error { color: $error; }
    """

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class CutoffDialog(_Dialog):
    def __init__(self, current: float, hint: str) -> None:
        super().__init__()
        self.current = current
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Interpretability cutoff τ[/b] (a neuron is interpretable when score > τ)")
            yield Static(self.hint, classes="hint")
            yield Input(value=f"{self.current:g}", id="value")
            yield Static("", classes="error", id="error")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        try:
            value = float(event.value.strip())
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
        except ValueError:
            self.query_one("#error", Static).update("enter a number, e.g. 0.16")
            return
        self.dismiss(value)


class ExportDialog(_Dialog):
    def __init__(self, default: str, n: int) -> None:
        super().__init__()
        self.default = default
        self.n = n
        self._confirmed: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]Export {self.n:,} neuron{'s' if self.n != 1 else ''}[/b]")
            yield Static("file name: .csv or .parquet (format from the suffix)", classes="hint")
            yield Input(value=self.default, id="path")
            yield Static("", classes="error", id="error")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if not path:
            self.query_one("#error", Static).update("enter a file name")
            return
        error = self.query_one("#error", Static)
        if has_control(path):  # a pasted ESC or NUL: no file name needs one, and NUL cannot be one
            error.update("the file name has control characters: type it again")
            return
        target = Path(path).expanduser()
        if target.suffix.lower() not in (".csv", ".parquet"):
            error.update("the file name must end in .csv or .parquet")
            return
        if target.is_dir():
            error.update(Text(f"{path} is a folder: add a file name"))
            return
        if not target.parent.is_dir():
            error.update(Text(f"folder {target.parent} does not exist"))
            return
        if target.exists() and path != self._confirmed:
            self._confirmed = path  # a second Enter on the same name overwrites
            error.update(Text(f"{target.name} exists: Enter again to overwrite, or change the name"))
            return
        self.dismiss((path, target.exists()))


class TwoConceptDialog(_Dialog):
    """Rank all neurons by the composed concept "A B" (with A and B alone beside it)."""

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Two-concept search[/b]: neurons ranked by “A B”, with A and B alone")
            yield Input(placeholder="first concept (A), e.g. red", id="a")
            yield Input(placeholder="second concept (B), e.g. car", id="b")
            yield Static("Tab moves, Enter searches, Esc cancels", classes="hint")
            yield Static("", classes="error", id="error")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        a = self.query_one("#a", Input).value.strip()
        b = self.query_one("#b", Input).value.strip()
        if event.input.id == "a" and not b:
            self.query_one("#b", Input).focus()
            return
        if not a or not b:
            self.query_one("#error", Static).update("enter both concepts")
            return
        self.dismiss((a, b))
