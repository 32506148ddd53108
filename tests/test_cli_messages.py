"""Command-line messages (issue 11, CLI): usage errors are one `error:` line plus one hint, exit 2;
missing files and unknown names say which; layer lists follow the network; evaluate and
analyze refuse a cache another process is writing before they compute anything."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dissect_tui import filesafety
from dissect_tui.cli import build_parser, main
from dissect_tui.concepts import SHIPPED
from dissect_tui.store import CacheWriter
from tests.cache_factory import make_cache
from tests.safety_helpers import dot_files, one_error_line
from tests.test_evaluate import CLASSES, build_cache, write_classes

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


# -- 3. small messages --------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path) -> Path:
    return make_cache(tmp_path / "c.duckdb")


def test_relabel_with_a_missing_concept_file_says_not_found(cache, capsys):
    missing = cache.parent / "nonexistent.txt"
    rc = main(["relabel", str(cache), "--concepts", str(missing), "--quiet"])
    line = one_error_line(capsys.readouterr().err, rc)
    assert f"concept file {missing} not found" in line and "unknown" not in line
    assert f"shipped concept sets: {', '.join(SHIPPED)}" in line


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nope", "unknown concept set 'nope': the shipped ones are 20k, 10k, 3k, imagenet"),
        ("mine.txt", "concept file mine.txt not found (shipped concept sets: 20k,"),
        ("~/lists/mine", "not found (shipped concept sets:"),
        (".", "is a folder, not a text file"),
    ],
)
def test_concept_spec_messages(spec, expected, tmp_path, monkeypatch):
    from dissect_tui.concepts import load_concepts
    from dissect_tui.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_concepts(spec)
    assert expected in str(info.value)


def test_evaluate_with_a_missing_class_file_says_not_found(tmp_path, capsys):
    db = build_cache(tmp_path / "c.duckdb")
    rc = main(["evaluate", str(db), "--classes", str(tmp_path / "classes.txt"), "--mpnet", "none"])
    line = one_error_line(capsys.readouterr().err, rc)
    assert "classes.txt not found (shipped class-name lists: imagenet, places365, cifar100)" in line


def test_unknown_layer_lists_the_model_layers_in_network_order():
    from dissect_tui.errors import UserError
    from dissect_tui.targets import load_target, resolve_layers

    model = load_target("resnet18", weights="none").model
    with pytest.raises(UserError) as info:
        resolve_layers(model, ["layer5"], [])
    listed = str(info.value).split("valid layers: ")[1].split(", ...")[0].split(", ")
    order = [name for name, _ in model.named_modules()]
    assert {"conv1", "layer4", "fc"} <= set(listed)
    assert listed == sorted(listed, key=order.index)  # close matches (layer4 …) no longer first


def test_layers_with_weights_are_listed_in_network_order(cache, capsys, tmp_path):
    """analyze names the layers that have stored weights in the order of the network (they were
    listed last layer first)."""
    with CacheWriter(cache, base=cache) as w:
        w.write_linear_weights("layer4", "layer1", np.ones((12, 16)), np.zeros(12))
        w.commit()
    classes = write_classes(tmp_path, [f"class {i}" for i in range(8)])
    rc = main(["analyze", "weights", str(cache), "--layer", "conv1", "--classes", str(classes)])
    line = one_error_line(capsys.readouterr().err, rc)
    assert "no weights stored for layer 'conv1' (layers with weights: layer4, fc)" in line


INDEX_FLAGS = {"--help", "--quiet"}  # switches: nothing to default
INDEX_OPT_IN = {"--embeddings-from"}  # off unless given


def test_index_help_states_every_default():
    parser = dict((" ".join(p), parser) for p, parser in leaf_commands())["index"]
    missing = []
    for action in parser._actions:
        name = max(action.option_strings, key=len, default=action.dest)
        if not action.option_strings or name in INDEX_FLAGS | INDEX_OPT_IN:
            continue
        text = action.help or ""
        if "default" not in text or "None" in text:
            missing.append(f"{name}: {text}")
    assert missing == []


# -- 4. evaluate and analyze refuse a busy cache before computing --------------------------------
def busy_argvs(db: Path, classes: Path) -> list[list[str]]:
    common = ["--classes", str(classes), "--device", "cpu"]
    return [
        ["evaluate", str(db), *common, "--mpnet", "none"],
        ["analyze", "weights", str(db), *common, "--mpnet", "none"],
        ["analyze", "predict", str(db), *common],
        ["analyze", "interpretability", str(db)],
    ]


def test_busy_cache_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import dissect_tui.store as store

    db = build_cache(tmp_path / "c.duckdb")
    classes = write_classes(tmp_path, CLASSES)
    opened: list[str] = []
    real_open = store.open_cache
    monkeypatch.setattr(
        store, "open_cache", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k)
    )
    before = db.read_bytes()
    other = filesafety.WriteLock(db)  # another writer (its own open file description)
    other.acquire()
    try:
        for argv in busy_argvs(db, classes):
            rc = main(argv)
            line = one_error_line(capsys.readouterr().err, rc)
            assert f"{db} is being written by process {os.getpid()}" in line, argv
            assert "pass --no-save" in line, argv
            assert opened == [], argv  # refused before the cache was even read
            # printing only needs no lock
            assert main([*argv, "--no-save"]) == 0, capsys.readouterr().err
            assert opened and "metrics in" not in capsys.readouterr().out
            opened.clear()
        assert db.read_bytes() == before
        assert dot_files(tmp_path) == [".c.duckdb.lock"]  # the other writer's, untouched
    finally:
        other.release()
    assert main(busy_argvs(db, classes)[0]) == 0  # free again: computes and saves
    assert "stored 7 metrics" in " ".join(capsys.readouterr().out.split())
    assert dot_files(tmp_path) == []


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import dissect_tui.store as store

    folder = tmp_path / "ro"
    folder.mkdir()
    db = build_cache(folder / "c.duckdb")
    classes = write_classes(tmp_path)
    opened: list[str] = []
    monkeypatch.setattr(store, "open_cache", lambda *a, **k: opened.append("x"))
    # A read-only file system (the tests may run as root, who writes anyway): os.access says no,
    # and creating a file there (the lock) fails with EROFS.
    real_access, real_open = os.access, os.open
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != folder and real_access(p, mode, **k))

    def read_only_open(p, flags, *a, **k):
        if Path(p).parent == folder and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_open)
    compose = ["compose", str(db), "--layer", "fc", "--quiet"]
    for argv in [*busy_argvs(db, classes), compose]:
        rc = main(argv)
        line = one_error_line(capsys.readouterr().err, rc)
        assert f"cannot write in folder {folder}" in line and "pass --no-save" in line, argv
    assert opened == [] and dot_files(folder) == []


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_text_a_narrow_stdout_cannot_encode_is_escaped_not_a_traceback(cache, tmp_path, encoding):
    """PYTHONIOENCODING=ascii or a Latin-1 terminal: values outside it come out as backslash
    escapes (as on stderr), rules as '-'; the command succeeds. CSV stays UTF-8 (it is data)."""
    sql = "SELECT 'caf\u00e9 \u00d7 \u2026' AS x, 1 AS y"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": encoding}
    table = subprocess.run(
        [sys.executable, "-m", "dissect_tui", "sql", str(cache), sql],
        capture_output=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert table.returncode == 0 and table.stderr == b"", table.stderr
    out = table.stdout.decode(encoding)
    assert "\\u2026" in out and "1 row" in out
    assert out.splitlines()[1].strip() == "-" * 8 + "  -"  # the value is 8 cells wide
    csv = subprocess.run(
        [sys.executable, "-m", "dissect_tui", "sql", str(cache), sql, "--csv"],
        capture_output=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert csv.returncode == 0 and csv.stdout.decode("utf-8").splitlines()[1] == "caf\u00e9 \u00d7 \u2026,1"


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            MemoryError(
                "Unable to allocate 37.2 GiB for an array with shape (1281167, 3904) and data type float64"
            ),
            "error: out of memory: Unable to allocate 37.2 GiB for an array with shape (1281167, 3904) and data type float64",
        ),
        (MemoryError(), "error: out of memory"),
        (
            "torch",
            "error: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 139.8 GiB total",
        ),
    ],
)
def test_running_out_of_memory_is_one_line(cache, capsys, monkeypatch, exc, line):
    import dissect_tui.commands.export as export_command

    if exc == "torch":
        import torch

        exc = torch.OutOfMemoryError(
            line.removeprefix("error: out of memory: ") + "\nOf the allocated memory …"
        )

    def run(args):
        raise exc

    monkeypatch.setattr(export_command, "run", run)
    assert main(["export", str(cache), str(cache.parent / "x.csv")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_command_leaves_stdout_as_it_found_it(cache, monkeypatch):
    import io

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["sql", str(cache), "SELECT '\u2026' AS x", "--mode", "line"]) == 0
    out.flush()
    assert "x: \\u2026" in raw.getvalue().decode("ascii")  # escaped during the command
    assert out.errors == "strict"  # and the stream's own setting is back
