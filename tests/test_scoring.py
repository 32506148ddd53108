"""scoring.py gives similarity.py's numbers from embeddings, whatever the chunking."""

from __future__ import annotations

import pytest
import torch

from dissect_tui import scoring, similarity
from dissect_tui.errors import UserError
from dissect_tui.methods import METHODS


def _emb(N=150, M=40, D=12, K=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=dtype), dim=1)
    acts = torch.randn(N, K, generator=g, dtype=dtype)
    return acts, img, T


# 1 GiB: one block; 20 kB: one pass over many row blocks; 4 kB: the concept-chunked two-pass path.
BUDGETS = [1 << 30, 20_000, 4_000]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("budget", BUDGETS)
def test_score_layer_equals_dense(method, budget):
    acts, img, T = _emb()
    dense = METHODS[method].dense(acts, img @ T.T)
    ref_vals, ref_idx = dense.topk(7, dim=1)
    out = scoring.score_layer(acts, img, T, method, top_concepts=7, memory_budget=budget)
    assert out.top_concepts.dtype == torch.long
    assert torch.equal(out.top_concepts, ref_idx)
    torch.testing.assert_close(out.top_scores, ref_vals, rtol=1e-10, atol=1e-10)
    if method in ("wpmi", "soft_wpmi"):
        a = METHODS[method].defaults()["a"]
        torch.testing.assert_close(out.image_lse, torch.logsumexp(a * (img @ T.T), dim=1))
    else:
        assert out.image_lse is None


