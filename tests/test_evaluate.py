"""`dissect-tui evaluate`, dissect_tui.evaluation label metrics and dissect_tui.text_similarity.

Known-answer caches are built by hand with the real CacheWriter. Their stored "CLIP" concept
embeddings come from a hash bag-of-words encoder (HashBagEncoder), the same test double the
unit tests pass as encoder, so the CLI's stored-embedding path gives numbers we can compute
independently: identical texts have cosine 1, different texts less.
"""

from __future__ import annotations

import json
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from dissect_tui import text_similarity as ts
from dissect_tui.cli import main
from dissect_tui.errors import OfflineError
from dissect_tui.evaluation import (
    accuracy_at,
    label_metrics,
    match_class_names,
    paired_cosine,
    ranks_in_lists,
)
from dissect_tui.store import CacheWriter, open_cache
from dissect_tui.store.metrics import read_metrics

DIM = 48
CLASSES = ["Golden Retriever", "tabby cat", "fire truck", "oak tree", "sea", "red wine"]
EXTRA = ["dog", "water", "vehicle", "leaf", "striped", "glass", "sky", "wheel"]


class HashBagEncoder:
    """Test double for the CLIP/mpnet text encoders: sum of per-word random vectors, normalised."""

    name = "hash-bag"

    def __init__(self, dim: int = DIM, salt: str = "") -> None:
        self.dim = dim
        self.salt = salt
        self.calls = 0

    def word(self, w: str) -> np.ndarray:
        return np.random.default_rng(zlib.crc32((self.salt + w).encode())).normal(size=self.dim)

    def encode(self, texts) -> np.ndarray:
        self.calls += 1
        rows = [sum(self.word(w) for w in t.lower().split()) for t in texts]
        out = np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def direct_cos(enc: HashBagEncoder, a: str, b: str) -> float:
    """Cosine of two texts computed without any project code."""
    u = sum(enc.word(w) for w in a.lower().split())
    v = sum(enc.word(w) for w in b.lower().split())
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def build_cache(
    path: Path,
    *,
    classes: list[str] = CLASSES,
    concepts: list[str] | None = None,
    fc_ranked: np.ndarray | None = None,
    in_labels: list[int] | None = None,
    weights: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    in_acts: np.ndarray | None = None,
    fc_acts: np.ndarray | None = None,
    image_emb: np.ndarray | None = None,
    store_weights: bool = True,
    similarity: str = "soft_wpmi",
    target: str = "tiny",
    in_scores: np.ndarray | None = None,
    cutoff: float = 0.16,
    seed: int = 0,
) -> Path:
    """A cache with layers layer4 (K neurons) -> fc (one unit per class), everything planted.

    fc_ranked [C, T]: each fc unit's stored top concepts (indices into ``concepts``), label first.
    in_labels [K]: concept index of each layer4 neuron's label. Defaults: labels equal class names.
    """
    rng = np.random.default_rng(seed)
    concepts = list(concepts if concepts is not None else [*CLASSES, *EXTRA])
    c = len(classes)
    if fc_ranked is None:
        fc_ranked = np.stack([np.roll(np.arange(len(concepts)), -i)[:5] for i in range(c)])
    if in_labels is None:
        in_labels = list(range(c)) * 2
    k = len(in_labels)
    n = 40
    if weights is None:
        weights = rng.normal(size=(c, k)).astype(np.float32)
    if in_acts is None:
        in_acts = np.abs(rng.normal(size=(n, k))).astype(np.float32)
    n = in_acts.shape[0]
    if fc_acts is None:
        fc_acts = in_acts @ weights.T + (0 if bias is None else bias)
    if image_emb is None:
        image_emb = rng.normal(size=(n, DIM)).astype(np.float32)
        image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    con_emb = HashBagEncoder().encode(concepts)
    ids = np.arange(n)
    with CacheWriter(path) as w:
        run_id = w.add_run(
            kind="index",
            target=target,
            target_weights="none",
            clip_model="hash",
            clip_pretrained="bag",
            clip_key="hash:bag",
            probe=["synthetic"],
            n_images=n,
            n_failed_images=0,
            concept_set="test",
            n_concepts=len(concepts),
            layers=["layer4", "fc"],
            pool="mean",
            similarity=similarity,
            hyperparameters={"a": 10.0, "lam": 1.0},
            cutoff=cutoff,
            device="cpu",
            precision="fp32",
            batch_size=8,
            stage_seconds={},
            settings={},
        )
        w.write_layers(
            [
                {"layer": "layer4", "n_units": k, "module_type": "Sequential"},
                {"layer": "fc", "n_units": c, "module_type": "Linear"},
            ]
        )
        w.write_images([f"/p/{i}.jpg" for i in ids], ["synthetic"] * n, [(8, 8)] * n, [None] * n)
        cids = w.concept_ids(concepts)
        w.write_run_concepts(run_id, cids)
        w.write_concept_embeddings("hash:bag", cids, con_emb)
        w.write_image_embeddings(ids, image_emb)
        for layer, acts in (("layer4", in_acts), ("fc", fc_acts)):
            w.write_activations(layer, ids, np.asarray(acts, dtype=np.float32))
        fc_scores = np.tile(np.linspace(1.0, 0.5, fc_ranked.shape[1]), (c, 1))
        w.write_neuron_concepts(run_id, "fc", cids[fc_ranked], fc_scores)
        w.write_neurons(
            run_id,
            "fc",
            [concepts[i] for i in fc_ranked[:, 0]],
            cids[fc_ranked[:, 0]],
            fc_scores[:, 0],
            cutoff,
        )
        lab = np.asarray(in_labels)
        if in_scores is None:
            in_scores = np.linspace(0.0, 0.4, k)
        w.write_neuron_concepts(run_id, "layer4", cids[lab][:, None], np.asarray(in_scores)[:, None])
        w.write_neurons(run_id, "layer4", [concepts[i] for i in lab], cids[lab], in_scores, cutoff)
        if store_weights:
            w.write_linear_weights("fc", "layer4", weights, bias)
        w.commit()
    return path


