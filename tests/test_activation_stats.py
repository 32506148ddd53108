"""LayerStatsBuilder: streamed batches give exactly what the full activation matrix gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_tui import activation_stats
from dissect_tui.activation_stats import LayerStatsBuilder, merge_stats
from dissect_tui.similarity import top_images


def _acts(n=300, k=7, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g)
    if ties:  # many exact ties, the case where order matters
        a = torch.round(a * 2) / 2
    return a


@pytest.mark.parametrize("batch", [1, 13, 64, 300])
@pytest.mark.parametrize("buffer_bytes", [1, 4 * 7 * 50, 1 << 30])
def test_streamed_top_images_equal_the_full_matrix(batch, buffer_bytes):
    a = _acts()
    emb = torch.nn.functional.normalize(
        torch.randn(300, 5, generator=torch.Generator().manual_seed(1)), dim=1
    )
    b = LayerStatsBuilder(7, 20, embed_dim=5, buffer_bytes=buffer_bytes)
    for s in range(0, 300, batch):
        b.add(np.arange(s, min(s + batch, 300)), a[s : s + batch], emb[s : s + batch])
    st = b.finish()
    idx, vals = top_images(a, 20)
    assert torch.equal(st.top_ids, idx) and torch.equal(st.top_vals, vals)
    torch.testing.assert_close(st.cross, a.T @ emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.sq_norm, (a * a).sum(0), rtol=1e-5, atol=1e-5)
    assert st.n_images == 300


def test_ids_not_starting_at_zero_and_batches_out_of_order():
    a = _acts(n=120)
    ids = np.arange(120) * 3 + 5  # failed images leave gaps
    b = LayerStatsBuilder(7, 10, buffer_bytes=1)
    for s in [60, 0, 90, 30]:
        b.add(ids[s : s + 30], a[s : s + 30])
    st = b.finish()
    rows, vals = top_images(a, 10)
    assert torch.equal(st.top_ids, torch.from_numpy(ids)[rows]) and torch.equal(st.top_vals, vals)
    got_rows, got_vals = st.top_rows(ids, 4)
    assert torch.equal(got_rows, rows[:, :4]) and torch.equal(got_vals, vals[:, :4])
    assert st.cross is None


def test_merging_shards_equals_one_pass():
    a = _acts(n=200)
    parts = []
    for shard in (range(0, 200, 2), range(1, 200, 2)):  # interleaved, like ranks taking batches
        b = LayerStatsBuilder(7, 15, buffer_bytes=1)
        ids = np.array(list(shard))
        b.add(ids, a[ids])
        parts.append(b.finish())
    st = merge_stats(parts, 15)
    idx, vals = top_images(a, 15)
    assert torch.equal(st.top_ids, idx) and torch.equal(st.top_vals, vals) and st.n_images == 200


def test_fewer_images_than_kept():
    a = _acts(n=5)
    b = LayerStatsBuilder(7, 50)
    b.add(np.arange(5), a)
    st = b.finish()
    idx, vals = top_images(a, 5)
    assert torch.equal(st.top_ids, idx) and torch.equal(st.top_vals, vals)


@pytest.mark.parametrize("block_bytes", [1, 24 * 60 * 3])
def test_merges_over_blocks_of_neurons_equal_the_full_matrix(monkeypatch, block_bytes):
    """A wide layer's merge runs over neuron blocks (one neuron, or three, at a time here)."""
    monkeypatch.setattr(activation_stats, "MERGE_BLOCK_BYTES", block_bytes)
    a = _acts(n=400, k=8, seed=3)
    b = LayerStatsBuilder(8, 25, buffer_bytes=4 * 8 * 40)
    for s in range(0, 400, 17):
        b.add(np.arange(s, min(s + 17, 400)), a[s : s + 17])
    st = b.finish()
    idx, vals = top_images(a, 25)
    assert torch.equal(st.top_ids.long(), idx) and torch.equal(st.top_vals, vals)
    assert st.top_ids.dtype == torch.int32  # half the memory of int64 lists
