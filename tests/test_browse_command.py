"""`dissect-tui browse`: the cache picker, --clip, and leaving at once after CLIP was loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cache_factory import make_cache

from dissect_tui.cli import main
from dissect_tui.commands import browse as browse_cmd
from dissect_tui.tui import app as app_module
from dissect_tui.tui.picker import CachePicker

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caches")
    make_cache(root / "alpha.duckdb")
    make_cache(root / "beta[b][@click=app.quit]\x1b]0;t\x07.duckdb", seed=1)
    return root


async def test_picker_lists_caches_as_text_and_returns_the_chosen_one(folder):
    caches = sorted(folder.glob("*.duckdb"))
    picker = CachePicker(caches, folder)
    async with picker.run_test(size=(80, 24)) as pilot:
        await pilot.press("down", "enter")
    assert picker.return_value == caches[1]
    picker = CachePicker(caches, folder)
    async with picker.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
    assert picker.return_value is None


def test_several_caches_without_a_terminal_is_one_line(folder, capsys):
    rc = main(["browse", "--cache-dir", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "name one" in err


def test_clip_option_reaches_the_app_and_a_loaded_clip_exits_at_once(folder, monkeypatch):
    seen = {}

    def fake_run(self):
        seen["clip"] = self.session.clip

        class Loaded:
            clip_loaded = True

        self.session._explainer = Loaded()  # as after a concept query

    def fake_exit(code):
        seen["exit"] = code
        raise SystemExit(code)

    monkeypatch.setattr(app_module.BrowserApp, "run", fake_run)
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        browse_cmd.run(browse_cmd_args(str(folder / "alpha.duckdb"), clip="ViT-B-32:/moved/clip.pt"))
    assert seen == {"clip": "ViT-B-32:/moved/clip.pt", "exit": 0}


def test_without_clip_loaded_the_command_returns_normally(folder, monkeypatch):
    monkeypatch.setattr(app_module.BrowserApp, "run", lambda self: None)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("fast exit without CLIP"))
    assert main(["browse", str(folder / "alpha.duckdb"), "--graphics", "none"]) == 0


def browse_cmd_args(cache: str, **kw):
    import argparse

    ns = argparse.Namespace(cache=cache, run=None, graphics="none", cache_dir="cache", clip=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_without_a_terminal_browse_is_one_line_not_a_hang(folder, tmp_path):
    """stdin from /dev/null (cron, a pipe, CI): Textual would draw into stderr and wait for keys
    forever; the command says what it needs instead."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "dissect_tui", "browse", str(folder / "alpha.duckdb"), "--graphics", "none"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: browse needs a terminal") and "dissect-tui sql" in line
    assert "\x1b" not in proc.stderr  # nothing was drawn


def test_a_terminal_on_stdin_and_stderr_is_enough(monkeypatch):
    import sys

    primary, secondary = os.openpty()
    tty = os.fdopen(secondary, "w")
    try:
        with open(os.devnull) as devnull:
            monkeypatch.setattr(sys, "stdin", tty)
            monkeypatch.setattr(sys, "__stderr__", tty)
            assert app_module.on_a_terminal()
            monkeypatch.setattr(sys, "stdin", devnull)
            assert not app_module.on_a_terminal()
            monkeypatch.setattr(sys, "stdin", tty)
            monkeypatch.setattr(sys, "__stderr__", devnull)
            assert not app_module.on_a_terminal()
            monkeypatch.setattr(sys, "__stderr__", None)  # pythonw-like: no stream at all
            assert not app_module.on_a_terminal()
    finally:
        tty.close()
        os.close(primary)