@pytest.mark.parametrize("method", ["soft_wpmi", "wpmi"])
def test_hyperparameters_and_small_n(method):
    acts, img, T = _emb(N=30)  # fewer images than top_k: clamped
    hp = {"a": 5.0, "lam": 0.3, "top_k": 12}
    dense = METHODS[method].dense(acts, img @ T.T, **hp)
    out = scoring.score_layer(acts, img, T, method, top_concepts=40, memory_budget=50_000, **hp)
    assert out.top_scores.shape == (9, 40)
    ref_vals, ref_idx = dense.topk(40, dim=1)
    assert torch.equal(out.top_concepts, ref_idx)
    torch.testing.assert_close(out.top_scores, ref_vals, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("budget", [1 << 30, 80_000])
def test_score_layers_prior_is_per_layer(budget):
    acts, img, T = _emb(K=20)
    layers = {"a": acts[:, :4], "b": acts[:, 4:], "c": acts[:, 4:5]}
    out = scoring.score_layers(layers, img, T, "soft_wpmi", top_concepts=5, memory_budget=budget)
    for name, A in layers.items():
        ref_vals, ref_idx = similarity.soft_wpmi(A, img @ T.T).topk(5, dim=1)
        assert torch.equal(out[name].top_concepts, ref_idx)
        torch.testing.assert_close(out[name].top_scores, ref_vals, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64():
    acts, img, T = _emb(N=400, M=60)
    hi = scoring.score_layer(acts, img, T, "soft_wpmi", top_concepts=1)
    lo = scoring.score_layer(acts.float(), img.float(), T.float(), "soft_wpmi", top_concepts=1)
    assert lo.top_scores.dtype == torch.float32
    dense = similarity.soft_wpmi(acts, img @ T.T)
    # float32 grouped products stay within float32 noise of the float64 truth
    got = dense.gather(1, lo.top_concepts)
    torch.testing.assert_close(lo.top_scores.double(), got, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(lo.top_scores.double(), hi.top_scores, rtol=1e-4, atol=2e-3)


def test_progress_and_errors():
    acts, img, T = _emb()
    calls = []
    scoring.score_layer(
        acts, img, T, "soft_wpmi", memory_budget=4_000, on_progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(d <= t for d, t in calls)
    with pytest.raises(UserError):
        scoring.score_layer(acts, img, T, "nope")
    with pytest.raises(UserError):
        scoring.score_layer(acts, img, T, "wpmi", p_start=0.9)


def test_top_images_order_and_ties():
    g = torch.Generator().manual_seed(1)
    acts = torch.randint(0, 4, (300, 5), generator=g).float()
    acts[:, 0] = 1.0  # all tied
    idx, vals = scoring.top_images(acts, n=100)
    assert idx.shape == (5, 100) and idx.dtype == torch.long
    for k in range(5):
        ref = sorted(range(300), key=lambda i: (-acts[i, k].item(), i))[:100]
        assert idx[k].tolist() == ref
        assert torch.equal(vals[k], acts[ref, k])
    assert idx[0].tolist() == list(range(100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernel_equals_eager(monkeypatch, dtype):
    if scoring._kernel(dtype) is None:
        pytest.skip("no C compiler: only the eager path exists here")
    acts, img, T = _emb(N=500, M=70, K=30, dtype=dtype)
    fast = scoring.score_layer(acts, img, T, "soft_wpmi", top_concepts=10, memory_budget=300_000)
    monkeypatch.setenv("DISSECT_TUI_NO_KERNEL", "1")
    assert scoring._kernel(dtype) is None
    slow = scoring.score_layer(acts, img, T, "soft_wpmi", top_concepts=10, memory_budget=300_000)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(fast.top_scores, slow.top_scores, rtol=tol, atol=tol)
    assert (fast.top_concepts[:, 0] == slow.top_concepts[:, 0]).float().mean() > 0.95


def test_top_images_ties_across_blocks(monkeypatch):
    monkeypatch.setattr(similarity, "_TOPK_BLOCK_ELEMS", 500)  # blocks of ~100 images
    g = torch.Generator().manual_seed(2)
    acts = torch.randint(0, 3, (450, 5), generator=g).float()
    acts[:, 4] = torch.randn(450, generator=g)
    idx, vals = scoring.top_images(acts, n=60)
    for k in range(5):
        ref = sorted(range(450), key=lambda i: (-acts[i, k].item(), i))[:60]
        assert idx[k].tolist() == ref
        assert torch.equal(vals[k], acts[ref, k])


@pytest.mark.parametrize("method", ["soft_wpmi", "wpmi"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_image_top_concepts_come_from_the_same_pass(method, budget):
    acts, img, T = _emb()
    plain = scoring.score_layers({"x": acts}, img, T, method, top_concepts=7, memory_budget=budget)["x"]
    out = scoring.score_layers(
        {"x": acts}, img, T, method, top_concepts=7, memory_budget=budget, image_top=3
    )["x"]
    P = img @ T.T
    ref_vals, ref_idx = P.topk(3, dim=1)
    assert torch.equal(out.image_top_concepts, ref_idx)
    torch.testing.assert_close(out.image_top_sims, ref_vals, rtol=1e-10, atol=1e-12)
    a = METHODS[method].defaults()["a"]
    torch.testing.assert_close(out.image_lse, torch.logsumexp(a * P, dim=1))
    # collecting them changes no score
    assert torch.equal(out.top_concepts, plain.top_concepts)
    assert torch.equal(out.top_scores, plain.top_scores)
    assert plain.image_top_concepts is None


@pytest.mark.parametrize("M", [128 * 11, 128 * 11 + 37, 5000, 300])
@pytest.mark.parametrize("k", [1, 5])
def test_row_topk_equals_torch_topk(M, k):
    g = torch.Generator().manual_seed(M + k)
    x = torch.randn(40, M, generator=g, dtype=torch.float64)
    x[0, 200:205] = 10.0 + torch.arange(5.0)  # all of a row's best in one chunk
    x[1, -1] = 20.0  # best value in the short last chunk
    x[2, ::128] = 30.0 + torch.arange(len(range(0, M, 128)), dtype=torch.float64)  # one per chunk
    v, i = scoring.row_topk(x, k)
    rv, ri = torch.topk(x, k, dim=1)
    assert torch.equal(i, ri)
    assert torch.equal(v, rv)
    assert all(len(set(row)) == k for row in i.tolist())


def test_image_top_is_clamped_and_absent_where_no_p_rows_are_formed():
    acts, img, T = _emb(M=4)
    out = scoring.score_layer(acts, img, T, "soft_wpmi", top_concepts=2, image_top=10)
    assert out.image_top_concepts.shape == (acts.shape[0], 4)
    for method in ("cos", "rank_reorder"):
        assert scoring.score_layer(acts, img, T, method, image_top=3).image_top_concepts is None


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_layer_stats_score_like_the_full_matrix(method):
    """The indexer streams LayerStats instead of [N, K]: same labels and scores for every method."""
    import numpy as np

    from dissect_tui.activation_stats import LayerStatsBuilder

    acts, img, T = _emb()
    ids = np.arange(acts.shape[0]) * 2 + 1  # image ids with gaps (failed images)
    b = LayerStatsBuilder(
        acts.shape[1], acts.shape[0], embed_dim=img.shape[1], dtype=acts.dtype, buffer_bytes=1
    )
    for s in range(0, acts.shape[0], 17):
        b.add(ids[s : s + 17], acts[s : s + 17], img[s : s + 17])
    full = scoring.score_layers({"x": acts}, img, T, method, top_concepts=7, image_top=3)["x"]
    streamed = scoring.score_layers(
        {"x": b.finish()}, img, T, method, top_concepts=7, image_top=3, image_ids=ids
    )["x"]
    assert torch.equal(streamed.top_concepts, full.top_concepts)
    torch.testing.assert_close(streamed.top_scores, full.top_scores, rtol=1e-9, atol=1e-9)