def write_classes(tmp_path: Path, classes: list[str] = CLASSES) -> Path:
    f = tmp_path / "classes.txt"
    f.write_text("\n".join(classes) + "\n", encoding="utf-8")
    return f


def metrics_of(path: Path, analysis: str) -> dict[str, float]:
    with open_cache(path) as r:
        return {m: v for _, _, m, v, _ in read_metrics(r, analysis=analysis)}


# --------------------------------------------------------------------------------------
# pure maths


def test_match_class_names_is_case_insensitive_and_reports_missing() -> None:
    idx = match_class_names(["Dog", "hot  dog", "cat"], ["dog", "HOT DOG", "fish", "Dog"])
    assert idx.tolist() == [0, 1, -1]


def test_ranks_accuracy_and_missing() -> None:
    ranked = np.array([[3, 1, 2], [2, 3, 1], [1, 2, 3], [1, 2, 3]])
    ranks = ranks_in_lists(ranked, np.array([3, 1, 9, -1]))
    assert ranks[:2].tolist() == [1.0, 3.0]
    assert np.isnan(ranks[2]) and np.isnan(ranks[3])
    assert accuracy_at(ranks, 1) == 0.25
    assert accuracy_at(ranks, 3) == 0.5


def test_label_metrics_identity_is_perfect() -> None:
    enc = HashBagEncoder()
    e = enc.encode(CLASSES)
    k = len(CLASSES)
    m = label_metrics(np.ones(k), np.arange(k), paired_cosine(e, e), None)
    assert m.top1 == 1.0 and m.top5 == 1.0 and m.mean_rank == 1.0 and m.median_rank == 1.0
    assert m.clip_cos == pytest.approx(1.0, abs=1e-6)
    assert m.mpnet_cos is None and m.n_matched == k


def test_label_metrics_truncated_lists_are_lower_bounds() -> None:
    ranks = np.array([1.0, 2.0, np.nan, 7.0])
    m = label_metrics(ranks, np.array([0, 1, 2, 3]), list_length=10)
    assert m.top1 == 0.25 and m.top5 == 0.5
    assert m.mean_rank == pytest.approx((1 + 2 + 11 + 7) / 4)
    assert m.median_rank == pytest.approx(4.5)
    assert any("lower bound" in n for n in m.notes)
    with pytest.raises(ValueError):
        label_metrics(ranks, np.array([0, 1, 2, 3]))


def test_unmatched_units_are_left_out_of_accuracy() -> None:
    m = label_metrics(np.array([1.0, np.nan, 2.0]), np.array([4, -1, 5]))
    assert m.n_matched == 2 and m.top1 == 0.5 and m.mean_rank == 1.5


# --------------------------------------------------------------------------------------
# text encoders


def test_encode_unique_encodes_each_text_once() -> None:
    enc = HashBagEncoder()
    texts = ["a b", "c", "a b", "c", "d"]
    out = ts.encode_unique(enc, texts)
    assert out.shape == (5, DIM) and enc.calls == 1
    np.testing.assert_allclose(out[0], out[2])
    np.testing.assert_allclose(out, enc.encode(texts), atol=1e-6)


