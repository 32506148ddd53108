"""A first-time user's bad inputs through the CLI: every failure is one `error: …` line on stderr,
exit 2, no traceback, and nothing is written; odd but valid inputs (BOM, UTF-16) just work."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
import torch
from cache_factory import make_cache
from tiny_clip import make_tiny_clip
from tiny_models import write_tiny_cnn_factory

from dissect_tui.cli import main
from dissect_tui.concepts import class_names, load_concepts
from dissect_tui.errors import UserError


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    images = root / "images"
    images.mkdir()
    return {
        "root": root,
        "factory": write_tiny_cnn_factory(root),
        "clip": make_tiny_clip(root).spec,
        "images": images,  # empty: every case here must fail before the probe is read
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("qa_cache") / "tiny.duckdb")


def one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), repr(err)
    return err


def index_args(ws) -> list[str]:
    db = ws["root"] / "out.duckdb"
    return ["index", ws["factory"], "--clip", ws["clip"], "--probe", str(ws["images"]), "--db", str(db)]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--layers", ","], "--layers names no layer"),  # was silently the defaults
        (["--layers", " , ,"], "--layers names no layer"),
        (["--workers", "-1"], "--workers"),
        (["--top-images", "0"], "--top-images"),
        (["--top-concepts", "0"], "--top-concepts"),
        (["--cutoff", "nan"], "--cutoff"),
        (["--hp", "a=abc"], "a=abc"),
        (["--hp", "a=nan"], "finite"),
        (["--hp", "a=0"], "(0, 100]"),
        (["--hp", "top_k=2.5"], "whole number"),
        (["--hp", "top_k=0"], "[1, 100000]"),
        (["--hp", "p_start=2"], "(0, 1]"),
        (["--hp", "lam=1e308"], "[0, 10]"),  # every score +inf, every neuron interpretable
        (["--hp", "lam=-5"], "[0, 10]"),
        (["--hp", "a=1e30"], "(0, 100]"),
        (["--hp", "min_prob=0"], "min_prob"),
        (["--hp", "p_end=0.999"], "must not exceed p_start"),
        (["--similarity", "rank_reorder", "--hp", "p=1e9"], "(0, 10]"),
        (["--similarity", "rank_reorder", "--hp", "top_fraction=0"], "top_fraction"),
        (["--template", "{} and {}"], "--template"),
        (["--template", "{0"], "--template"),
        (["--template", "{x}"], "--template"),
        (["--template", "no placeholder"], "--template"),  # every concept would get the same text
        (["--template", "{:>100000000}"], "--template"),  # a format spec: 1 GB per 10 concepts
        (["--template", "a {} {{x}}"], "--template"),  # only a plain {}: no escaped braces either
        (["--template", "a\x1b]52;c;QQ==\x07 {}"], "--template"),  # control characters
    ],
)
def test_index_bad_values_fail_as_one_line(ws, capsys, extra, needle):
    rc = main([*index_args(ws), *extra, "--quiet"])
    assert needle in one_error_line(capsys, rc)
    assert not (ws["root"] / "out.duckdb").exists()


def test_index_good_template_passes_validation(ws, capsys):
    # The same run with a valid template gets past validation to the (empty) probe folder.
    rc = main([*index_args(ws), "--template", "a photo of {}.", "--quiet"])
    assert "holds no images" in one_error_line(capsys, rc)


def test_index_db_that_is_a_folder_fails_before_any_work(ws, capsys):
    folder = ws["root"] / "a_folder"
    folder.mkdir(exist_ok=True)
    rc = main([*index_args(ws)[:-1], str(folder), "--quiet"])
    assert "is a folder" in one_error_line(capsys, rc)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("kind", ["text", "duckdb"])
def test_index_never_overwrites_a_file_that_is_not_a_cache(ws, capsys, kind):
    other = ws["root"] / f"other-{kind}.duckdb"
    if kind == "text":
        other.write_text("my notes\n")
    else:  # somebody's own DuckDB database
        con = duckdb.connect(str(other))
        con.execute("CREATE TABLE mine AS SELECT 42 AS answer")
        con.close()
    content = other.read_bytes()
    rc = main([*index_args(ws)[:-1], str(other), "--quiet"])
    assert "not a dissect-tui cache" in one_error_line(capsys, rc)
    assert other.read_bytes() == content


def test_index_db_under_a_file_fails_as_one_line(ws, capsys):
    blocker = ws["root"] / "blocker"
    blocker.write_text("x")
    rc = main([*index_args(ws)[:-1], str(blocker / "x.duckdb"), "--quiet"])
    assert "in the way" in one_error_line(capsys, rc)


def test_unknown_model_is_reported_before_the_probe(ws, capsys):
    # The default probe (cifar100) would try a download first; the model typo is the real error.
    rc = main(
        ["index", "notamodel", "--probe", "cifar100:/nonexistent", "--db", str(ws["root"] / "m.duckdb")]
    )
    assert "unknown model 'notamodel'" in one_error_line(capsys, rc)


@pytest.mark.parametrize("relative", [False, True])
def test_weights_folder_is_named_as_a_folder(ws, capsys, monkeypatch, relative):
    monkeypatch.chdir(ws["root"])
    weights = "images" if relative else str(ws["images"])
    rc = main([*index_args(ws), "--weights", weights, "--quiet"])
    assert "is a folder" in one_error_line(capsys, rc)
    rc = main(["index", "resnet18", "--weights", weights, "--probe", "synthetic:2", "--db", "x.duckdb"])
    assert "is a folder" in one_error_line(capsys, rc)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cutoff", "nan"], "--cutoff"),
        (["--hp", "a=abc"], "a=abc"),
        (["--similarity", "wpmi", "--hp", "top_k=-1"], "top_k"),
        (["--top-concepts", "0"], "--top-concepts"),
        (["--template", "{} {}"], "--template"),
        (["--run", "99"], "no run 99"),
    ],
)
def test_relabel_bad_values_fail_as_one_line_and_leave_the_cache(cache, capsys, extra, needle):
    before = cache.read_bytes()
    rc = main(["relabel", str(cache), *extra])  # not --quiet: no progress output may precede the error
    assert needle in one_error_line(capsys, rc)
    assert cache.read_bytes() == before
    assert not list(cache.parent.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--neuron", "fc:999"], "no unit 999"),
        (["--neuron", "nope:1"], "no layer 'nope'"),
        (["--cutoff", "nan"], "--cutoff"),
    ],
)
def test_export_bad_filters_fail_as_one_line(cache, tmp_path, capsys, extra, needle):
    out = tmp_path / "out.csv"
    rc = main(["export", str(cache), str(out), *extra])
    assert needle in one_error_line(capsys, rc)
    assert not out.exists()


def test_export_valid_neuron_still_works(cache, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert main(["export", str(cache), str(out), "--neuron", "fc:9"]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("fc,9,")


@pytest.mark.parametrize(
    "data",
    [
        "\ufeffdog\r\ncat\r\n\r\ndog\r\n".encode(),  # Notepad's UTF-8 with BOM and CRLF
        "dog\ncat\n".encode("utf-16"),  # UTF-16 with its BOM
    ],
)
def test_concept_files_with_a_bom(tmp_path, data):
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    assert load_concepts(str(path)).texts == ["dog", "cat"]
    assert class_names(str(path))[:2] == ["dog", "cat"]


@pytest.mark.parametrize(("data", "needle"), [(b"dog\xff\n", "not UTF-8"), (b"\n \n", "no names")])
def test_bad_class_name_files_are_user_errors(tmp_path, data, needle):
    path = tmp_path / "classes.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=needle):
        class_names(str(path))


def test_hyperparameter_defaults_still_score(ws):
    # Validation must accept every similarity's own defaults (they are merged before checking).
    from dissect_tui.methods import METHODS

    acts, p = torch.rand(30, 3), torch.rand(30, 5)
    for method in METHODS.values():
        hp = method.validate({})
        assert method.validate(hp) == hp  # each default passed back as an override
        assert method.dense(acts, p, **hp).shape == (3, 5)
