"""The browser's module structure: no import cycle, no untyped app attributes, no UI calls from threads."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from textual.app import App

import dissect_tui

TUI = Path(dissect_tui.__file__).parent / "tui"
MODULES = sorted(p.stem for p in TUI.glob("*.py") if p.stem != "__init__")
# Every screen module is held to the same rules (sql.py included since both branches merged).
NOT_OURS: set[str] = set()


def _imports(name: str) -> set[str]:
    """The dissect_tui.tui modules ``name`` imports anywhere: top level, in functions, TYPE_CHECKING."""
    tree = ast.parse((TUI / f"{name}.py").read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for mod in mods:
            if mod.startswith("dissect_tui.tui.") and mod.split(".")[2] in MODULES:
                out.add(mod.split(".")[2])
    out.discard(name)
    return out


def test_every_tui_module_imports():
    for name in MODULES:
        importlib.import_module(f"dissect_tui.tui.{name}")


def test_tui_import_graph_has_no_cycle():
    graph = {name: _imports(name) for name in MODULES}
    assert graph["main"] and graph["app"]  # the walk sees imports at all
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " → ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_screens_use_no_untyped_app_attributes_and_no_call_from_thread():
    """Screens get the typed BrowseSession; workers post messages instead of calling into the UI."""
    textual_api = set(dir(App()))  # Textual's own API, instance attributes (console, …) included
    for name in sorted(set(MODULES) - NOT_OURS):
        tree = ast.parse((TUI / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "app"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
            ):
                assert node.attr in textual_api, f"{name}.py:{node.lineno}: self.app.{node.attr}"
            if isinstance(node, ast.Attribute) and node.attr == "call_from_thread":
                pytest.fail(f"{name}.py:{node.lineno}: call_from_thread")