def test_cached_encoder_loads_model_only_for_missing_texts() -> None:
    enc = HashBagEncoder()
    loads = []

    def factory():
        loads.append(1)
        return enc

    cached = ts.CachedTextEncoder(
        {t: v for t, v in zip(CLASSES, enc.encode(CLASSES), strict=True)}, factory, "c"
    )
    cached.encode(CLASSES[:3])
    assert loads == [] and cached.n_encoded == 0
    out = cached.encode(["tabby cat", "new text"])
    assert loads == [1] and cached.n_encoded == 1
    np.testing.assert_allclose(out, enc.encode(["tabby cat", "new text"]), atol=1e-6)


def fake_sentence_transformers(monkeypatch, fail: Exception | None = None) -> list[str]:
    """Install a stand-in `sentence_transformers` module whose model is a HashBagEncoder."""
    loaded: list[str] = []
    salt = "mpnet:"

    class SentenceTransformer:
        def __init__(self, name, device=None):
            if fail is not None:
                raise fail
            loaded.append(name)
            self.enc = HashBagEncoder(salt=salt)

        def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False):
            return self.enc.encode(texts)

    mod = types.ModuleType("sentence_transformers")
    mod.SentenceTransformer = SentenceTransformer
    monkeypatch.setitem(sys.modules, "sentence_transformers", mod)
    return loaded


def test_load_mpnet_missing_dependency(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ts.MissingDependency, match=r"pip install 'dissect-tui\[mpnet\]'"):
        ts.load_mpnet()


def test_load_mpnet_offline_names_the_local_folder_option(monkeypatch, tmp_path) -> None:
    fake_sentence_transformers(monkeypatch, fail=OSError("We couldn't connect to 'https://huggingface.co'"))
    with pytest.raises(OfflineError, match="--mpnet DIR") as exc:
        ts.load_mpnet("all-mpnet-base-v2")
    assert "\n" not in str(exc.value)
    folder = tmp_path / "broken-model"
    folder.mkdir()
    with pytest.raises(ts.UserError, match="not a sentence-transformers model folder"):
        ts.load_mpnet(str(folder))


def test_load_mpnet_local_folder(monkeypatch, tmp_path) -> None:
    loaded = fake_sentence_transformers(monkeypatch)
    enc = ts.load_mpnet(str(tmp_path))
    assert loaded == [str(tmp_path)]
    out = enc.encode(["sea", "sea", "oak tree"])
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


# --------------------------------------------------------------------------------------
# CLI end to end on hand-built caches


def test_evaluate_labels_equal_class_names(tmp_path, capsys) -> None:
    db = build_cache(tmp_path / "c.duckdb")
    rc = main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "none"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CLIP cos" in out and "100.0%" in out
    got = metrics_of(db, "evaluate")
    assert got["top1"] == 1.0 and got["top5"] == 1.0
    assert got["mean_rank"] == 1.0 and got["median_rank"] == 1.0
    assert got["clip_cos"] == pytest.approx(1.0, abs=1e-5)
    assert got["n_units"] == len(CLASSES) and got["n_matched"] == len(CLASSES)
    assert "mpnet_cos" not in got


def test_evaluate_shuffled_mapping(tmp_path, capsys) -> None:
    concepts = [*CLASSES, *EXTRA]
    m, c = len(concepts), len(CLASSES)
    rng = np.random.default_rng(3)
    # unit u: label = class perm[u]; true class planted at rank true_rank[u] (1-based)
    perm = np.array([0, 2, 1, 3, 5, 4])
    true_rank = np.array([1, 2, 3, 6, 4, 5])
    ranked = np.empty((c, 6), dtype=np.int64)
    for u in range(c):
        others = [i for i in rng.permutation(m) if i not in (u, perm[u])]
        row = [perm[u]] + others[:5] if perm[u] != u else [u] + others[:5]
        if perm[u] != u:
            row.insert(true_rank[u] - 1, u)
            row = row[:6]
        ranked[u] = row
    db = build_cache(tmp_path / "c.duckdb", fc_ranked=ranked)
    rc = main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "none"])
    assert rc == 0, capsys.readouterr()
    got = metrics_of(db, "evaluate")

    enc = HashBagEncoder()
    exp_cos = np.mean([direct_cos(enc, CLASSES[perm[u]], CLASSES[u]) for u in range(c)])
    exp_ranks = [1 if perm[u] == u else true_rank[u] for u in range(c)]
    assert got["clip_cos"] == pytest.approx(exp_cos, abs=1e-5)
    assert got["clip_cos"] < 1.0
    assert got["top1"] == pytest.approx(np.mean([r == 1 for r in exp_ranks]))
    assert got["top5"] == pytest.approx(np.mean([r <= 5 for r in exp_ranks]))
    assert got["mean_rank"] == pytest.approx(np.mean(exp_ranks))
    assert got["median_rank"] == pytest.approx(np.median(exp_ranks))


