"""The `dissect-tui browse` application: owns the session and pushes the first screen.

Import graph (checked by a test, no cycles): app → main → detail → compose; every screen →
session, base, widgets. Screens never import the app: they get the session in their constructor
and answer with Textual messages or ``dismiss`` results, as harlequin's components do.

No torch here: the CLIP text tower is loaded by dissect_tui.explain, imported inside a worker
the first time a concept query or composition needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from dissect_tui.errors import UserError
from dissect_tui.store.reader import CacheReader
from dissect_tui.tui.base import ReportsWorkerErrors, is_text_entry
from dissect_tui.tui.compose import ComposeScreen
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.help import NAV, HelpScreen, HelpSection, binding_keys, binding_rows
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.neuron_table import NeuronTable
from dissect_tui.tui.session import BrowseSession
from dissect_tui.tui.sql import SqlScreen


def on_a_terminal() -> bool:
    """Keys from a terminal on stdin, and a terminal on stderr, where Textual draws."""
    streams = (sys.stdin, sys.__stderr__)
    return all(s is not None and hasattr(s, "isatty") and s.isatty() for s in streams)


class BrowserApp(ReportsWorkerErrors, App):
    """Browse one run of a cache. ``reader`` is an open read-only CacheReader."""

    CSS_PATH = "browse.tcss"
    TITLE = "dissect-tui"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Help: every key"),
        Binding("colon", "sql", "SQL", key_display=":", tooltip="SQL over the cache (read-only)"),
        Binding(
            "ctrl+p",
            "command_palette",
            "Commands",
            show=False,
            priority=True,
            tooltip="Command palette: every action by name",
        ),
    ]

    def __init__(
        self,
        reader: CacheReader,
        run_id: int | None = None,
        graphics: str = "none",
        image_cls: Any = None,
        sidecar_file: Path | None = None,
        clip: str | None = None,
        color_system: str | None = None,
    ) -> None:
        """``clip``: a CLIP spec to use instead of the run's (its weights moved, e.g. from a GPU box
        to a laptop). ``color_system``: the terminal's, as Rich names it ("standard" for 16 colours,
        "256", "truecolor"); None detects it. On 16 colours the app uses Textual's ANSI theme, so
        states stay readable in the terminal's own palette."""
        super().__init__()
        self.graphics = graphics
        self.session = BrowseSession(
            reader, requested_run=run_id, image_cls=image_cls, sidecar_file=sidecar_file, clip=clip
        )
        colors = color_system if color_system is not None else self.console.color_system
        if colors in ("standard", "windows"):
            self.theme = "ansi-dark"

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The app on this terminal. Without one (stdin from a file or /dev/null, the screen
        redirected) Textual would draw escape codes into the file and wait for keys forever."""
        if not kwargs.get("headless") and not on_a_terminal():
            raise UserError(
                "browse needs a terminal: its keys come from stdin and its screen goes to stderr, "
                "and one of them is not a terminal; in scripts use `dissect-tui sql` or `dissect-tui export`"
            )
        return super().run(*args, **kwargs)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("quit", "help", "sql") and is_text_entry(self.focused):
            return False  # q ? : are typed into the box, not run
        return True

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.session))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette (Ctrl+P): every action the current screen offers, by name and key."""
        seen: set[str] = set()
        for active in screen.active_bindings.values():
            binding = active.binding
            if not active.enabled or not binding.description or binding.action.endswith("command_palette"):
                continue
            title = binding.tooltip or binding.description
            if title in seen:
                continue
            seen.add(title)
            action = partial(self.run_action, binding.action, active.node)
            yield SystemCommand(title, f"key {binding_keys(binding)}", action)

    # -- global actions ----------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(help_sections()))

    def action_sql(self) -> None:
        if not isinstance(self.screen, SqlScreen):
            self.push_screen(SqlScreen(self.session))


def help_sections() -> list[HelpSection]:
    """Every key of every screen, from the screens' own bindings."""
    everywhere = binding_rows(BrowserApp.BINDINGS)
    keys = [k for k, _ in everywhere]
    table = [b for b in NeuronTable.BINDINGS if isinstance(b, Binding) and b.show]  # Open; moves are in NAV
    return [
        ("Everywhere", everywhere),
        ("Navigation", NAV),
        ("Main screen", binding_rows([*table, *MainScreen.BINDINGS], global_keys=keys)),
        ("Neuron detail", binding_rows(DetailScreen.BINDINGS, global_keys=keys)),
        ("Two-concept explanation", binding_rows(ComposeScreen.BINDINGS, global_keys=keys)),
        ("SQL screen", binding_rows(SqlScreen.BINDINGS, global_keys=keys)),
    ]
