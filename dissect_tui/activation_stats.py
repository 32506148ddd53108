"""What scoring needs of a layer's activations, gathered batch by batch: memory independent of N × K.

Every similarity function reads only a summary of the [N images, K neurons] activation matrix:

- wpmi / soft_wpmi: each neuron's top images (ids, best first);
- rank_reorder: each neuron's top ``top_fraction`` images and their activations;
- cos: Σ_i a_ik · I_i ([K, D], with I the image embeddings) and Σ_i a_ik² ([K]).

:class:`LayerStatsBuilder` keeps exactly those while the images stage streams batches past it,
so the activations themselves can go straight to the cache. Images are identified by their
image id (position in the probe); ties between equal activations go to the lower id, as in
``similarity.top_images``, so the result equals what the full matrix gives. Partial results of
several processes (torchrun ranks) combine with :func:`merge_stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

# Activations buffered before a merge into the running top lists: ~16 MB keeps merges rare
# (each one sorts [K, 2·n_keep]) without holding much.
DEFAULT_BUFFER_BYTES = 16 << 20
# A merge runs over blocks of neurons whose candidates take about this much (values, ids and
# the sort's temporaries), so a 65,536-unit layer's merge does not need ~300 MB at once.
MERGE_BLOCK_BYTES = 16 << 20
# Image ids are int32 (a probe of up to 2^31 images): half the memory of int64 top lists.
ID_DTYPE = torch.int32
ID_DTYPE_NP = np.int32


@dataclass
class LayerStats:
    """The summary of one layer over the images seen; see the module docstring."""

    top_ids: Tensor  # [K, n] image ids, best first (ties: lower id first)
    top_vals: Tensor  # [K, n]
    cross: Tensor | None  # [K, D] Σ a_ik · I_i, when cos needs it
    sq_norm: Tensor | None  # [K] Σ a_ik²
    n_images: int

    @property
    def n_units(self) -> int:
        return self.top_ids.shape[0]

    def top_rows(self, image_ids: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` top images as rows of ``image_ids`` (the sorted ids of the embeddings)."""
        if n > self.top_ids.shape[1]:
            raise ValueError(f"{n} top images requested, {self.top_ids.shape[1]} kept")
        ids = self.top_ids[:, :n].cpu().numpy()
        rows = np.searchsorted(image_ids, ids).astype(ID_DTYPE_NP, copy=False)
        if rows.size and (rows.max() >= len(image_ids) or not np.array_equal(image_ids[rows], ids)):
            raise ValueError("a top image has no embedding")
        return torch.from_numpy(rows).to(self.top_ids.device), self.top_vals[:, :n]