def test_evaluate_ranks_past_stored_lists_are_rescored(tmp_path, capsys, monkeypatch) -> None:
    concepts = [*CLASSES, *EXTRA]
    m, c = len(concepts), len(CLASSES)
    # stored lists of 3 that never contain the true class; a full ranking puts it at 3 + u + 1
    ranked = np.stack([[i for i in range(c, m)][u % 2 : u % 2 + 3] for u in range(c)])
    full = np.empty((c, m), dtype=np.int64)
    for u in range(c):
        rest = [i for i in range(m) if i != u and i not in ranked[u]]
        row = list(ranked[u]) + rest
        row.insert(3 + u, u)
        full[u] = row
    db = build_cache(tmp_path / "c.duckdb", concepts=concepts, fc_ranked=ranked)
    from dissect_tui.commands import evaluate as ev

    calls = []

    def fake_rescore(scope, method, hp, n_concepts):
        calls.append((method, n_concepts, tuple(scope.acts.shape)))
        return full

    monkeypatch.setattr(ev, "rescore_ranks", fake_rescore)
    rc = main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "none"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert calls == [("soft_wpmi", m, (40, c))]
    got = metrics_of(db, "evaluate")
    exp = [3 + u + 1 for u in range(c)]
    assert got["top1"] == 0.0
    assert got["mean_rank"] == pytest.approx(np.mean(exp))
    assert got["median_rank"] == pytest.approx(np.median(exp))


def test_evaluate_concept_set_without_class_names(tmp_path, capsys, monkeypatch) -> None:
    concepts = ["golden retriever dog", "cat", "truck", "tree", "ocean", "wine", "sky"]
    ranked = np.stack([np.roll(np.arange(len(concepts)), -u)[:3] for u in range(len(CLASSES))])
    db = build_cache(tmp_path / "c.duckdb", concepts=concepts, fc_ranked=ranked, in_labels=[0, 1, 2])
    classes = str(write_classes(tmp_path))

    # the class names have no stored embedding: the run's CLIP is needed and is not on this machine
    def offline(spec, device="cpu"):
        raise OfflineError(f"CLIP weights for {spec} are not on this machine")

    monkeypatch.setattr(ts, "load_clip_text", offline)
    assert main(["evaluate", str(db), "--classes", classes, "--mpnet", "none"]) == 2
    err = capsys.readouterr().err
    assert "--clip" in err and err.count("\n") == 1

    loads = []
    monkeypatch.setattr(
        ts, "load_clip_text", lambda spec, device="cpu": loads.append(spec) or HashBagEncoder()
    )
    assert main(["evaluate", str(db), "--classes", classes, "--mpnet", "none"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert loads == ["hash:bag"]
    assert "contains none of the class names" in out and f"{len(CLASSES)} texts were not in the cache" in out
    got = metrics_of(db, "evaluate")
    assert "top1" not in got and got["n_matched"] == 0
    enc = HashBagEncoder()
    exp = np.mean([direct_cos(enc, concepts[ranked[u, 0]], CLASSES[u]) for u in range(len(CLASSES))])
    assert got["clip_cos"] == pytest.approx(exp, abs=1e-5)


def test_evaluate_with_mpnet_stand_in(tmp_path, capsys, monkeypatch) -> None:
    loaded = fake_sentence_transformers(monkeypatch)
    perm = [1, 0, 2, 3, 4, 5]
    ranked = np.array([[p, *[(p + j) % 14 for j in range(1, 5)]] for p in perm])
    db = build_cache(tmp_path / "c.duckdb", fc_ranked=ranked)
    rc = main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "my-mpnet"])
    assert rc == 0, capsys.readouterr()
    assert loaded == ["my-mpnet"]
    got = metrics_of(db, "evaluate")
    enc = HashBagEncoder(salt="mpnet:")
    exp = np.mean([direct_cos(enc, CLASSES[p], CLASSES[u]) for u, p in enumerate(perm)])
    assert got["mpnet_cos"] == pytest.approx(exp, abs=1e-5) and got["mpnet_cos"] < 1


