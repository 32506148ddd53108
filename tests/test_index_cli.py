"""End to end through the CLI: a tiny random CNN, a tiny random open_clip model on disk,
generated images in nested folders (plus broken files) -> a cache with every documented
relation filled and consistent; relabel; failures as one clear line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from tiny_clip import make_tiny_clip
from tiny_models import BROKEN_FILES, make_image_tree, write_tiny_cnn_factory

from dissect_tui import similarity
from dissect_tui.cli import main
from dissect_tui.concepts import load_concepts
from dissect_tui.store import open_cache
from dissect_tui.store.schema import RELATIONS

N_IMAGES = 120
LAYERS = ["conv1", "layer1", "layer2", "fc"]
WIDTHS = {"conv1": 8, "layer1": 16, "layer2": 24, "fc": 10}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    images = make_image_tree(root, N_IMAGES, broken=True)
    factory = write_tiny_cnn_factory(root)
    clip = make_tiny_clip(root)
    db = root / "tiny.duckdb"
    args = [
        "index",
        factory,
        "--layers",
        ",".join(LAYERS),
        "--probe",
        str(images),
        "--clip",
        clip.spec,
        "--concepts",
        "cifar100",
        "--db",
        str(db),
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--top-images",
        "50",
        "--quiet",
    ]
    assert main(args) == 0
    return {"root": root, "images": images, "factory": factory, "clip": clip, "db": db, "args": args}


def q(db: Path, sql: str, params=None):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_every_documented_relation_exists_and_is_filled(workspace):
    db = workspace["db"]
    with open_cache(db) as r:
        for rel in RELATIONS:
            if rel in ("metrics", "compositions"):  # written by evaluate/analyze/compose, empty after index
                continue
            n = r.query(f"SELECT count(*) FROM {rel}")[1][0][0]
            assert n > 0, rel


def test_counts_ranks_and_ids_are_consistent(workspace):
    db = workspace["db"]
    n_total = N_IMAGES + len(BROKEN_FILES)
    assert q(db, "SELECT count(*), count(*) FILTER (WHERE NOT ok) FROM images") == [
        (n_total, len(BROKEN_FILES))
    ]
    # stable ids: sorted relative paths
    paths = [p for (p,) in q(db, "SELECT path FROM images ORDER BY image_id")]
    rel = [os.path.relpath(p, workspace["images"]) for p in paths]
    assert rel == sorted(rel)
    failed = {
        os.path.relpath(p, workspace["images"]) for (p,) in q(db, "SELECT path FROM images WHERE NOT ok")
    }
    assert failed == set(BROKEN_FILES)
    assert q(db, "SELECT count(*) FROM image_embeddings") == [(N_IMAGES,)]
    assert q(db, "SELECT count(*) FROM image_embeddings JOIN images USING (image_id) WHERE NOT ok") == [(0,)]
    m = len(load_concepts("cifar100"))
    assert q(db, "SELECT count(*) FROM concepts") == [(m,)]
    assert q(db, "SELECT count(*) FROM concept_embeddings") == [(m,)]
    assert q(db, "SELECT count(*) FROM p") == [(N_IMAGES * m,)]
    for layer in LAYERS:
        k = WIDTHS[layer]
        assert q(db, "SELECT n_units FROM layers WHERE layer = ?", [layer]) == [(k,)]
        # output_shape is the module's raw output (without the batch), before pooling
        shape = json.loads(q(db, "SELECT output_shape FROM layers WHERE layer = ?", [layer])[0][0])
        assert shape[0] == k and len(shape) == (1 if layer == "fc" else 3)
        assert q(
            db,
            "SELECT count(*), min(len(acts)), max(len(acts)) FROM activation_rows WHERE layer = ?",
            [layer],
        ) == [(N_IMAGES, k, k)]
        assert q(db, "SELECT count(*) FROM activations WHERE layer = ?", [layer]) == [(N_IMAGES * k,)]
        # top images: 50 per unit, ranks 1..50, descending activations, ids of decoded images
        assert q(
            db,
            "SELECT count(DISTINCT unit), min(rank), max(rank), count(*) FROM top_images WHERE layer = ?",
            [layer],
        ) == [(k, 1, 50, k * 50)]
        bad = q(
            db,
            "SELECT count(*) FROM top_images a JOIN top_images b ON a.layer = b.layer AND a.unit = b.unit "
            "AND b.rank = a.rank + 1 WHERE a.layer = ? AND b.activation > a.activation",
            [layer],
        )
        assert bad == [(0,)]
        assert q(db, "SELECT count(*) FROM neurons WHERE layer = ?", [layer]) == [(k,)]
        assert q(db, "SELECT count(*) FROM neuron_concepts WHERE layer = ?", [layer]) == [(k * min(100, m),)]
    # the stored top activation is the stored activation of that image
    mismatch = q(
        db,
        "SELECT count(*) FROM top_images t JOIN activation_rows a ON a.layer = t.layer AND a.image_id = t.image_id "
        "WHERE abs(a.acts[t.unit + 1] - t.activation) > 1e-6",
    )
    assert mismatch == [(0,)]
    # label = rank-1 concept, score = its score, interpretable = score > cutoff
    wrong = q(
        db,
        "SELECT count(*) FROM neurons n JOIN neuron_concepts nc USING (run_id, layer, unit) "
        "JOIN concepts c ON c.concept_id = nc.concept_id JOIN runs r USING (run_id) "
        "WHERE nc.rank = 1 AND (c.text <> n.label OR abs(nc.score - n.similarity) > 1e-5 "
        "OR n.interpretable <> (n.similarity > r.cutoff))",
    )
    assert wrong == [(0,)]
    # thumbnails: exactly the images in some top-10 list
    assert q(
        db,
        "SELECT count(*) FROM (SELECT DISTINCT image_id FROM top_images WHERE rank <= 10) t "
        "FULL JOIN thumbnails USING (image_id) WHERE t.image_id IS NULL OR thumbnails.jpeg IS NULL",
    ) == [(0,)]
    run = q(db, "SELECT kind, n_images, n_failed_images, similarity, stage_seconds FROM runs")
    assert run[0][:4] == ("index", n_total, len(BROKEN_FILES), "soft_wpmi")
    assert "images" in run[0][4]


def test_stored_activations_and_labels_match_a_direct_computation(workspace):
    """Recompute one image's activations with the model, and SoftWPMI from stored data."""
    from dissect_tui.clip_backend import load_clip
    from dissect_tui.probe import resolve_probe
    from dissect_tui.recording import LayerRecorder
    from dissect_tui.targets import load_target

    db = workspace["db"]
    target = load_target(workspace["factory"])
    probe = resolve_probe([str(workspace["images"])], Path("cache"))
    image_id = 5
    img = probe.open(image_id)
    with LayerRecorder(target.model, LAYERS, pool="mean") as rec, torch.inference_mode():
        target.model(target.preprocess(img)[None])
        direct = rec.pop()
    with open_cache(db) as r:
        for layer in LAYERS:
            ids, acts = r.layer_activations(layer)
            row = acts[list(ids).index(image_id)]
            np.testing.assert_allclose(row, direct[layer][0].numpy(), rtol=1e-4, atol=1e-5)
        # image embedding = CLIP of the same decode
        clip = load_clip(workspace["clip"].spec)
        emb = clip.encode_images(clip.preprocess(img)[None])[0].numpy()
        ids, embs = r.image_embeddings()
        np.testing.assert_allclose(embs[list(ids).index(image_id)], emb, atol=1e-5)
        # labels = argmax of the reference soft_wpmi on P = I Tᵀ
        run = r.run()
        cids, texts = r.run_concepts(run["run_id"])
        t = torch.from_numpy(r.concept_embeddings(run["clip_key"], cids))
        p = torch.from_numpy(embs) @ t.T
        neurons = r.neurons(run["run_id"])
        for layer in LAYERS:
            _, acts = r.layer_activations(layer)
            scores = similarity.soft_wpmi(torch.from_numpy(acts).double(), p.double())
            expected = [texts[i] for i in scores.argmax(1).tolist()]
            got = list(neurons["label"][neurons["layer"] == layer])
            assert got == expected
        # per-image best concepts and softmax normaliser (taken from the scoring pass)
        _assert_image_summaries(r, run["run_id"], p, a=10.0)


