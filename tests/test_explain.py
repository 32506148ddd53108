"""The CLIP bridge for concept queries and compositions, with a tiny random open_clip model."""

from __future__ import annotations

import numpy as np
import pytest
from cache_factory import make_cache
from tiny_clip import make_tiny_clip

from dissect_tui.errors import UserError
from dissect_tui.explain import Cancelled, Explainer
from dissect_tui.store.browse import load_neuron_table
from dissect_tui.store.reader import open_cache
from dissect_tui.store.writer import CacheWriter


def make_clip_cache(tmp_path):
    """A synthetic cache whose run points at a tiny CLIP on disk (same 16-d embedding width)."""
    tiny = make_tiny_clip(tmp_path / "clip")
    base = make_cache(tmp_path / "base.duckdb", dim=tiny.embed_dim)
    path = tmp_path / "clip.duckdb"
    with CacheWriter(path, base=base) as w:
        w.update_run(1, clip_model=str(tiny.config_path), clip_pretrained=str(tiny.checkpoint_path))
        w.commit()
    return path, tiny


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    return make_clip_cache(tmp_path_factory.mktemp("explain"))


def explainer(path) -> tuple[Explainer, object]:
    reader = open_cache(path)
    return Explainer(lambda: type(reader)(reader.con.cursor(), reader.path), reader.run()), reader


def soft_wpmi_reference(top_rows, img, lse, new, a=10.0, lam=1.0):
    """docs/METHOD.md's SoftWPMI for a text added to the run's concept set, written out in numpy."""
    ap = a * (img @ new.T)  # [N, C]
    logq = ap - np.logaddexp(lse[:, None], ap)
    k, r = top_rows.shape
    p = 0.998 - np.arange(r) * (0.998 - 0.97) / 100
    logp = np.log(1 + p[None, :, None] * (np.exp(logq[top_rows]) - 1) + 1e-7).sum(axis=1)  # [K, C]
    prior = np.logaddexp.reduce(logp, axis=0) - np.log(k)
    return logp - lam * prior


def test_query_scores_match_softwpmi_for_every_layer(clip_cache):
    path, _ = clip_cache
    ex, reader = explainer(path)
    try:
        table = load_neuron_table(reader, 1)
        texts = ["a red car", "dog", "ünïcode 'quoted' 50%"]
        got = ex.query_scores(texts, table)
        assert got.shape == (len(table), 3) and np.isfinite(got).all()
        new = ex.encode(texts).numpy().astype(np.float64)
        ids, img = reader.image_embeddings()
        _, lse = reader.image_softmax(1)
        for li, layer in enumerate(table.layers):
            top_ids = reader.layer_top_images(layer, n=100)
            rows = np.searchsorted(ids, top_ids)
            want = soft_wpmi_reference(rows, img.astype(np.float64), lse.astype(np.float64), new)
            where = np.flatnonzero(table.layer_idx == li)
            np.testing.assert_allclose(got[where], want[table.unit[where]], rtol=1e-4, atol=1e-4)
    finally:
        reader.close()


def test_compose_pairs_from_the_neurons_top_concepts(clip_cache):
    path, _ = clip_cache
    ex, reader = explainer(path)
    try:
        singles = [r[3] for r in reader.neuron_concepts(1, "layer1", 3, limit=4)]
        seen = []
        breadth, pairs, best_singles = ex.compose("layer1", 3, 4, progress=lambda d, t: seen.append((d, t)))
    finally:
        reader.close()
    assert breadth == 4
    assert sorted(t for t, _ in pairs) == sorted(f"{a} {b}" for a in singles for b in singles if a != b)
    assert sorted(t for t, _ in best_singles) == sorted(singles)
    scores = [s for _, s in pairs]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)


def test_compose_can_be_cancelled(clip_cache):
    path, _ = clip_cache
    ex, reader = explainer(path)
    try:
        with pytest.raises(Cancelled):
            ex.compose("conv1", 0, 10, cancelled=lambda: True)
    finally:
        reader.close()


def test_missing_clip_is_one_clear_error(tmp_path):
    path = make_cache(tmp_path / "c.duckdb")  # its run names CLIP "tiny:none", not loadable
    ex, reader = explainer(path)
    try:
        table = load_neuron_table(reader, 1)
        with pytest.raises(UserError, match=r"concept queries need this run's CLIP \(tiny:none\)"):
            ex.query_scores(["dog"], table)
    finally:
        reader.close()


@pytest.mark.parametrize("bad", [None, "x", float("inf"), -3, 1e308])
def test_damaged_hyperparameters_are_one_clear_error(bad):
    from dissect_tui.explain import query_parameters

    run = {"run_id": 4, "similarity": "soft_wpmi", "hyperparameters": {"a": bad, "lam": 1.0}}
    with pytest.raises(UserError, match="run 4 records unusable hyperparameters"):
        query_parameters(run)


def test_query_parameters_follow_the_runs_method():
    from dissect_tui.explain import query_parameters

    assert query_parameters({"similarity": "wpmi", "hyperparameters": {"a": 2.0, "lam": 0.6}}) == (2.0, 0.6)
    assert query_parameters({"similarity": "cos", "hyperparameters": {}}) == (10.0, 1.0)
    assert query_parameters({"similarity": "soft_wpmi", "hyperparameters": "not json"}) == (10.0, 1.0)
