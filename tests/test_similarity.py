"""similarity.py against explicit float64 loops, dtype handling, seeds, and planted neurons."""

from __future__ import annotations

import math

import pytest
import torch

from dissect_tui import similarity as sim
from dissect_tui.methods import METHODS


def _inputs(N=40, K=5, M=7, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, K, generator=g, dtype=dtype)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=dtype), dim=1)
    return acts, img @ T.T


def _top(acts, k, n):
    return sorted(range(acts.shape[0]), key=lambda i: (-float(acts[i, k]), i))[:n]


def _softmax_rows(P, a):
    Q = []
    for i in range(P.shape[0]):
        e = [math.exp(a * float(x)) for x in P[i]]
        s = sum(e)
        Q.append([x / s for x in e])
    return Q


def _explicit_pmi(acts, P, a, lam, n, weights, eps=1e-7):
    N, K = acts.shape
    M = P.shape[1]
    Q = _softmax_rows(P, a)
    logp = [[0.0] * M for _ in range(K)]
    for k in range(K):
        top = _top(acts, k, n)
        for m in range(M):
            s = 0.0
            for r, i in enumerate(top):
                s += (
                    math.log(Q[i][m] + eps)
                    if weights is None
                    else math.log(1 + weights[r] * (Q[i][m] - 1) + eps)
                )
            logp[k][m] = s
    out = torch.zeros(K, M, dtype=torch.float64)
    for m in range(M):
        mx = max(logp[k][m] for k in range(K))
        prior = mx + math.log(sum(math.exp(logp[k][m] - mx) for k in range(K))) - math.log(K)
        for k in range(K):
            out[k, m] = logp[k][m] - lam * prior
    return out


def test_cos_matches_loop():
    acts, P = _inputs()
    out = sim.cos(acts, P)
    for k in range(acts.shape[1]):
        for m in range(P.shape[1]):
            q, p = acts[:, k].tolist(), P[:, m].tolist()
            dot = sum(x * y for x, y in zip(q, p, strict=True))
            ref = dot / math.sqrt(sum(x * x for x in q)) / math.sqrt(sum(y * y for y in p))
            assert out[k, m].item() == pytest.approx(ref, abs=1e-12)


def test_wpmi_matches_loop():
    acts, P = _inputs()
    out = sim.wpmi(acts, P)
    ref = _explicit_pmi(acts, P, a=2.0, lam=0.6, n=28, weights=None)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("N", [40, 130])  # 40 < top_k exercises the clamp