def _assert_image_summaries(r, run_id: int, p: torch.Tensor, a: float) -> None:
    """image_concepts / image_softmax of a run equal P's row maxima and logsumexp(a·P)."""
    cids, _ = r.run_concepts(run_id)
    emb_ids = list(r.image_embeddings()[0])
    ids, lse = r.image_softmax(run_id)
    rows_of = [emb_ids.index(i) for i in ids.tolist()]
    np.testing.assert_allclose(lse, torch.logsumexp(a * p[rows_of], dim=1).numpy(), rtol=1e-5)
    _, best = r.query(
        "SELECT image_id, concept_id, similarity FROM image_concepts WHERE run_id = ? AND rank = 1",
        [run_id],
    )
    best_of = {i: (c, s) for i, c, s in best}
    assert sorted(best_of) == sorted(ids.tolist())
    for i, row in zip(ids.tolist(), rows_of, strict=True):
        c, s = best_of[i]
        assert c == cids[int(p[row].argmax())]
        assert s == pytest.approx(float(p[row].max()), abs=1e-5)


def test_activations_streamed_in_small_batches_change_nothing(workspace, tmp_path, monkeypatch):
    """Activations reach DuckDB through one INSERT fed batch by batch (store/activation_stream.py);
    with one-row Arrow batches and every image batch handed over at once (hundreds of batches
    through the queue) the cache equals the one built with the default sizes."""
    from dissect_tui import image_pass
    from dissect_tui.store import activation_stream

    monkeypatch.setattr(activation_stream, "BATCH_BYTES", 1)
    monkeypatch.setattr(image_pass, "CHUNK_BYTES", 1)
    put = activation_stream.ActivationStream._put
    batches = []
    monkeypatch.setattr(
        activation_stream.ActivationStream, "_put", lambda self, item: batches.append(item) or put(self, item)
    )
    db = tmp_path / "one-row-batches.duckdb"
    assert main(_args_with_db(workspace, db)) == 0
    assert len(batches) == N_IMAGES * len(LAYERS) + 1, len(batches)  # one row each, then the end
    sql = "SELECT layer, image_id, acts FROM activation_rows ORDER BY layer, image_id"
    assert q(db, sql) == q(workspace["db"], sql)
    labels = "SELECT layer, unit, concept_id, similarity FROM neurons ORDER BY layer, unit"
    assert q(db, labels) == q(workspace["db"], labels)


