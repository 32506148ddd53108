"""`dissect-tui sql`: every DuckDB type in CSV/JSON/Parquet, no half documents, terminal-fitted
tables and line mode, hostile cells, Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from cache_factory import make_cache

import dissect_tui.commands.sql as sql_command
from dissect_tui.cli import main

ROOT = Path(__file__).resolve().parents[1]
OSC52 = "\x1b]52;c;cHduZWQ=\x07"  # writes "pwned" to the clipboard of a terminal that shows it
TITLE = "\x1b]0;renamed\x07"
HOSTILE = [f"dog{OSC52}", f"cat{TITLE}", "[/x] closing", "[@click=app.quit]quit", "tab\there", "new\nline"]
CONTROL = ("\x1b", "\x07", "\x9b")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    concepts = [*HOSTILE, "water", "sky", "grass", "red", "striped", "wheel", "face", "tree"]
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.duckdb", concepts=concepts)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def on_terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """As if stdout were a terminal of ``width`` columns."""
    monkeypatch.setattr(sql_command, "_terminal_width", lambda: width)


# Every DuckDB type a query can return, with the JSON value it must become (exact where Python's
# conversion is not: intervals, nanoseconds, infinities come as DuckDB's own text).
TYPES = {
    "uuid": ("uuid '12345678-1234-5678-1234-567812345678'", "12345678-1234-5678-1234-567812345678"),
    "blob": ("'\\xAA\\x00b'::BLOB", "aa0062"),
    "interval": ("INTERVAL '1 month 2 days 3 seconds'", "1 month 2 days 00:00:03"),
    "struct": ("{'a': 1, 'b': [1, NULL]}", {"a": 1, "b": [1, None]}),
    "map": ("MAP {'k1': 1, 'k2': 2}", {"k1": 1, "k2": 2}),
    "map_int_keys": ("MAP {1: 'x', 2: 'y'}", {"1": "x", "2": "y"}),
    "list": ("[1, 2, NULL]", [1, 2, None]),
    "nested": ("[{'x': [1.5]}, NULL]", [{"x": [1.5]}, None]),
    "array": ("[1.0, 2.0]::FLOAT[2]", [1.0, 2.0]),
    "hugeint": ("170141183460469231731687303715884105727::HUGEINT", 170141183460469231731687303715884105727),
    "uhugeint": (
        "340282366920938463463374607431768211455::UHUGEINT",
        340282366920938463463374607431768211455,
    ),
    "nan": ("'nan'::DOUBLE", "NaN"),
    "inf": ("'inf'::DOUBLE", "Infinity"),
    "ninf": ("'-inf'::FLOAT", "-Infinity"),
    "timetz": ("'12:34:56+02'::TIMETZ", "12:34:56+02:00"),
    "bit": ("'10101'::BIT", "10101"),
    "enum": ("'b'::ENUM('a', 'b')", "b"),
    "decimal": ("1.25::DECIMAL(38, 10)", 1.25),
    "date": ("DATE '2024-02-29'", "2024-02-29"),
    "date_inf": ("DATE 'infinity'", "infinity"),
    "timestamp": ("TIMESTAMP '2024-02-29 12:00:01.5'", "2024-02-29 12:00:01.5"),
    "timestamp_ns": ("TIMESTAMP_NS '2020-01-01 00:00:00.123456789'", "2020-01-01 00:00:00.123456789"),
    "time": ("TIME '23:59:58'", "23:59:58"),
    "bool": ("true", True),
    "null": ("NULL", None),
    "json": ("'{\"a\": 1}'::JSON", '{"a": 1}'),
    "union": ("union_value(num := 2)", 2),
    "bignum": ("123456789012345678901234567890::BIGNUM", "123456789012345678901234567890"),
    "text": (f"'{OSC52}'", OSC52),
}
ALL_TYPES = "SELECT " + ", ".join(f"{expr} AS {name}" for name, (expr, _) in TYPES.items())


def test_json_serialises_every_duckdb_type(db, capsys):
    code, out, err = cli(capsys, "sql", db, ALL_TYPES, "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert list(row) == list(TYPES)
    for name, (_, want) in TYPES.items():
        assert row[name] == want, name
    # Exact numbers: no float rounding of HUGEINT or DECIMAL in the text itself.
    assert '"hugeint": 170141183460469231731687303715884105727' in out
    assert '"decimal": 1.2500000000' in out


def test_csv_writes_every_duckdb_type(db, capsys):
    code, out, err = cli(capsys, "sql", db, ALL_TYPES, "--csv")
    assert code == 0, err
    header, row = list(csv.reader(io.StringIO(out, newline="")))
    got = dict(zip(header, row, strict=True))
    assert header == list(TYPES)
    assert got["uuid"] == TYPES["uuid"][1] and got["interval"] == "1 month 2 days 00:00:03"
    assert got["hugeint"] == str(TYPES["hugeint"][1]) and got["decimal"] == "1.2500000000"
    assert got["nan"] == "nan" and got["ninf"] == "-inf" and got["null"] == ""
    assert json.loads(got["struct"]) == {"a": 1, "b": [1, None]}
    assert got["timestamp_ns"] == "2020-01-01 00:00:00.123456789" and got["date_inf"] == "infinity"
    assert got["text"] == OSC52  # data keeps every byte


def test_json_duplicate_column_names_keep_every_value(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT 1 AS a, 2 AS a, 3 AS a_1", "--json")
    assert code == 0
    assert json.loads(out) == [{"a": 1, "a_2": 2, "a_1": 3}]


@pytest.mark.parametrize("fmt", ["--json", "--csv"])
def test_a_query_failing_midway_prints_no_half_document(db, capsys, fmt):
    sql = "SELECT CASE WHEN range = 30000 THEN error('boom') ELSE range END AS x FROM range(60000)"
    code, out, err = cli(capsys, "sql", db, sql, fmt)
    assert code == 2 and out == ""
    assert err.startswith("error: SQL error:") and "boom" in err and err.count("\n") == 1


def test_data_outputs_keep_hostile_text_exact(db, capsys):
    sql = "SELECT text FROM concepts ORDER BY concept_id"
    code, out, _ = cli(capsys, "sql", db, sql, "--json")
    texts = [r["text"] for r in json.loads(out)]
    assert code == 0 and all(h in texts for h in HOSTILE)
    code, out, _ = cli(capsys, "sql", db, sql, "--csv")
    rows = [r[0] for r in csv.reader(io.StringIO(out, newline=""))][1:]
    assert code == 0 and all(h in rows for h in HOSTILE)


# -- parquet -----------------------------------------------------------------------------------------
def test_parquet_writes_every_row_and_type(db, tmp_path, capsys):
    out = tmp_path / "result.parquet"
    sql = ALL_TYPES + ", 1 AS text"  # a duplicate name too
    code, stdout, err = cli(capsys, "sql", db, sql, "--parquet", out)
    assert code == 0 and stdout == "" and "1 row written" in err
    back = duckdb.connect()
    try:
        cur = back.execute("SELECT * FROM read_parquet(?)", [str(out)])
        names = [d[0] for d in cur.description]
        row = dict(zip(names, cur.fetchall()[0], strict=True))
    finally:
        back.close()
    assert names == [*TYPES, "text_1"]
    assert row["uhugeint"] == str(TYPES["uhugeint"][1])  # Arrow's decimal(38) cannot hold it: text
    assert row["hugeint"] == TYPES["hugeint"][1]
    assert row["interval"] == "1 month 2 days 00:00:03"
    assert str(row["uuid"]) == TYPES["uuid"][1]
    assert math.isnan(row["nan"]) and row["ninf"] == -math.inf
    assert row["struct"] == {"a": 1, "b": [1, None]} and row["nested"] == [{"x": [1.5]}, None]
    assert row["text"] == OSC52 and row["text_1"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name != "result.parquet"] == []


def test_parquet_streams_a_big_result(db, tmp_path, capsys):
    out = tmp_path / "acts.parquet"
    code, _, err = cli(
        capsys, "sql", db, "SELECT * FROM activations ORDER BY layer, unit, image_id", "--parquet", out
    )
    con = duckdb.connect(str(db), read_only=True)
    try:
        want = con.execute("SELECT * FROM activations ORDER BY layer, unit, image_id").fetchall()
        got = con.execute("SELECT * FROM read_parquet(?)", [str(out)]).fetchall()
    finally:
        con.close()
    assert code == 0 and got == want and f"{len(want):,} rows written" in err


def test_parquet_never_overwrites_without_force_and_leaves_nothing_on_error(db, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    out.write_bytes(b"mine")
    code, _, err = cli(capsys, "sql", db, "SELECT 1 AS x", "--parquet", out)
    assert code == 2 and "--force" in err and out.read_bytes() == b"mine"
    code, _, err = cli(
        capsys, "sql", db, "SELECT error('boom') AS x FROM range(10)", "--parquet", out, "--force"
    )
    assert code == 2 and "boom" in err and out.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]
    code, _, _ = cli(capsys, "sql", db, "SELECT 1 AS x", "--parquet", out, "--force")
    assert code == 0 and out.read_bytes()[:4] == b"PAR1"
    code, _, err = cli(capsys, "sql", db, "SELECT 1", "--parquet", tmp_path / "no" / "r.parquet")
    assert code == 2 and "does not exist" in err
    before = db.read_bytes()
    code, _, err = cli(capsys, "sql", db, "SELECT 1", "--parquet", db, "--force")
    assert code == 2 and "the cache itself" in err and db.read_bytes() == before
    code, _, err = cli(capsys, "sql", db, "SELECT 1; SELECT 2", "--parquet", tmp_path / "two.parquet")
    assert code == 2 and "one result" in err and not (tmp_path / "two.parquet").exists()


# -- table and line output ----------------------------------------------------------------------------
def test_wide_result_on_an_80_column_terminal_prints_one_line_per_field(db, capsys, monkeypatch):
    """`SELECT * FROM runs` at 80 columns was 619 lines of one-character columns."""
    on_terminal(monkeypatch, 80)
    code, out, _ = cli(capsys, "sql", db, "SELECT * FROM runs")
    assert code == 0
    lines = out.splitlines()
    con = duckdb.connect(str(db), read_only=True)
    try:
        n_cols = len(con.execute("SELECT * FROM runs").description)
    finally:
        con.close()
    assert len(lines) == 1 + n_cols + 1  # separator, one line per field, row count
    assert lines[0].startswith("── row 1 ")
    assert any(line.split() == ["run_id:", "1"] for line in lines)
    assert all(len(line) <= 80 for line in lines)
    assert lines[-1] == "1 row"


def test_table_that_fits_is_a_table_with_long_cells_cut(db, capsys, monkeypatch):
    on_terminal(monkeypatch, 60)
    code, out, _ = cli(capsys, "sql", db, "SELECT 7 AS n, repeat('x', 200) AS long")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["n", "long"]
    assert all(len(line) <= 60 for line in lines)
    assert lines[2].endswith("x…") and lines[2].lstrip().startswith("7  x")


def test_not_a_terminal_never_cuts(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT 7 AS n, repeat('x', 300) AS long")
    assert code == 0 and "x" * 300 in out and "…" not in out
    code, out, _ = cli(capsys, "sql", db, "SELECT * FROM runs", "--mode", "line")
    assert code == 0 and "…" not in out and "── row 1 " in out


def test_mode_forces_table_or_lines(db, capsys, monkeypatch):
    on_terminal(monkeypatch, 80)
    code, out, _ = cli(capsys, "sql", db, "SELECT * FROM runs", "--mode", "table")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["run_id", "kind"]
    code, out, _ = cli(capsys, "sql", db, "SELECT 1 AS a, 2 AS b", "--mode", "line")
    assert code == 0 and out.splitlines()[1:3] == ["a: 1", "b: 2"]
    code, _, err = cli(capsys, "sql", db, "SELECT 1", "--mode", "line", "--csv")
    assert code == 2 and "--mode" in err


def test_fit_widths_cuts_the_widest_first_and_gives_up_below_readable():
    assert sql_command.fit_widths([5, 100, 30], 200) == [5, 100, 30]
    assert sql_command.fit_widths([5, 100, 30], 60) == [5, 27, 27]  # 5 + 27 + 27 <= 60 < 5 + 28 + 28
    assert sql_command.fit_widths([40] * 20, 80) is None


def test_limit_counts_every_row(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "SELECT range AS i FROM range(2345)", "--limit", "10")
    assert code == 0 and "first 10 of 2,345 rows shown" in out
    code, out, _ = cli(capsys, "sql", db, "PRAGMA table_info('runs')", "--limit", "3")
    con = duckdb.connect(str(db), read_only=True)
    try:
        n = len(con.execute("PRAGMA table_info('runs')").fetchall())
    finally:
        con.close()
    assert code == 0 and f"first 3 of {n} rows shown" in out


# -- hostile text -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["table", "line"])
def test_stored_control_sequences_never_reach_the_terminal(db, capsys, monkeypatch, mode):
    on_terminal(monkeypatch, 200)
    sql = f'SELECT text, text AS "{TITLE}name" FROM concepts ORDER BY concept_id'
    code, out, _ = cli(capsys, "sql", db, sql, "--mode", mode)
    assert code == 0
    assert not any(c in out for c in CONTROL)
    assert "dog␛]52;c;cHduZWQ=␇" in out and "␛]0;renamed␇name" in out
    assert "tab␉here" in out and "new␊line" in out  # one line per cell


def test_markup_in_cells_and_names_prints_as_written(db, capsys):
    sql = "SELECT text AS \"[bold]name[/bold]\" FROM concepts WHERE text LIKE '[%' ORDER BY text"
    code, out, err = cli(capsys, "sql", db, sql)
    assert code == 0, err
    assert "[bold]name[/bold]" in out and "[/x] closing" in out and "[@click=app.quit]quit" in out


def test_error_messages_with_stored_text_are_made_safe(db, capsys):
    code, _, err = cli(capsys, "sql", db, "SELECT CAST(text AS INTEGER) FROM concepts WHERE text LIKE 'cat%'")
    assert code == 2 and err.count("\n") == 1
    assert not any(c in err for c in CONTROL) and "␛]0;renamed␇" in err


# -- Ctrl-C ----------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the query running")
@pytest.mark.parametrize(
    "args",
    [
        ["SELECT count(*) FROM range(1000000000000) t WHERE hash(t.range) % 7 = 1"],  # stuck in execute
        ["SELECT range FROM range(1000000000000)", "--csv"],  # stuck fetching rows
    ],
)
def test_ctrl_c_during_a_query_exits_130_without_a_traceback(db, tmp_path, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dissect_tui", "sql", str(db), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        # A shell's background job ignores SIGINT and children inherit that: restore the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        start = _cpu_seconds(proc.pid)
        deadline = time.monotonic() + 120
        # Sync on work done, not on time: the query has run once the process burnt 3 s of CPU.
        while _cpu_seconds(proc.pid) - start < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode() == "interrupted\n" and out == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_explain_prints_the_plan_as_a_drawing(db, capsys):
    code, out, _ = cli(capsys, "sql", db, "EXPLAIN SELECT count(*) FROM neurons")
    assert code == 0 and "␊" not in out and "explain_value" not in out
    assert len(out.splitlines()) >= 3 and out.splitlines()[0].startswith("╭")


@pytest.mark.parametrize(
    "interval",
    ["32 days 3 seconds", "1 day", "0 seconds", "-1 day -1 hour", "3.5 seconds", "-1 second", "-30 days"],
)
def test_interval_text_matches_duckdb(interval):
    """Intervals Python hands back (from non-SELECT statements) read as DuckDB prints them."""
    from dissect_tui.sql_format import interval_text

    con = duckdb.connect()
    try:
        value, text = con.execute(
            "SELECT ?::INTERVAL, ?::INTERVAL::VARCHAR", [interval, interval]
        ).fetchall()[0]
    finally:
        con.close()
    assert interval_text(value) == text
