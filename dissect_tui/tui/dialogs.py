"""Small modal dialogs: exact cutoff, export path, two-concept search."""

from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from dissect_tui.text import has_control, printable


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


def absolute(path: str) -> str:
    """``path`` with ~ expanded, made absolute (symbolic links are kept, not resolved)."""
    return os.path.abspath(os.path.expanduser(path))


class CutoffDialog(_Dialog):
    def __init__(self, current: float, hint: str) -> None:
        super().__init__()
        self.current = current
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                Text.assemble(
                    ("Interpretability cutoff τ", "bold"), " (a neuron is interpretable when score > τ)"
                )
            )
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
            yield Static(Text(f"Export {self.n:,} neuron{'s' if self.n != 1 else ''}", style="bold"))
            yield Static("file name: .csv or .parquet (format from the suffix)", classes="hint")
            yield Input(value=self.default, id="path")
            yield Static(self._where(self.default), classes="hint", id="where")
            yield Static("", classes="error", id="error")

    @staticmethod
    def _where(path: str) -> Text:
        """The absolute file the name stands for: a relative name is relative to where browse started."""
        path = path.strip()
        if not path or has_control(path):
            return Text("")
        return Text("→ " + printable(absolute(path)))

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        self.query_one("#where", Static).update(self._where(event.value))

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
        self.dismiss((absolute(path), target.exists()))


class TwoConceptDialog(_Dialog):
    """Rank all neurons by the composed concept "A B" (with A and B alone beside it).

    Starts with the last A and B; Ctrl+T swaps them ("car red" after "red car")."""

    BINDINGS = [Binding("ctrl+t", "swap", "Swap A and B")]

    def __init__(self, a: str = "", b: str = "") -> None:
        super().__init__()
        self.a, self.b = a, b

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                Text.assemble(("Two-concept search", "bold"), ": neurons ranked by “A B”, with A and B alone")
            )
            yield Input(value=self.a, placeholder="first concept (A), e.g. red", id="a")
            yield Input(value=self.b, placeholder="second concept (B), e.g. car", id="b")
            yield Static("Tab moves, Ctrl+T swaps A and B, Enter searches, Esc cancels", classes="hint")
            yield Static("", classes="error", id="error")

    def action_swap(self) -> None:
        a, b = self.query_one("#a", Input), self.query_one("#b", Input)
        a.value, b.value = b.value, a.value

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