def test_relabel_changes_labels_and_keeps_the_index_run(workspace, tmp_path):
    db = tmp_path / "relabel.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    assert main(["relabel", str(db), "--concepts", "3k", "--clip", workspace["clip"].spec, "--quiet"]) == 0
    assert main(["relabel", str(db), "--similarity", "cos", "--cutoff", "0.5", "--quiet"]) == 0
    with open_cache(db) as r:
        runs = r.runs()
        assert [(x["kind"], x["similarity"], x["concept_set"]) for x in runs] == [
            ("index", "soft_wpmi", "cifar100"),
            ("relabel", "soft_wpmi", "3k"),
            ("relabel", "cos", "3k"),
        ]
        assert runs[2]["cutoff"] == 0.5 and runs[2]["parent_run_id"] == 2
        three_k = set(load_concepts("3k").texts)
        labels2 = r.neurons(2)["label"]
        assert set(labels2) <= three_k
        assert not set(labels2) <= set(load_concepts("cifar100").texts)
        # run 3 reused run 2's embeddings (no CLIP given) and its labels are the cos argmax
        cids, texts = r.run_concepts(3)
        t = torch.from_numpy(r.concept_embeddings(runs[2]["clip_key"], cids))
        _, embs = r.image_embeddings()
        p = torch.from_numpy(embs) @ t.T
        n3 = r.neurons(3)
        for layer in LAYERS:
            _, acts = r.layer_activations(layer)
            expected = similarity.cos(torch.from_numpy(acts).double(), p.double()).argmax(1)
            assert list(n3["label"][n3["layer"] == layer]) == [texts[i] for i in expected.tolist()]
        assert (n3["interpretable"] == (n3["similarity"] > 0.5)).all()
        _assert_image_summaries(r, 3, p, a=10.0)  # cos forms no P rows: computed separately
        # the index run's rows are untouched
        assert len(r.neurons(1)["label"]) == sum(WIDTHS.values())


def test_relabel_with_same_settings_reproduces_labels(workspace, tmp_path):
    db = tmp_path / "same.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    assert main(["relabel", str(db), "--quiet"]) == 0
    with open_cache(db) as r:
        a, b = r.neurons(1), r.neurons(2)
        assert list(a["label"]) == list(b["label"])
        np.testing.assert_allclose(a["similarity"], b["similarity"], rtol=1e-5)


