"""`evaluate` / `analyze` keep the CLIP text embeddings they had to compute (class names, labels
of a templated run) in the cache when they save their metrics, so the next call encodes
nothing and loads no CLIP; --no-save and --clip write none; run_concepts is untouched.

End to end on the tiny random CNN + tiny random open_clip model (tests/tiny_models.py,
tests/tiny_clip.py), and on the hand-built known-answer caches of tests/test_evaluate.py.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from tiny_clip import make_tiny_clip
from tiny_models import write_tiny_cnn_factory

from dissect_tui import text_similarity as ts
from dissect_tui.cli import main
from dissect_tui.store import open_cache
from dissect_tui.store.metrics import read_metrics
from tests.test_evaluate import CLASSES, EXTRA, HashBagEncoder, build_cache, write_classes

# class names of the tiny CNN's 10 fc units; none is in the cifar100 concept set
TINY_CLASSES = [f"tiny class number {i}" for i in range(10)]


def q(db, sql: str, params=None) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def metric_values(db, analysis: str) -> dict[str, float | None]:
    with open_cache(db) as r:
        return {m: v for _, _, m, v, _ in read_metrics(r, analysis=analysis)}


def refuse_clip(spec, device="cpu"):
    raise AssertionError(f"CLIP {spec} was loaded although every text is in the cache")


def counting_loader(monkeypatch) -> list[str]:
    """Let ts.load_clip_text load for real, recording each load."""
    real = ts.load_clip_text
    loads: list[str] = []

    def load(spec, device="cpu"):
        loads.append(spec)
        return real(spec, device)

    monkeypatch.setattr(ts, "load_clip_text", load)
    return loads


@pytest.fixture(scope="module", params=[None, "a photo of {}"], ids=["as-written", "templated"])
def tiny_index(request, tmp_path_factory):
    """A real index of the tiny CNN (fc: 10 units) with the tiny CLIP, cifar100 concepts."""
    root = tmp_path_factory.mktemp("classemb")
    clip = make_tiny_clip(root)
    db = root / "tiny.duckdb"
    argv = ["index", write_tiny_cnn_factory(root), "--layers", "layer2,fc", "--probe", "synthetic:48"]
    argv += ["--clip", clip.spec, "--concepts", "cifar100", "--db", str(db), "--device", "cpu", "--quiet"]
    if request.param:
        argv += ["--template", request.param]
    assert main(argv) == 0
    classes = root / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n", encoding="utf-8")
    return {"db": db, "classes": classes, "template": request.param, "bytes": db.read_bytes()}


@pytest.fixture
def fresh_db(tiny_index, tmp_path):
    """A private copy of the module's index (tests write into it)."""
    db = tmp_path / "tiny.duckdb"
    db.write_bytes(tiny_index["bytes"])
    return db


def evaluate_argv(db, classes) -> list[str]:
    return ["evaluate", str(db), "--classes", str(classes), "--mpnet", "none", "--device", "cpu"]