def test_soft_wpmi_matches_loop(N):
    acts, P = _inputs(N=N)
    out = sim.soft_wpmi(acts, P)
    n = min(100, N)
    w = [0.998 - r * (0.998 - 0.97) / 100 for r in range(n)]
    ref = _explicit_pmi(acts, P, a=10.0, lam=1.0, n=n, weights=w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def _explicit_rank_reorder(acts, P, p, frac, seed, scale_p=0.0, n_perm=5):
    N, K = acts.shape
    M = P.shape[1]
    n = min(N, max(2, int(N * frac)))
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(K, M, dtype=torch.float64)
    perms = torch.cat(
        [torch.rand(min(256, K - k0), n_perm, n, generator=gen).argsort(-1) for k0 in range(0, K, 256)]
    )
    for k in range(K):
        top = _top(acts, k, n)
        vals = [float(acts[i, k]) for i in top]
        base = sum(abs(vals[j] - vals[int(perms[k, t, j])]) ** p for t in range(n_perm) for j in range(n)) / (
            n * n_perm
        )
        for m in range(M):
            pv = [float(P[i, m]) for i in top]
            order = sorted(range(n), key=lambda j: (-pv[j], j))
            err = sum(abs(vals[order[j]] - vals[j]) ** p for j in range(n)) / n / base
            if scale_p:
                err /= max(sum(pv) / n, 1e-6) ** scale_p
            out[k, m] = -err
    return out


@pytest.mark.parametrize("frac,scale_p", [(0.05, 0.0), (0.25, 0.0), (0.25, 0.5)])
def test_rank_reorder_matches_loop(frac, scale_p):
    acts, P = _inputs(N=60)
    P = P + 1.0  # keep mean P positive so the reference scaling is defined
    out = sim.rank_reorder(acts, P, top_fraction=frac, seed=3, scale_p=scale_p)
    ref = _explicit_rank_reorder(acts, P, 3.0, frac, 3, scale_p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_rank_reorder_seed():
    acts, P = _inputs(N=200, K=6, M=9)
    a = sim.rank_reorder(acts, P, seed=7)
    b = sim.rank_reorder(acts, P, seed=7)
    c = sim.rank_reorder(acts, P, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the global RNG is neither used nor disturbed
    torch.manual_seed(1)
    x = torch.rand(3)
    torch.manual_seed(1)
    sim.rank_reorder(acts, P, seed=7)
    assert torch.equal(torch.rand(3), x)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(name, dtype):
    acts, P = _inputs(N=50, K=4, M=6, dtype=dtype)
    out = METHODS[name].dense(acts, P)
    assert out.dtype == dtype
    assert out.shape == (4, 6)
    assert torch.isfinite(out).all()


def test_float32_close_to_float64():
    acts, P = _inputs(N=120, K=6, M=10)
    for name, fn in ((n, m.dense) for n, m in METHODS.items()):
        hi = fn(acts, P)
        lo = fn(acts.float(), P.float())
        torch.testing.assert_close(lo.double(), hi, rtol=1e-4, atol=1e-3, msg=name)


def test_top_images_ties_and_clamp():
    g = torch.Generator().manual_seed(0)
    acts = torch.randint(0, 3, (50, 6), generator=g).float()
    acts[:, 5] = 0  # a dead neuron: every value ties
    idx, vals = sim.top_images(acts, 20)
    for k in range(6):
        assert idx[k].tolist() == _top(acts, k, 20)
        assert vals[k].tolist() == [float(acts[i, k]) for i in _top(acts, k, 20)]
    idx, vals = sim.top_images(acts, 500)
    assert idx.shape == (6, 50)


@pytest.mark.parametrize("N", [3008, 3007])  # 3008 = 188 chunks of 16
def test_top_images_by_chunk_maxima_equal_the_plain_topk(monkeypatch, N):
    def not_here(*args):
        raise AssertionError("N >> n should take the chunk-maximum path")

    monkeypatch.setattr(sim, "_top_by_transposed_blocks", not_here)
    monkeypatch.setattr(sim, "_TOPK_BLOCK_ELEMS", 21 * 16 * 3)  # 3 neurons per block
    g = torch.Generator().manual_seed(N)
    acts = torch.randn(N, 8, generator=g)
    acts[:, 1] = torch.randint(0, 4, (N,), generator=g).float()  # many ties at the boundary
    acts[:, 2] = 0  # a dead neuron
    acts[32:64, 3] += 100  # every top image in two chunks
    acts[-1, 4] = 100  # the best image in the short last chunk
    acts[::16, 5] = torch.arange(0, N, 16, dtype=torch.float32) + 10  # one high value per chunk
    acts[:, 6] = torch.randint(0, 50, (N,), generator=g).float()
    idx, vals = sim.top_images(acts, 20)
    for k in range(8):
        assert idx[k].tolist() == _top(acts, k, 20), k
        assert vals[k].tolist() == [float(acts[i, k]) for i in _top(acts, k, 20)]


def _planted(transform, seed=0, N=2000, M=25, D=24, K=25):
    # Every concept is some neuron's: with λ = 1 a neuron that dominates a concept nobody else
    # prefers scores log K there (the prior saturates), so unplanted concepts would tie.
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    P = img @ T.T
    planted = torch.randperm(M, generator=g)[:K]
    acts = torch.stack([transform(P[:, c]) for c in planted], dim=1)
    acts = acts + 0.01 * acts.std(0) * torch.randn(acts.shape, generator=g, dtype=torch.float64)
    return acts, P, planted


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi", "rank_reorder"])
def test_planted_monotone(name):
    acts, P, planted = _planted(lambda x: torch.exp(6 * x))
    labels = METHODS[name].dense(acts, P).argmax(1)
    assert torch.equal(labels, planted)


def test_planted_linear_cos():
    acts, P, planted = _planted(lambda x: 3 * x + 0.5)
    labels = sim.cos(acts, P).argmax(1)
    assert torch.equal(labels, planted)
