"""Free-text SoftWPMI and two-concept compositions against dense recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_tui import concept_query as cq
from dissect_tui import scoring, similarity
from dissect_tui.errors import UserError


def _run(N=300, M=30, D=16, K=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    acts = torch.randn(N, K, generator=g, dtype=torch.float64)
    return acts, img, T, g


def test_free_concepts_equal_dense_extended_set():
    acts, img, T, g = _run()
    stored = scoring.score_layer(acts, img, T, "soft_wpmi")
    top_idx, _ = scoring.top_images(acts, 100)
    new = torch.nn.functional.normalize(torch.randn(2, img.shape[1], generator=g, dtype=torch.float64), dim=1)
    queries = torch.cat([new, T[3:4]])  # two unseen texts and one already in the set
    got = cq.score_free_concepts(top_idx.numpy(), img.numpy(), stored.image_lse.numpy(), queries.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (acts.shape[1], 3)
    for c in range(3):
        extended = torch.cat([T, queries[c : c + 1]])  # each text is added to the set on its own
        dense = similarity.soft_wpmi(acts, img @ extended.T)[:, -1]
        np.testing.assert_allclose(got[:, c], dense.numpy(), rtol=1e-9, atol=1e-9)


def test_free_concepts_accept_tensors_float32():
    acts, img, T, g = _run()
    stored = scoring.score_layer(acts.float(), img.float(), T.float(), "soft_wpmi")
    top_idx, _ = scoring.top_images(acts, 100)
    got = cq.score_free_concepts(top_idx, img.float(), stored.image_lse, T[:2].float())
    ref = cq.score_free_concepts(top_idx, img, stored.image_lse.double(), T[:2])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_pair_texts():
    assert cq.pair_texts(["a", "b", "c"]) == ["a b", "a c", "b a", "b c", "c a", "c b"]
    assert len(cq.pair_texts([str(i) for i in range(10)])) == 90


def _compose_case(seed=0, S=5, D=32, N=400, K=10, unit=3, planted=7):
    g = torch.Generator().manual_seed(seed)
    singles = [f"w{i}" for i in range(S)]
    n_pairs = S * (S - 1)
    emb = torch.nn.functional.normalize(torch.randn(S + n_pairs, D, generator=g, dtype=torch.float64), dim=1)
    singles_emb, pair_emb = emb[:S], emb[S:]
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    top_idx = torch.stack([torch.randperm(N, generator=g)[:100] for _ in range(K)])
    # the unit's top images look like the planted pair
    rows = top_idx[unit]
    img[rows] = torch.nn.functional.normalize(pair_emb[planted] + 0.3 * img[rows], dim=1)
    return singles, singles_emb, pair_emb, img, top_idx, unit, planted


def test_compose_ranks_planted_pair_first():
    singles, se, pe, img, top_idx, unit, planted = _compose_case()
    out = cq.compose_neuron(top_idx.numpy(), unit, img.numpy(), singles, se.numpy(), pe.numpy())
    texts = [t for t, _ in out]
    assert len(out) == len(singles) ** 2
    assert texts[0] == cq.pair_texts(singles)[planted]
    scores = [s for _, s in out]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(s, float) for s in scores)


@pytest.mark.parametrize("budget", [1 << 30, 3_000])
def test_compose_equals_dense(budget):
    singles, se, pe, img, top_idx, unit, _ = _compose_case(seed=1)
    out = dict(cq.compose_neuron(top_idx, unit, img, singles, se, pe, memory_budget=budget))
    texts = singles + cq.pair_texts(singles)
    P = img @ torch.cat([se, pe]).T
    # acts whose top-100 are exactly top_idx, best first
    acts = torch.zeros(img.shape[0], top_idx.shape[0], dtype=torch.float64)
    for k in range(top_idx.shape[0]):
        acts[top_idx[k], k] = torch.arange(100, 0, -1, dtype=torch.float64)
    # only images in some top list enter the softmax, exactly like the stored run
    dense = similarity.soft_wpmi(acts, P)[unit]
    for i, t in enumerate(texts):
        assert out[t] == pytest.approx(dense[i].item(), abs=1e-9)


def test_compose_rejects_bad_unit():
    singles, se, pe, img, top_idx, _, _ = _compose_case()
    with pytest.raises(UserError):
        cq.compose_neuron(top_idx, 99, img, singles, se, pe)