def test_evaluate_mpnet_unavailable_is_a_note(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    db = build_cache(tmp_path / "c.duckdb")
    rc = main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--no-save"])
    out = capsys.readouterr().out
    assert rc == 0 and "mpnet skipped" in out
    with open_cache(db) as r:
        assert read_metrics(r) == []


def test_evaluate_default_mpnet_offline_is_a_note_explicit_is_an_error(tmp_path, capsys, monkeypatch) -> None:
    fake_sentence_transformers(monkeypatch, fail=OSError("no network"))
    db = build_cache(tmp_path / "c.duckdb")
    classes = str(write_classes(tmp_path))
    assert main(["evaluate", str(db), "--classes", classes]) == 0
    assert "mpnet skipped" in capsys.readouterr().out
    assert main(["evaluate", str(db), "--classes", classes, "--mpnet", "all-mpnet-base-v2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--mpnet DIR" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--classes", "cifar100"], "has 100 names but layer fc has 6 units"),
        ([], "no class list is known"),
        (["--layer", "nope", "--classes", "cifar100"], "no layer 'nope'"),
        (["--run", "7"], "no run 7"),
    ],
)
def test_evaluate_bad_input_is_one_line(tmp_path, capsys, argv, message) -> None:
    db = build_cache(tmp_path / "c.duckdb")
    assert main(["evaluate", str(db), "--mpnet", "none", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_evaluate_without_weights_falls_back_to_fc(tmp_path, capsys) -> None:
    db = build_cache(tmp_path / "c.duckdb", store_weights=False)
    assert main(["evaluate", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "none"]) == 0
    assert metrics_of(db, "evaluate")["top1"] == 1.0


def test_default_classes_from_target() -> None:
    from dissect_tui.evaluation_data import default_classes

    assert default_classes("resnet50", 1000) == "imagenet"
    assert default_classes("vit_b_16", 1000) == "imagenet"
    assert default_classes("resnet18_places365", 365) == "places365"
    assert default_classes("my.py:make", 100) == "cifar100"
    assert default_classes("my.py:make", 7) is None


def test_evaluate_similarity_all_on_planted_data(tmp_path, capsys) -> None:
    pytest.importorskip("dissect_tui.scoring")
    concepts = [*CLASSES, *EXTRA]
    c = len(CLASSES)
    enc = HashBagEncoder()
    rng = np.random.default_rng(5)
    n = 240
    cls = np.arange(n) % c
    emb = enc.encode(concepts)[cls] + 0.05 * rng.normal(size=(n, DIM))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    fc_acts = (np.eye(c)[cls] * 3 + 0.1 * rng.normal(size=(n, c))).astype(np.float32)
    db = build_cache(
        tmp_path / "c.duckdb",
        in_acts=np.abs(rng.normal(size=(n, 12))).astype(np.float32),
        fc_acts=fc_acts,
        image_emb=emb,
    )
    rc = main(
        [
            "evaluate",
            str(db),
            "--classes",
            str(write_classes(tmp_path)),
            "--mpnet",
            "none",
            "--similarity",
            "all",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for method in ("soft_wpmi", "wpmi", "rank_reorder", "cos"):
        assert method in out
        got = metrics_of(db, f"evaluate:{method}")
        assert set(got) >= {"top1", "top5", "mean_rank", "clip_cos"}
        assert 0 <= got["top1"] <= got["top5"] <= 1
    # each unit fires exactly on images of its class, whose embedding is its class name's
    assert metrics_of(db, "evaluate:cos")["top1"] == 1.0
    assert metrics_of(db, "evaluate:soft_wpmi")["top1"] == 1.0
    assert metrics_of(db, "evaluate:soft_wpmi")["clip_cos"] == pytest.approx(1.0, abs=1e-5)
    with open_cache(db) as r:
        details = json.loads(read_metrics(r, analysis="evaluate:cos")[0][4])
    assert details["layer"] == "fc" and details["rank_scope"] == f"all {len(concepts)} concepts"


def test_evaluate_with_tiny_clip_override(tmp_path, capsys) -> None:
    tiny_clip = pytest.importorskip("tests.tiny_clip")
    tiny = tiny_clip.make_tiny_clip(tmp_path)
    db = build_cache(tmp_path / "c.duckdb")
    classes = str(write_classes(tmp_path))
    rc = main(
        ["evaluate", str(db), "--classes", classes, "--mpnet", "none", "--clip", tiny.spec, "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    got = metrics_of(db, "evaluate")
    # labels equal class names: cosine 1 in any text tower
    assert got["clip_cos"] == pytest.approx(1.0, abs=1e-4)
    assert "encoded with CLIP" in " ".join(out.split())