def test_summary_prints_the_throughput_of_each_stage(workspace, tmp_path, capsys):
    db = tmp_path / "rates.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    assert main(["relabel", str(db), "--concepts", "3k", "--clip", workspace["clip"].spec]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("time per stage:")]
    assert len(lines) == 1, lines
    assert re.search(r"concepts [\d.]+s \([\d,]+ texts/s\)", lines[0]), lines[0]
    assert re.search(r"scoring [\d.]+s[,;]", lines[0]), lines[0]
    assert "img/s" not in lines[0]  # relabel reads no image
    assert "decoded" not in err  # nor does it claim to have decoded any
    assert err.count("new concept texts") == 1, err  # a note is shown once, not again in the summary
    assert re.search(r"; total [\d.]+s$", lines[0]), lines[0]


def test_stage_rates_use_each_stage_own_count():
    from dissect_tui.indexer import IndexResult

    result = IndexResult(
        path=Path("x.duckdb"),
        run_id=1,
        kind="index",
        n_images=1010,
        n_failed=10,
        failed_examples=[],
        layers=[],
        stage_seconds={"setup": 1.0, "images": 2.0, "concepts": 0.5, "scoring": 4.0, "write": 0.0},
        n_concepts_encoded=100,
    )
    # images counts every file read; stages that are not about images or texts have no rate
    assert result.stage_rates() == {"images": "505 img/s", "concepts": "200 texts/s"}
    result.n_concepts_encoded = 0  # all embeddings reused: no text rate
    assert "concepts" not in result.stage_rates()


def test_ctrl_c_leaves_previous_cache_and_no_temp_files(workspace, monkeypatch, capsys):
    from dissect_tui import scoring

    db = workspace["db"]
    before = db.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "score_layers", interrupted)
    assert main(workspace["args"]) == 130
    assert db.read_bytes() == before
    leftovers = [p.name for p in db.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": "resnet9000"}, "unknown model"),
        ({"--layers": "conv1,nope"}, "nope"),
        ({"--concepts": "no-such-set"}, "unknown concept set"),
        ({"--clip": "NoSuchClip-B-99:none"}, "NoSuchClip-B-99"),
        ({"--probe": "/no/such/folder"}, "/no/such/folder"),
        ({"--similarity": None, "--hp": "zeta=3"}, "zeta"),
    ],
)
def test_bad_input_is_one_clear_line(workspace, tmp_path, capsys, change, expected):
    args = list(workspace["args"])
    args[args.index("--db") + 1] = str(tmp_path / "x.duckdb")
    for key, value in change.items():
        if key == "model":
            args[1] = value
        elif value is None:
            continue
        elif key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.duckdb").exists()


