"""Shared by the robustness tests (store safety, signals, damaged caches): a tiny real index,
child processes that stop inside a command, and the one-line checks.

Import as ``from safety_helpers import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@dataclass
class Tiny:
    """A tiny CNN factory file and a tiny CLIP on disk: `index` runs in about a second."""

    factory: str
    clip: str

    def index_argv(self, db: Path, *extra: str) -> list[str]:
        return [
            "index",
            self.factory,
            "--clip",
            self.clip,
            "--probe",
            "synthetic:8",
            "--concepts",
            "cifar100",
            "--db",
            str(db),
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]


def make_tiny(root: Path) -> Tiny:
    from tiny_clip import make_tiny_clip
    from tiny_models import write_tiny_cnn_factory

    return Tiny(write_tiny_cnn_factory(root), make_tiny_clip(root).spec)


@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """Import into a test module (with its name) to get `tiny`: the tiny model and CLIP files."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", name="built")
def built_fixture(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real index, copied by the tests that need a cache made by `index`."""
    from dissect_tui.cli import main

    db = tmp_path_factory.mktemp("built") / "tiny.duckdb"
    assert main(tiny.index_argv(db)) == 0
    return db


def one_error_line(err: str, rc: int, code: int = 2) -> str:
    """stderr is exactly one line starting with error: (or the interruption line), no traceback."""
    assert rc == code, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, repr(err)
    if code == 2:
        assert err.startswith("error: "), repr(err)
    return err


def dot_files(folder: Path) -> list[str]:
    """Hidden files: temporary copies, WALs, lock files — litter after any command."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def run_tables(db: Path) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT run_id, kind, created_at FROM runs ORDER BY run_id").fetchall()


# A child process that runs `dissect-tui ARGS` and, at a chosen point, announces itself on
# stdout and waits for a line on stdin (or signals itself). The parent then acts in between.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from dissect_tui.store import writer

    action = sys.argv[1]
    original = writer.CacheWriter.commit

    def commit(self):
        if action == "pause":
            print("paused", os.getpid(), flush=True)
            sys.stdin.readline()
        else:
            os.kill(os.getpid(), getattr(signal, action))
        return original(self)

    writer.CacheWriter.commit = commit
    from dissect_tui.cli import main

    sys.exit(main(sys.argv[2:]))
    """
)


def child(action: str, argv: list[str], cwd: Path) -> subprocess.Popen:
    """Run ``main(argv)`` in a new process; ``action``: 'pause' (before committing, wait for a
    line on stdin) or a signal name it sends itself just before committing."""
    script = Path(cwd) / "child_main.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(TESTS)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.Popen(
        [sys.executable, str(script), action, *map(str, argv)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )
