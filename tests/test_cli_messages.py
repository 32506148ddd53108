"""Command-line messages (issue 11, CLI): usage errors are one `error:` line plus one hint, exit 2;
missing files and unknown names say which; layer lists follow the network; evaluate and
analyze refuse a cache another process is writing before they compute anything."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dissect_tui.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def leaf_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """(argv prefix, parser) of every runnable (sub)command: index, …, analyze weights, …"""
    out = []

    def walk(prefix: list[str], parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((prefix, parser))
        for action in subs:
            for name, child in action.choices.items():
                walk([*prefix, name], child)

    walk([], build_parser())
    return out


LEAVES = [prefix for prefix, _ in leaf_commands()]


def usage_error(capsys, argv: list[str]) -> tuple[str, str]:
    """Run argv, expect exit 2 and exactly two stderr lines: (error line, hint line)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2 and err.endswith("\n"), err
    assert lines[0].startswith("error: ") and "usage:" not in err, err
    return lines[0], lines[1]


# -- 1. usage errors ------------------------------------------------------------------------------
def test_every_command_is_covered():
    assert ["index"] in LEAVES and ["analyze", "weights"] in LEAVES and len(LEAVES) >= 9


@pytest.mark.parametrize("prefix", LEAVES, ids=" ".join)
def test_unknown_option_of_every_command_is_one_line_and_a_hint(capsys, prefix):
    _, hint = usage_error(capsys, [*prefix, "--no-such-option"])
    assert hint == f"see 'dissect-tui {' '.join(prefix)} --help'"


@pytest.mark.parametrize("prefix", LEAVES, ids=" ".join)
def test_help_of_every_command_is_the_full_help(capsys, prefix):
    assert main([*prefix, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dissect-tui") and "options:" in out and "--help" in out


@pytest.mark.parametrize(
    ("argv", "error", "hint"),
    [
        (["index", "m", "--cutoff", "abc"], "argument --cutoff: invalid float value: 'abc'", "index"),
        (["index"], "the following arguments are required: model", "index"),
        (["index", "m", "--bogus"], "unrecognized arguments: --bogus", "index"),
        (["index", "m", "--pool", "median"], "argument --pool: invalid choice: 'median'", "index"),
        (["relabel", "db", "--top-concepts", "1.5"], "invalid int value: '1.5'", "relabel"),
        (["sql", "db"], "required: QUERY", "sql"),
        (["export", "db", "out.csv", "--format", "xls"], "invalid choice: 'xls'", "export"),
        (["evaluate", "db", "--similarity", "best"], "invalid choice: 'best'", "evaluate"),
        (["analyze"], "required: ANALYSIS", "analyze"),
        (["analyze", "predict", "db", "--examples", "x"], "invalid int value: 'x'", "analyze predict"),
        (["analyze", "weights", "db", "extra"], "unrecognized arguments: extra", "analyze weights"),
        (["browse", "--graphics", "svg"], "invalid choice: 'svg'", "browse"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'", ""),
    ],
)
def test_usage_errors_name_the_problem_and_the_help(capsys, argv, error, hint):
    line, hint_line = usage_error(capsys, argv)
    assert error in line
    assert hint_line == f"see 'dissect-tui{' ' + hint if hint else ''} --help'"


def test_a_hostile_value_in_a_usage_error_reaches_the_terminal_as_text(capsys):
    line, _ = usage_error(capsys, ["index", "m", "--pool", "\x1b]0;owned\x07\x1b[2J"])
    assert "\x1b" not in line and "\x07" not in line and "owned" in line


def test_no_command_prints_the_command_list(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: dissect-tui")
    for name in ("index", "relabel", "browse", "sql", "export", "evaluate", "analyze"):
        assert f"\n    {name}" in err


def test_version_exits_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dissect-tui ")


def test_the_installed_entry_point_prints_two_lines(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dissect_tui", "index", "resnet18", "--cutoff", "abc"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: argument --cutoff: invalid float value: 'abc'",
        "see 'dissect-tui index --help'",
    ]