def test_empty_probe_folder_fails_clearly(workspace, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = list(workspace["args"])
    args[args.index("--probe") + 1] = str(empty)
    args[args.index("--db") + 1] = str(tmp_path / "x.duckdb")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(empty) in err and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dissect_tui", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "index" in out.stdout and "relabel" in out.stdout


def test_out_of_memory_retries_with_smaller_batches(workspace, tmp_path, monkeypatch, capsys):
    """A batch that does not fit is split in halves until it does; the results are unchanged."""
    from dissect_tui import targets

    original = targets.load_target
    sizes: list[int] = []

    def load_small_memory_target(*args, **kwargs):
        target = original(*args, **kwargs)
        forward = target.model.forward

        def limited(x):
            sizes.append(x.shape[0])
            if x.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(x)

        target.model.forward = limited
        return target

    monkeypatch.setattr(targets, "load_target", load_small_memory_target)
    args = list(workspace["args"])
    args[args.index("--db") + 1] = str(tmp_path / "oom.duckdb")
    args.remove("--quiet")
    assert main(args) == 0
    assert max(sizes) == 16 and 4 in sizes
    assert "out of memory" in capsys.readouterr().err
    with open_cache(tmp_path / "oom.duckdb") as a, open_cache(workspace["db"]) as b:
        for layer in LAYERS:
            np.testing.assert_allclose(
                a.layer_activations(layer)[1], b.layer_activations(layer)[1], rtol=1e-5
            )
        assert list(a.neurons(1)["label"]) == list(b.neurons(1)["label"])


def test_template_is_a_field_of_the_run_and_the_browser_encodes_with_it(workspace, tmp_path):
    """--template is stored in runs.template; relabel keeps it; the browser's free-text queries
    are encoded exactly like the run's concepts (the bug: raw text against templated normalisers)."""
    from dissect_tui.explain import Explainer
    from dissect_tui.store.reader import CacheReader

    db = tmp_path / "template.duckdb"
    args = [a if a != str(workspace["db"]) else str(db) for a in workspace["args"]]
    assert main([*args, "--concepts", "3k", "--template", "a photo of {}."]) == 0
    assert main(["relabel", str(db), "--similarity", "wpmi", "--quiet"]) == 0
    with open_cache(db) as r:
        runs = r.runs()
        assert [x["template"] for x in runs] == ["a photo of {}.", "a photo of {}."]
        assert runs[0]["clip_key"] == runs[1]["clip_key"]
        cids, texts = r.run_concepts(1)
        stored = r.concept_embeddings(runs[0]["clip_key"], cids[:5])
        ex = Explainer(lambda: CacheReader(r.con.cursor(), r.path), runs[0])
        got = ex.encode(texts[:5]).numpy()
        np.testing.assert_allclose(got, stored, atol=1e-5)
        raw = ex.clip().encode_texts(texts[:5]).float().cpu().numpy()
        assert np.abs(raw - stored).max() > 1e-3  # the template really changes the embeddings


def test_version_1_cache_is_read_and_upgraded_by_relabel(workspace, tmp_path):
    """A cache written before runs.template existed: its template comes from the clip_key suffix."""
    db = tmp_path / "v1.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    with duckdb.connect(str(db)) as con:
        con.execute("ALTER TABLE runs DROP COLUMN template")
        con.execute("UPDATE runs SET clip_key = clip_key || '|template=a {} photo'")
        con.execute("UPDATE concept_embeddings SET clip_key = clip_key || '|template=a {} photo'")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        con.execute("DELETE FROM meta WHERE key = 'format'")
    with open_cache(db) as r:
        assert r.run()["template"] == "a {} photo"
    assert main(["relabel", str(db), "--similarity", "cos", "--quiet"]) == 0
    with open_cache(db) as r:
        assert [x["template"] for x in r.runs()] == ["a {} photo", "a {} photo"]
        assert r.query("SELECT value FROM meta WHERE key = 'schema_version'")[1] == [("2",)]


def test_hostile_path_in_the_summary_is_shown_as_text(workspace, tmp_path, capsys):
    """A cache path holding markup and terminal escapes: the run succeeds and stderr carries
    neither a parsed tag (crash) nor a live escape sequence (window title, clipboard)."""
    folder = tmp_path / "runs[/z]"
    folder.mkdir(parents=True)
    db = folder / "a\x1b]0;pwned\x07[/x].duckdb"
    args = [a if a != str(workspace["db"]) else str(db) for a in workspace["args"] if a != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "\x1b]0;" not in err and "\x07" not in err
    assert "runs[/z]" in err and "␛]0;pwned␇[/x].duckdb" in err


def test_cutoff_of_another_method_is_not_kept_silently(workspace, tmp_path, capsys):
    """τ = 0.16 is calibrated for soft_wpmi: a relabel with wpmi says how many neurons pass and
    suggests a τ on wpmi's scale; the same method keeps the base run's τ without a word."""
    db = tmp_path / "tau.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    assert main(["relabel", str(db), "--cutoff", "0.3", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["relabel", str(db), "--similarity", "wpmi"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "calibrated for soft_wpmi scores, not wpmi" in line]
    assert len(notes) == 1, err
    with open_cache(db) as r:
        runs = r.runs()
        assert [x["cutoff"] for x in runs] == [0.16, 0.3, 0.16]
        scores = r.neurons(3)["similarity"]
    share = round(100 * float(np.mean(scores > 0.16)))
    assert f"{share}% of neurons pass it" in notes[0]
    suggested = float(re.search(r"--cutoff (\S+) keeps the top 10%", notes[0]).group(1))
    assert np.mean(scores > suggested) == pytest.approx(0.1, abs=0.05)
    assert main(["relabel", str(db), "--run", "2"]) == 0  # same method as run 2: its τ, no note
    assert "calibrated for" not in capsys.readouterr().err
    with open_cache(db) as r:
        assert r.run()["cutoff"] == 0.3


def _labels(db: Path, run_id: int) -> list[tuple]:
    return q(
        db,
        "SELECT n.layer, n.unit, c.text, n.similarity, n.interpretable FROM neurons n "
        "JOIN concepts c USING (concept_id) WHERE run_id = ? ORDER BY 1, 2",
        [run_id],
    )


def _top_concepts(db: Path, run_id: int) -> list[tuple]:
    return q(
        db,
        "SELECT nc.layer, nc.unit, nc.rank, c.text, nc.score FROM neuron_concepts nc "
        "JOIN concepts c USING (concept_id) WHERE run_id = ? ORDER BY 1, 2, 3",
        [run_id],
    )


def test_reindex_keeps_relabel_runs_and_metrics_that_still_apply(workspace, tmp_path, capsys):
    """Same model, weights and probe: the relabel run and both runs' metrics survive, renumbered,
    and equal what relabelling the new cache computes."""
    db = tmp_path / "again.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    args = _args_with_db(workspace, db)
    assert main(args) == 0  # only an index run there: nothing to say
    assert "will be replaced" not in capsys.readouterr().err
    relabel = [
        "relabel",
        str(db),
        "--similarity",
        "cos",
        "--cutoff",
        "0.1",
        "--concepts",
        "broden",
        "--quiet",
    ]
    assert main(relabel) == 0
    with duckdb.connect(str(db)) as con:
        con.execute(
            "INSERT INTO metrics VALUES (2, 'evaluate', 'top1', 0.5, NULL), (1, 'evaluate', 'top1', 0.25, NULL)"
        )
    before = {"labels": _labels(db, 2), "top": _top_concepts(db, 2), "index": _labels(db, 1)}
    old_run = q(db, "SELECT concept_set, similarity, cutoff, clip_key FROM runs WHERE run_id = 2")
    capsys.readouterr()
    assert main([a for a in args if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert "will be replaced when this index finishes" in first, err
    assert "1 relabel run and 2 stored metrics are kept only if" in first
    assert "kept 1 relabel run and 2 stored metrics of the old again.duckdb" in err, err
    assert q(db, "SELECT run_id, kind, parent_run_id FROM runs ORDER BY run_id") == [
        (1, "index", None),
        (2, "relabel", 1),
    ]
    assert q(db, "SELECT concept_set, similarity, cutoff, clip_key FROM runs WHERE run_id = 2") == old_run
    assert _labels(db, 2) == before["labels"] and _top_concepts(db, 2) == before["top"]
    assert _labels(db, 1) == before["index"]
    assert sorted(q(db, "SELECT run_id, value FROM metrics")) == [(1, 0.25), (2, 0.5)]
    with open_cache(db) as r:  # the file passes the full validation every command does
        assert [x["run_id"] for x in r.runs()] == [1, 2]
    # and it is what relabelling the new cache computes
    assert main(relabel) == 0
    assert _labels(db, 3) == before["labels"] and _top_concepts(db, 3) == before["top"]


def test_reindex_drops_what_no_longer_applies_and_says_why(workspace, tmp_path, capsys):
    db = tmp_path / "again.duckdb"
    db.write_bytes(workspace["db"].read_bytes())
    assert main(["relabel", str(db), "--similarity", "cos", "--cutoff", "0.1", "--quiet"]) == 0
    with duckdb.connect(str(db)) as con:
        con.execute(
            "INSERT INTO metrics VALUES (2, 'evaluate', 'top1', 0.5, NULL), (1, 'evaluate', 'top1', 0.25, NULL)"
        )
    capsys.readouterr()
    args = [a for a in _args_with_db(workspace, db) if a != "--quiet"] + ["--pool", "max"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (
        "dropped 1 relabel run and 2 stored metrics of the old again.duckdb: the activations of conv1, layer1 and layer2 changed"
        in err
    ), err
    assert q(db, "SELECT run_id, kind FROM runs") == [(1, "index")]
    assert q(db, "SELECT count(*) FROM metrics") == [(0,)]
    assert q(db, "SELECT count(*) FROM neurons WHERE run_id <> 1") == [(0,)]


def _args_with_db(workspace, db, drop=()):
    args = [a if a != str(workspace["db"]) else str(db) for a in workspace["args"]]
    for opt in drop:
        i = args.index(opt)
        del args[i : i + 2]
    return args


def test_embeddings_from_another_cache_skip_clip_entirely(workspace, tmp_path, monkeypatch):
    """A second model on the same probe takes the CLIP side from the first cache: CLIP is never
    loaded, and the result equals an index that ran CLIP itself."""
    from dissect_tui import clip_backend

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP loaded although every embedding was available")

    monkeypatch.setattr(clip_backend, "load_clip", no_clip)
    db = tmp_path / "second.duckdb"
    args = _args_with_db(workspace, db, drop=("--clip",))
    assert main([*args, "--embeddings-from", str(workspace["db"])]) == 0
    with open_cache(db) as new, open_cache(workspace["db"]) as old:
        np.testing.assert_array_equal(new.image_embeddings()[1], old.image_embeddings()[1])
        run, first = new.run(), old.run()
        assert (run["clip_key"], run["clip_model"], run["clip_pretrained"]) == (
            first["clip_key"],
            first["clip_model"],
            first["clip_pretrained"],
        )
        assert run["settings"]["embeddings_source"]["path"] == str(workspace["db"].resolve())
        assert list(new.neurons(1)["label"]) == list(old.neurons(1)["label"])
        np.testing.assert_allclose(new.neurons(1)["similarity"], old.neurons(1)["similarity"], rtol=1e-5)


def test_embeddings_from_refuses_another_probe_and_missing_concepts(workspace, tmp_path, capsys):
    other_images = tmp_path / "imgs"
    make_image_tree(other_images, 10, broken=False)
    args = _args_with_db(workspace, tmp_path / "x.duckdb", drop=("--clip", "--probe"))
    rc = main([*args, "--probe", str(other_images), "--embeddings-from", str(workspace["db"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "was built on other probe images" in err, err
    # 3k concepts were never encoded there, and its CLIP "moved": say what is missing
    args = _args_with_db(workspace, tmp_path / "y.duckdb", drop=("--clip", "--concepts"))
    rc = main(
        [*args, "--concepts", "3k", "--embeddings-from", str(workspace["db"]), "--clip", "ViT-B-32:/gone.pt"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "concepts missing from" in err, err
    # with the CLIP available only the missing ones are encoded
    rc = main(
        [
            *args,
            "--concepts",
            "3k",
            "--embeddings-from",
            str(workspace["db"]),
            "--clip",
            workspace["clip"].spec,
        ]
    )
    assert rc == 0
    with open_cache(tmp_path / "y.duckdb") as r:
        assert r.run()["n_concepts"] == len(load_concepts("3k").texts)


def test_the_run_records_which_scoring_path_and_decoder_ran(workspace):
    from dissect_tui.cpu_kernel import active_path

    with open_cache(workspace["db"]) as r:
        settings = r.run()["settings"]
    assert settings["scoring_path"] == active_path("cpu") and settings["decode_used"] == "cpu"


def test_a_large_cache_is_announced_and_one_that_cannot_fit_is_refused(
    workspace, tmp_path, monkeypatch, capsys
):
    import shutil
    from collections import namedtuple

    from dissect_tui import indexer

    monkeypatch.setattr(indexer, "LARGE_CACHE_BYTES", 0)  # the tiny run counts as large
    db = tmp_path / "big.duckdb"
    args = [a for a in _args_with_db(workspace, db) if a != "--quiet"]
    assert main(args) == 0
    n_neurons = sum(WIDTHS.values())
    notes = [x for x in capsys.readouterr().err.splitlines() if "GiB of activations" in x]
    assert len(notes) == 1 and f"× {n_neurons:,} neurons" in notes[0], notes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    db.unlink()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "free but the cache needs about" in err.splitlines()[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_progress_moves_image_by_image_and_counts_each_image_once(workspace, tmp_path):
    """In-process decoding advances the images bar per image (it stood still for a whole batch)."""
    from dissect_tui.indexer import run_index
    from dissect_tui.progress import NullProgress
    from dissect_tui.settings import IndexSettings

    class Recorder(NullProgress):
        def __init__(self):
            self.steps: list[int] = []
            self.total = None

        def start(self, stage, total, unit="items"):
            if stage == "images":
                self.total = total

        def advance(self, stage, n=1):
            if stage == "images":
                self.steps.append(n)

    rec = Recorder()
    settings = IndexSettings(
        model=workspace["factory"],
        layers=LAYERS,
        probe=[str(workspace["images"])],
        clip=workspace["clip"].spec,
        concepts="cifar100",
        db=tmp_path / "p.duckdb",
        device="cpu",
        batch_size=16,
    )
    run_index(settings, rec)
    assert sum(rec.steps) == rec.total == N_IMAGES + len(BROKEN_FILES)
    assert set(rec.steps) == {1}
