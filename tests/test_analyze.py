"""`dissect-tui analyze weights|predict|interpretability` and their maths in dissect_tui.evaluation.

Caches are hand-built (tests.test_evaluate.build_cache) with planted weights, activations and
labels; expected values are computed here with plain loops and numpy, not with project code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dissect_tui import text_similarity as ts
from dissect_tui.cli import main
from dissect_tui.commands.analyze import bar_plot, hbar, parse_levels
from dissect_tui.errors import UserError
from dissect_tui.evaluation import (
    crossing_thresholds,
    interpretable_fraction,
    pearson,
    predict_from_descriptions,
    weight_similarity,
)
from dissect_tui.store import open_cache
from dissect_tui.store.metrics import read_metrics
from tests.cache_factory import make_cache
from tests.test_evaluate import CLASSES, EXTRA, HashBagEncoder, build_cache, direct_cos, write_classes

CONCEPTS = [*CLASSES, *EXTRA]
C = len(CLASSES)


def metrics_of(path, analysis: str) -> dict[str, float]:
    with open_cache(path) as r:
        return {m: v for _, _, m, v, _ in read_metrics(r, analysis=analysis)}


def planted_weights(k: int = 12, seed: int = 0) -> np.ndarray:
    """W [C, K]: class c weights neuron c (labelled with c's name) far above everything else."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 0.2, size=(C, k))
    w[np.arange(C), np.arange(C)] = 2.0
    return w.astype(np.float32)


def planted_inputs(n: int = 60, k: int = 12, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(acts [N, K], true class [N]): image i excites neuron t_i strongly."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) % C
    a = rng.uniform(0.0, 0.5, size=(n, k))
    a[np.arange(n), t] = 3.0
    return a.astype(np.float32), t


# --------------------------------------------------------------------------------------
# weights


def expected_weight_profile(w: np.ndarray, labels: list[str], max_k: int) -> tuple[list[float], float]:
    enc = HashBagEncoder()
    kth = []
    for k in range(max_k):
        vals = []
        for c in range(w.shape[0]):
            j = sorted(range(w.shape[1]), key=lambda j, c=c: -w[c, j])[k]
            vals.append(direct_cos(enc, CLASSES[c], labels[j]))
        kth.append(float(np.mean(vals)))
    s = np.array([[direct_cos(enc, CLASSES[c], lab) for lab in labels] for c in range(w.shape[0])])
    return kth, float(np.corrcoef(w.ravel(), s.ravel())[0, 1])


def test_weight_similarity_on_planted_weights() -> None:
    enc = HashBagEncoder()
    labels = [CONCEPTS[i] for i in range(12)]
    w = planted_weights()
    s = enc.encode(CLASSES) @ enc.encode(labels).T
    res = weight_similarity(w, s, max_k=4, top_weights=20)
    kth, corr = expected_weight_profile(w, labels, 4)
    assert res.kth[0] == pytest.approx(1.0, abs=1e-5)
    assert res.kth == pytest.approx(kth, abs=1e-5)
    assert res.top_k_mean[1] == pytest.approx((kth[0] + kth[1]) / 2, abs=1e-5)
    assert res.corr_all == pytest.approx(corr, abs=1e-5) and res.corr_all > 0
    top = np.argsort(-w.ravel())[:20]
    assert res.n_top == 20
    assert res.corr_top == pytest.approx(np.corrcoef(w.ravel()[top], s.ravel()[top])[0, 1], abs=1e-5)
    assert res.all_mean == pytest.approx(s.mean(), abs=1e-6)


def test_weight_similarity_unrelated_weights_lose_the_signal() -> None:
    enc = HashBagEncoder()
    labels = [CONCEPTS[i] for i in range(12)]
    s = enc.encode(CLASSES) @ enc.encode(labels).T
    w = planted_weights()
    w[np.arange(C), np.arange(C)] = 0.0  # the same-name neuron now gets the lowest weight
    res = weight_similarity(w, s, max_k=3, top_weights=10**6)
    assert res.kth[0] < 1.0 and res.corr_all < 0
    assert res.n_top == w.size and res.corr_top == pytest.approx(res.corr_all)


def test_pearson_matches_numpy_and_is_nan_for_constants() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson(np.ones(5), np.arange(5)))


def test_analyze_weights_cli(tmp_path, capsys) -> None:
    w = planted_weights()
    db = build_cache(tmp_path / "c.duckdb", weights=w, in_labels=list(range(12)))
    rc = main(
        [
            "analyze",
            "weights",
            str(db),
            "--classes",
            str(write_classes(tmp_path)),
            "--mpnet",
            "none",
            "--k",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Pearson" in out and "k=1 │" in out and "█" in out
    got = metrics_of(db, "weights")
    kth, corr = expected_weight_profile(w, CONCEPTS[:12], 3)
    assert got["clip.k1"] == pytest.approx(1.0, abs=1e-5)
    assert [got["clip.k2"], got["clip.k3"]] == pytest.approx(kth[1:], abs=1e-5)
    assert got["clip.pearson_all"] == pytest.approx(corr, abs=1e-5) and got["clip.pearson_all"] > 0
    assert got["clip.n_top"] == w.size and "clip.pearson_top" in got and "mpnet.k1" not in got


def test_analyze_weights_with_mpnet_stand_in(tmp_path, capsys, monkeypatch) -> None:
    from tests.test_evaluate import fake_sentence_transformers

    fake_sentence_transformers(monkeypatch)
    db = build_cache(tmp_path / "c.duckdb", weights=planted_weights(), in_labels=list(range(12)))
    rc = main(["analyze", "weights", str(db), "--classes", str(write_classes(tmp_path)), "--mpnet", "m"])
    assert rc == 0, capsys.readouterr()
    got = metrics_of(db, "weights")
    assert got["mpnet.k1"] == pytest.approx(1.0, abs=1e-5) and got["mpnet.pearson_all"] > 0


def test_analyze_weights_needs_stored_weights(tmp_path, capsys) -> None:
    db = build_cache(tmp_path / "c.duckdb", store_weights=False)
    assert main(["analyze", "weights", str(db), "--classes", str(write_classes(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "stores no classifier weights" in err and err.count("\n") == 1


def test_analyze_class_list_must_match_units(tmp_path, capsys) -> None:
    db = build_cache(tmp_path / "c.duckdb")
    assert main(["analyze", "predict", str(db), "--classes", str(write_classes(tmp_path, CLASSES[:4]))]) == 2
    err = capsys.readouterr().err
    assert "has 4 names but layer fc has 6 units" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------
# predict


def expected_prediction_accuracy(w, a, labels) -> float:
    """Direct loops over images: the paper's A.6 procedure with the hash encoder."""
    enc = HashBagEncoder()
    hits = 0
    for i in range(a.shape[0]):
        logits = [sum(w[c, j] * a[i, j] for j in range(a.shape[1])) for c in range(w.shape[0])]
        c = int(np.argmax(logits))
        j = int(np.argmax([w[c, j] * a[i, j] for j in range(a.shape[1])]))
        described = int(np.argmax([direct_cos(enc, labels[j], name) for name in CLASSES]))
        hits += described == c
    return hits / a.shape[0]


def test_predict_from_descriptions_planted_and_broken() -> None:
    enc = HashBagEncoder()
    w = planted_weights()
    a, t = planted_inputs()
    labels = [CONCEPTS[i] for i in range(12)]
    sim = enc.encode(labels) @ enc.encode(CLASSES).T  # [K, C]
    res = predict_from_descriptions(a @ w.T, a, w, sim)
    assert res.accuracy == 1.0 and res.n_images == len(a)
    assert (res.network_pred == t).all() and (res.neuron == t).all()
    assert res.linear_agreement == 1.0

    broken = list(labels)
    broken[0], broken[1] = "dog", CLASSES[2]  # neuron 1 now describes class 2
    sim_b = enc.encode(broken) @ enc.encode(CLASSES).T
    res_b = predict_from_descriptions(a @ w.T, a, w, sim_b)
    exp = expected_prediction_accuracy(w, a, broken)
    assert res_b.accuracy == pytest.approx(exp)
    assert res_b.accuracy <= (C - 1) / C  # at least the images of class 1 are now wrong


def test_predict_linear_agreement_flags_mismatched_logits() -> None:
    w = planted_weights()
    a, _ = planted_inputs()
    logits = np.roll(a @ w.T, 1, axis=1)  # not what W·a gives
    res = predict_from_descriptions(logits, a, w, np.eye(12, C))
    assert res.linear_agreement == 0.0


def test_analyze_predict_cli(tmp_path, capsys) -> None:
    w = planted_weights()
    a, _ = planted_inputs()
    labels_idx = list(range(12))
    labels_idx[1] = CLASSES.index("fire truck")  # neuron 1 describes class 2: images of class 1 fail
    db = build_cache(tmp_path / "c.duckdb", weights=w, in_acts=a, in_labels=labels_idx)
    rc = main(["analyze", "predict", str(db), "--classes", str(write_classes(tmp_path))])
    out = capsys.readouterr().out
    assert rc == 0, out
    got = metrics_of(db, "predict")
    exp = expected_prediction_accuracy(w, a, [CONCEPTS[i] for i in labels_idx])
    assert got["accuracy"] == pytest.approx(exp) and exp == pytest.approx(5 / 6)
    assert got["n_images"] == len(a) and got["linear_agreement"] == 1.0
    assert "most used neurons" in out


def test_analyze_predict_flags_logits_that_weights_do_not_reproduce(tmp_path, capsys) -> None:
    w = planted_weights()
    a, _ = planted_inputs()
    db = build_cache(tmp_path / "c.duckdb", weights=w, in_acts=a, fc_acts=np.roll(a[:, :C], 1, axis=1))
    assert main(["analyze", "predict", str(db), "--classes", str(write_classes(tmp_path)), "--no-save"]) == 0
    assert "reproduces the stored prediction for only" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------
# interpretability


def test_crossing_thresholds_known_values() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert crossing_thresholds(s, [0.1, 0.5, 0.55, 1.0]) == pytest.approx([1.0, 0.6, 0.5, 0.1])
    assert interpretable_fraction(s, 0.16) == 0.9
    assert interpretable_fraction(s, 0.6) == 0.4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crossing_thresholds_against_direct_scan(seed) -> None:
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(size=37), 2)  # ties included
    levels = [0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    for level, tau in zip(levels, crossing_thresholds(s, levels), strict=True):
        # direct: the largest score t with mean(s > t') >= level for every t' < t
        cands = sorted(set(s.tolist()))
        direct = max(t for t in cands if np.mean(s > t - 1e-9) >= level)
        assert tau == pytest.approx(direct)
        assert np.mean(s > tau - 1e-9) >= level and np.mean(s > tau) < level


def test_analyze_interpretability_cli(tmp_path, capsys) -> None:
    scores = np.linspace(0.0, 0.4, 12)
    db = build_cache(tmp_path / "c.duckdb", in_scores=scores)
    rc = main(["analyze", "interpretability", str(db), "--levels", "0.25,0.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    got = metrics_of(db, "interpretability")
    assert got["layer4.fraction"] == pytest.approx(np.mean(scores > 0.16))
    assert got["layer4.tau@0.25"] == pytest.approx(np.sort(scores)[::-1][2])
    assert got["layer4.tau@0.5"] == pytest.approx(np.sort(scores)[::-1][5])
    assert got["fc.fraction"] == 1.0  # stored fc scores are 1.0
    rc = main(["analyze", "interpretability", str(db), "--cutoff", "0.3"])
    assert rc == 0
    assert metrics_of(db, "interpretability")["layer4.fraction"] == pytest.approx(np.mean(scores > 0.3))


def test_parse_levels() -> None:
    assert parse_levels("0.1, 0.5,1") == [0.1, 0.5, 1.0]
    for bad in ("", "x", "0", "1.5"):
        with pytest.raises(UserError):
            parse_levels(bad)


def test_bars() -> None:
    assert hbar(1.0, 0.0, 1.0, 10) == "█" * 10
    assert hbar(0.0, 0.0, 1.0, 10) == ""
    assert hbar(0.55, 0.0, 1.0, 10) == "█" * 5 + "▌"
    plot = bar_plot(["a", "bb"], [0.5, 1.0], lo=0.0, width=4).splitlines()
    assert plot[0] == " a │██   0.5000" and plot[1] == "bb │████ 1.0000"


# --------------------------------------------------------------------------------------
# the shared synthetic cache (tests/cache_factory.py)


def test_all_analyses_on_the_factory_cache(tmp_path, capsys, monkeypatch) -> None:
    db = make_cache(tmp_path / "f.duckdb")
    classes = write_classes(tmp_path, [f"class {i}" for i in range(10)])
    # the factory's stored embeddings are random: use one encoder for everything via --clip
    monkeypatch.setattr(ts, "load_clip_text", lambda spec, device="cpu": HashBagEncoder())
    common = ["--classes", str(classes), "--clip", "stand-in", "--device", "cpu"]
    assert main(["analyze", "weights", str(db), *common, "--mpnet", "none"]) == 0
    assert main(["analyze", "predict", str(db), *common]) == 0
    assert main(["analyze", "interpretability", str(db)]) == 0
    assert main(["evaluate", str(db), *common, "--mpnet", "none"]) == 0
    capsys.readouterr()
    with open_cache(db) as r:
        analyses = {a for _, a, _, _, _ in read_metrics(r)}
    assert analyses == {"weights", "predict", "interpretability", "evaluate"}
    got = metrics_of(db, "predict")
    assert 0.0 <= got["accuracy"] <= 1.0 and got["n_images"] == 80


def test_redirected_output_is_never_cut_and_hostile_names_are_text(tmp_path, capsys) -> None:
    """Piped to a file, tables keep every name and number whole; names from the cache can neither
    inject markup ([/x] crashed) nor terminal escapes."""
    hostile = "layer[/x]_\x1b]0;pwned\x07_with_a_rather_long_descriptive_name_" + "x" * 60
    db = make_cache(tmp_path / "h.duckdb", layers={hostile: 8, "fc": 10})
    rc = main(["analyze", "interpretability", str(db), "--levels", "0.1,0.25,0.5,0.75,0.9,0.95,0.99"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert "layer[/x]_␛]0;pwned␇_with_a_rather_long_descriptive_name_" + "x" * 60 in out
    assert "…" not in out  # no cell is cut
    with open_cache(db) as r:
        scores = r.neurons(1)["similarity"]
    assert f"{np.quantile(scores, 0.5):.3f}"[:3] in out