def _sorted_top(vals: Tensor, ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows of candidates -> their n best, by value descending then id ascending."""
    order = torch.argsort(ids, dim=1, stable=True)
    vals, ids = torch.gather(vals, 1, order), torch.gather(ids, 1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :n]
    return torch.gather(vals, 1, order), torch.gather(ids, 1, order)


def _best_set(vals: Tensor, ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n best candidates of every row, by value then lower id, in no particular order.

    ``ids`` is [K, m] or, shared by every row and ascending, [m]. A topk picks the set; only rows
    where a value equal to the n-th best was left out (a tie at the boundary) are redone exactly,
    so the set is the one a full sort would keep. The order is fixed once, in ``finish``."""
    k, m = vals.shape
    if m <= n:
        return vals, (ids.expand(k, m) if ids.ndim == 1 else ids)
    v, pos = torch.topk(vals, n, dim=1, sorted=False)
    i = ids[pos] if ids.ndim == 1 else torch.gather(ids, 1, pos)
    t = v.amin(dim=1, keepdim=True)
    bad = ((vals == t).sum(1) > (v == t).sum(1)).nonzero().flatten()
    if bad.numel():
        row_ids = ids.expand(k, m)[bad] if ids.ndim == 1 else ids[bad]
        v[bad], i[bad] = _sorted_top(vals[bad], row_ids, n)
    return v, i


class LayerStatsBuilder:
    """Running :class:`LayerStats` of one layer. ``add`` batches in any order of image ids."""

    def __init__(
        self,
        n_units: int,
        n_keep: int,
        *,
        embed_dim: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self.n_units, self.n_keep = n_units, max(1, int(n_keep))
        self.device, self.dtype = torch.device(device), dtype
        self.vals = torch.empty(n_units, 0, dtype=dtype, device=self.device)
        self.ids = torch.empty(n_units, 0, dtype=ID_DTYPE, device=self.device)
        self.cross = (
            None if embed_dim is None else torch.zeros(n_units, embed_dim, dtype=dtype, device=self.device)
        )
        self.sq_norm = None if embed_dim is None else torch.zeros(n_units, dtype=dtype, device=self.device)
        self.n_images = 0
        self._buf: list[tuple[Tensor, Tensor]] = []
        self._buf_rows = 0
        self._buf_limit = max(1, buffer_bytes // max(1, n_units * torch.finfo(dtype).bits // 8))

    def add(self, image_ids: Tensor | np.ndarray, acts: Tensor, image_emb: Tensor | None = None) -> None:
        """One batch: ``acts`` [B, K] of the images ``image_ids`` [B] (and their embeddings [B, D])."""
        acts = acts.to(self.device, self.dtype)
        ids = torch.as_tensor(np.asarray(image_ids), dtype=ID_DTYPE, device=self.device)
        if acts.ndim != 2 or acts.shape[1] != self.n_units or acts.shape[0] != ids.shape[0]:
            raise ValueError(
                f"expected [{ids.shape[0]}, {self.n_units}] activations, got {tuple(acts.shape)}"
            )
        if self.cross is not None and self.sq_norm is not None:  # both or neither
            if image_emb is None:
                raise ValueError("this builder accumulates Σ a·I: pass the batch's image embeddings")
            self.cross.addmm_(acts.T, image_emb.to(self.device, self.dtype))
            self.sq_norm.add_((acts * acts).sum(0))
        self.n_images += acts.shape[0]
        self._buf.append((ids, acts))
        self._buf_rows += acts.shape[0]
        if self._buf_rows >= self._buf_limit:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        ids = torch.cat([i for i, _ in self._buf])
        acts = torch.cat([a for _, a in self._buf])
        self._buf, self._buf_rows = [], 0
        order = torch.argsort(ids)  # ids ascending along the rows of the transposed chunk
        ids, acts = ids[order], acts[order]
        kept = self.vals.shape[1]
        width = kept + min(acts.shape[0], self.n_keep)
        # ~24 bytes per candidate live during a merge: values, ids, topk positions, masks
        step = max(1, MERGE_BLOCK_BYTES // (24 * max(1, kept + acts.shape[0])))
        new_vals = torch.empty(self.n_units, min(width, self.n_keep), dtype=self.dtype, device=self.device)
        new_ids = torch.empty(new_vals.shape, dtype=ID_DTYPE, device=self.device)
        for k0 in range(0, self.n_units, step):
            k1 = min(self.n_units, k0 + step)
            vals, cand_ids = _best_set(acts[:, k0:k1].T.contiguous(), ids, self.n_keep)  # [kb, ≤ n]
            if kept:
                vals, cand_ids = _best_set(
                    torch.cat([self.vals[k0:k1], vals], 1),
                    torch.cat([self.ids[k0:k1], cand_ids], 1),
                    self.n_keep,
                )
            new_vals[k0:k1], new_ids[k0:k1] = vals, cand_ids
        self.vals, self.ids = new_vals, new_ids

    def finish(self) -> LayerStats:
        self._flush()
        step = max(1, MERGE_BLOCK_BYTES // (24 * max(1, self.vals.shape[1])))
        for k0 in range(0, self.n_units, step):  # best first, ties by id; in place, block by block
            k1 = min(self.n_units, k0 + step)
            self.vals[k0:k1], self.ids[k0:k1] = _sorted_top(self.vals[k0:k1], self.ids[k0:k1], self.n_keep)
        return LayerStats(self.ids, self.vals, self.cross, self.sq_norm, self.n_images)


def merge_stats(parts: Sequence[LayerStats], n_keep: int) -> LayerStats:
    """One layer's stats over disjoint image sets (e.g. torchrun ranks), as if seen by one builder."""
    vals, ids = _sorted_top(
        torch.cat([p.top_vals for p in parts], 1), torch.cat([p.top_ids for p in parts], 1), n_keep
    )
    # Parts come from like builders: each has cross (sq_norm) or none has.
    cross = (
        None
        if parts[0].cross is None
        else sum(cast(list[Tensor], [p.cross for p in parts[1:]])) + parts[0].cross
    )
    sq = (
        None
        if parts[0].sq_norm is None
        else sum(cast(list[Tensor], [p.sq_norm for p in parts[1:]])) + parts[0].sq_norm
    )
    return LayerStats(ids, vals, cross, sq, sum(p.n_images for p in parts))