def test_second_evaluate_loads_no_clip_and_gives_identical_metrics(tiny_index, fresh_db, capsys, monkeypatch):
    db, classes = fresh_db, tiny_index["classes"]
    run_concepts = q(db, "SELECT * FROM run_concepts ORDER BY run_id, position")
    tower = q(db, "SELECT clip_key FROM runs")[0][0].split("|template=")[0]

    loads = counting_loader(monkeypatch)
    assert main(evaluate_argv(db, classes)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert len(loads) == 1
    # as written: the labels are concepts (stored), only the class names are new; templated: the
    # stored vectors are of the prompts, so labels are encoded as written too
    n_labels = len(set(r[0] for r in q(db, "SELECT label FROM neurons WHERE layer = 'fc'")))
    expected_new = len(TINY_CLASSES) + (n_labels if tiny_index["template"] else 0)
    assert f"{expected_new} texts were not in the cache" in out
    first = metric_values(db, "evaluate")
    assert first["clip_cos"] is not None

    # stored under the text tower's own key (no template), as extra concepts in no run's set
    stored = q(
        db,
        "SELECT c.text FROM concept_embeddings e JOIN concepts c USING (concept_id) "
        "WHERE e.clip_key = ? AND c.text LIKE 'tiny class number %'",
        [tower],
    )
    assert sorted(r[0] for r in stored) == sorted(TINY_CLASSES)
    assert q(db, "SELECT * FROM run_concepts ORDER BY run_id, position") == run_concepts
    assert q(db, "SELECT count(*) FROM concept_embeddings WHERE clip_key LIKE '%|template=%'") == [
        (0 if tiny_index["template"] is None else 100,)
    ]

    monkeypatch.setattr(ts, "load_clip_text", refuse_clip)
    assert main(evaluate_argv(db, classes)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "were not in the cache" not in out
    assert metric_values(db, "evaluate") == first  # bit for bit: the same vectors


def test_no_save_writes_nothing_and_the_next_call_still_encodes(tiny_index, fresh_db, capsys, monkeypatch):
    db, classes = fresh_db, tiny_index["classes"]
    before = db.read_bytes()
    loads = counting_loader(monkeypatch)
    assert main([*evaluate_argv(db, classes), "--no-save"]) == 0
    assert db.read_bytes() == before
    assert main([*evaluate_argv(db, classes), "--no-save"]) == 0
    assert len(loads) == 2 and db.read_bytes() == before
    capsys.readouterr()


def test_clip_override_vectors_are_never_stored(tiny_index, fresh_db, tmp_path, capsys):
    db, classes = fresh_db, tiny_index["classes"]
    other = make_tiny_clip(tmp_path / "other", seed=3)
    keys = q(db, "SELECT clip_key, count(*) FROM concept_embeddings GROUP BY ALL ORDER BY 1")
    n_concepts = q(db, "SELECT count(*) FROM concepts")
    assert main([*evaluate_argv(db, classes), "--clip", other.spec]) == 0
    capsys.readouterr()
    assert metric_values(db, "evaluate")["clip_cos"] is not None
    assert q(db, "SELECT clip_key, count(*) FROM concept_embeddings GROUP BY ALL ORDER BY 1") == keys
    assert q(db, "SELECT count(*) FROM concepts") == n_concepts


def test_analyze_weights_and_predict_reuse_what_evaluate_stored(tmp_path, capsys, monkeypatch):
    """Known-answer cache whose concept set lacks the class names: the first command encodes
    them (HashBag stand-in for the run's CLIP), every later one — any command — loads nothing."""
    concepts = [c.upper() + " thing" for c in CLASSES] + EXTRA  # no class name among them
    db = build_cache(tmp_path / "c.duckdb", concepts=concepts)
    classes = str(write_classes(tmp_path))
    loads: list[str] = []
    monkeypatch.setattr(
        ts, "load_clip_text", lambda spec, device="cpu": loads.append(spec) or HashBagEncoder()
    )
    weights = ["analyze", "weights", str(db), "--classes", classes, "--mpnet", "none"]
    assert main(weights) == 0
    assert loads == ["hash:bag"]
    first = metric_values(db, "weights")
    monkeypatch.setattr(ts, "load_clip_text", refuse_clip)
    assert main(weights) == 0
    assert main(["analyze", "predict", str(db), "--classes", classes]) == 0
    assert main(["evaluate", str(db), "--classes", classes, "--mpnet", "none"]) == 0
    capsys.readouterr()
    assert metric_values(db, "weights") == first
    # the stored class-name vectors are the encoder's, under the run's key
    enc = HashBagEncoder()
    with open_cache(db) as r:
        got = r.embeddings_by_text("hash:bag", CLASSES)
    assert sorted(got) == sorted(CLASSES)
    np.testing.assert_allclose(np.stack([got[c] for c in CLASSES]), enc.encode(CLASSES), atol=1e-6)
    assert q(db, "SELECT count(*) FROM run_concepts") == [(len(concepts),)]


def test_add_text_embeddings_skips_present_duplicate_and_foreign_width(tmp_path):
    from dissect_tui.store import CacheWriter
    from dissect_tui.store.metrics import add_text_embeddings

    db = build_cache(tmp_path / "c.duckdb")
    enc = HashBagEncoder()
    n_rows = q(db, "SELECT count(*) FROM concept_embeddings")[0][0]
    with CacheWriter(db, base=db) as w:
        texts = ["dog", "new text", "new text", "another one"]  # dog is a stored concept
        assert add_text_embeddings(w, "hash:bag", texts, enc.encode(texts)) == 2
        assert add_text_embeddings(w, "hash:bag", ["wider"], np.ones((1, 7), np.float32)) == 0
        assert add_text_embeddings(w, "other:key", ["dog"], enc.encode(["dog"])) == 1
        w.commit()
    assert q(db, "SELECT count(*) FROM concept_embeddings")[0][0] == n_rows + 3
    assert q(db, "SELECT count(*) FROM concepts WHERE text IN ('new text', 'another one', 'wider')") == [(2,)]


def test_other_weights_at_the_runs_checkpoint_path_are_never_stored(tiny_index, fresh_db, tmp_path, capsys):
    """The run's CLIP spec now loads other weights (the file at its path changed): their vectors
    are used for this call but not stored under the run's tower key."""
    db, classes = fresh_db, tiny_index["classes"]
    other = make_tiny_clip(tmp_path / "other", seed=3)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE runs SET clip_pretrained = ?", [str(other.checkpoint_path)])
    rows = q(db, "SELECT count(*) FROM concept_embeddings")
    assert main(evaluate_argv(db, classes)) == 0
    assert "were not in the cache" in capsys.readouterr().out
    assert metric_values(db, "evaluate")["clip_cos"] is not None
    assert q(db, "SELECT count(*) FROM concept_embeddings") == rows
