"""The indexing pipeline's scorer: similarity.py's numbers without ever building N×M P or Q.

P = I Tᵀ is never materialised. What each method needs instead:

- cos: q·P[:, m] = (qᵀI)·T_m and |P[:, m]|² = T_m (IᵀI) T_mᵀ, so only [K, D] and [D, D]
  products are formed and scores come one concept chunk at a time.
- rank_reorder: P restricted to each neuron's top images, [neuron block, n, concept chunk].
- wpmi / soft_wpmi: one pass over blocks of images. A block's rows of P are computed for all
  concepts, which gives each image's softmax denominator (``image_lse``) and its Q row; the
  Q rows are then consumed by every neuron slot (layer, neuron, rank) that points at an image
  of the block, and the block is dropped. Per neuron we keep only log p(t|B_k) [K, M].
  All layers are scored in the same pass (``score_layers``), so P costs one N×M×D product in
  total rather than one per layer.

The cost is K·top·M elementwise terms (7.8e9 for ResNet-50's 3,904 neurons × 20k concepts), and
``log`` is by far the most expensive of them on a CPU. So terms are multiplied in groups and one
log is taken per group: with Q = E/s (E = exp(a·P − rowmax), s = ΣE),

    1 + p_r(Q − 1) + ε = (p_r / s) · (E + c_r·s),   c_r = (1 − p_r + ε) / p_r,

so a group's product Π(E + c_r·s) stays inside float range for a group size chosen from the
bounds of its factors, and the Σ log(p_r/s) part is a per-neuron constant. WPMI is the same with
p_r = 1 and c_r = ε. On CPU the grouped products run in a small C loop (``cpu_kernel.py``:
the plan, the kernel compiled once per machine into a private cache folder, and the eager torch
path); without a compiler, on GPU, or with DISSECT_TUI_NO_KERNEL=1 eager torch computes the same
numbers, and the run records which path ran (``runs.settings.scoring_path``). When log p(t|B_k) for all neurons × all concepts does not fit the memory
budget, a first pass computes ``image_lse`` and the rest runs in concept chunks over only the
images that are in some neuron's top list (Q = exp(a·P − lse) is then exact per chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import similarity as sim
from .activation_stats import LayerStats
from .cpu_kernel import feed as _feed
from .cpu_kernel import iter_plan_blocks as _plan_blocks
from .cpu_kernel import kernel as _kernel  # noqa: F401 - tests and benchmarks check which path runs
from .errors import UserError
from .methods import get_method, validate
from .similarity import top_images

__all__ = ["DEFAULT_MEMORY_BUDGET", "LayerScores", "score_layer", "score_layers", "top_images"]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory beyond the inputs
PLAN_SLOTS = 1 << 20  # (neuron, top image) slots planned at once, on average (cpu_kernel)
_NORM_EPS = 1e-12

Progress = Callable[[int, int], None]
# sink(layer_index, first_concept, scores [K_l, chunk]) receives final scores chunk by chunk.
Sink = Callable[[int, int, Tensor], None]


@dataclass
class LayerScores:
    """Best concepts of every neuron of one layer; the label of neuron k is ``top_concepts[k, 0]``."""

    top_concepts: Tensor  # [K, T] long, concept indices, best first
    top_scores: Tensor  # [K, T], sorted descending
    image_lse: Tensor | None  # [N] logsumexp_m a·P[i, m] (wpmi/soft_wpmi), else None
    # With ``image_top`` > 0 (wpmi/soft_wpmi): each image's best concepts by P, collected from
    # the P rows the pass forms anyway, so the indexer needs no second N×M×D product.
    image_top_concepts: Tensor | None = None  # [N, image_top] long, best first
    image_top_sims: Tensor | None = None  # [N, image_top] P values


def _float_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class _TopT:
    """Running top-T over concept chunks for a set of neurons."""

    def __init__(self, K: int, T: int, dtype: torch.dtype, device: torch.device):
        self.T = T
        self.vals = torch.full((K, 0), -math.inf, dtype=dtype, device=device)
        self.idx = torch.zeros((K, 0), dtype=torch.long, device=device)

    def update(self, m0: int, scores: Tensor) -> None:
        t = min(self.T, self.vals.shape[1] + scores.shape[1])
        if self.vals.shape[1] == 0:  # first chunk: no [K, T + chunk] concatenation needed
            self.vals, pos = torch.topk(scores, t, dim=1, sorted=True)
            self.idx = pos + m0
            return
        cols = torch.arange(m0, m0 + scores.shape[1], device=scores.device).expand_as(scores)
        vals = torch.cat([self.vals, scores], dim=1)
        idx = torch.cat([self.idx, cols], dim=1)
        self.vals, pos = torch.topk(vals, t, dim=1, sorted=True)
        self.idx = torch.gather(idx, 1, pos)


def score_layer(
    acts: Tensor,
    image_emb: Tensor,
    concept_emb: Tensor,
    method: str = "soft_wpmi",
    top_concepts: int = 100,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device | None = None,
    on_progress: Progress | None = None,
    image_top: int = 0,
    image_ids: np.ndarray | None = None,
    **hp: float | int,
) -> LayerScores:
    """Score one layer: ``acts`` [N, K], ``image_emb`` [N, D], ``concept_emb`` [M, D] (L2-normalised).

    Same numbers as ``methods.get_method(method).dense(acts, image_emb @ concept_emb.T, **hp)``,
    reduced to each neuron's ``top_concepts`` best. To score several layers of one network use
    ``score_layers``: wpmi/soft_wpmi then share one pass over the images.
    """
    out = score_layers(
        {"layer": acts},
        image_emb,
        concept_emb,
        method,
        top_concepts,
        memory_budget=memory_budget,
        device=device,
        on_progress=on_progress,
        image_top=image_top,
        image_ids=image_ids,
        **hp,
    )
    return out["layer"]


def score_layers(
    layers: Mapping[str, Tensor | LayerStats],
    image_emb: Tensor,
    concept_emb: Tensor,
    method: str = "soft_wpmi",
    top_concepts: int = 100,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device | None = None,
    on_progress: Progress | None = None,
    image_top: int = 0,
    image_ids: np.ndarray | None = None,
    **hp: float | int,
) -> dict[str, LayerScores]:
    """Score several layers ({name: acts [N, K_l]}) against the same images and concepts.

    A layer may also be given as ``activation_stats.LayerStats`` (what the indexer streams
    instead of keeping [N, K]); ``image_ids`` are then the sorted ids of the ``image_emb`` rows.

    The prior of wpmi/soft_wpmi is per layer, exactly as if each layer were scored alone; the
    ``image_lse`` tensor is shared by all layers, and so are ``image_top_concepts`` /
    ``image_top_sims`` when ``image_top`` > 0 (wpmi/soft_wpmi only; other methods never form
    P rows, so the fields stay None).
    """
    params = validate(method, hp)
    if image_emb.ndim != 2 or concept_emb.ndim != 2 or image_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] and [M, D], got {tuple(image_emb.shape)} and {tuple(concept_emb.shape)}"
        )
    N, M = image_emb.shape[0], concept_emb.shape[0]
    if N == 0 or M == 0:
        raise UserError("cannot score neurons without probe images and concepts")
    for name, a in layers.items():
        if isinstance(a, LayerStats):
            if image_ids is None or a.n_images != N:
                raise ValueError(f"layer {name}: stats of {a.n_images} images need image_ids of the {N} rows")
        elif a.ndim != 2 or a.shape[0] != N:
            raise ValueError(f"layer {name}: activations must be [{N}, K], got {tuple(a.shape)}")
    dev = torch.device(device) if device is not None else image_emb.device
    dt = _float_dtype(image_emb, concept_emb, *(a for a in layers.values() if isinstance(a, Tensor)))

    def top(a: Tensor | LayerStats, n: int) -> tuple[Tensor, Tensor]:
        if isinstance(a, LayerStats):
            assert image_ids is not None
            rows, vals = a.top_rows(image_ids, n)
            return rows.to(dev), vals.to(dev, dt)
        return top_images(a.to(dev, dt), n)

    img = image_emb.to(dev, dt)
    Tm = concept_emb.to(dev, dt)
    T = max(1, min(int(top_concepts), M))
    names = list(layers)
    if get_method(method).uses_softmax:  # wpmi, soft_wpmi
        n = min(int(params["top_k"]), N)
        if method == "soft_wpmi":
            w = sim.soft_weights(
                n, int(params["top_k"]), params["p_start"], params["p_end"], dtype=dt, device=dev
            )
        else:
            w = None
        tops = [top(layers[k], n)[0] for k in names]
        tracks = [_TopT(t.shape[0], T, dt, dev) for t in tops]

        def sink(li: int, m0: int, scores: Tensor) -> None:
            tracks[li].update(m0, scores)

        collect = image_top > 0 and float(params["a"]) > 0
        row_top = RowTop(N, min(int(image_top), M), dt, dev) if collect else None
        lse = pmi_pass(
            tops,
            img,
            Tm,
            a=float(params["a"]),
            lam=float(params["lam"]),
            weights=w,
            min_prob=float(params["min_prob"]),
            sink=sink,
            memory_budget=memory_budget,
            on_progress=on_progress,
            row_top=row_top,
        )
        ti, tv = (row_top.idx, row_top.vals) if row_top is not None else (None, None)
        return {k: LayerScores(tr.idx, tr.vals, lse, ti, tv) for k, tr in zip(names, tracks, strict=True)}
    done, total = 0, len(names)
    out: dict[str, LayerScores] = {}
    for k in names:
        a = layers[k]
        if method == "cos":
            if isinstance(a, LayerStats):
                if a.cross is None or a.sq_norm is None:
                    raise ValueError(f"layer {k}: cos needs stats built with embed_dim")
                cross, sq = a.cross.to(dev, dt), a.sq_norm.to(dev, dt)
            else:
                a = a.to(dev, dt)
                cross, sq = a.T @ img, (a * a).sum(0)
            out[k] = _cos_layer(cross, sq, img, Tm, T, memory_budget)
        else:
            n = min(N, max(2, int(N * float(params["top_fraction"]))))
            out[k] = _rank_reorder_layer(*top(a, n), img, Tm, T, memory_budget, params)
        done += 1
        if on_progress is not None:
            on_progress(done, total)
    return out


def _cos_layer(cross: Tensor, sq_norm: Tensor, img: Tensor, Tm: Tensor, T: int, budget: int) -> LayerScores:
    """cos from Σ a·I ([K, D]) and Σ a² ([K]): q·P[:, m] = (qᵀI)·T_m, |P[:, m]|² = T_m (IᵀI) T_mᵀ."""
    K = cross.shape[0]
    M = Tm.shape[0]
    qnorm = sq_norm.clamp_min(0).sqrt().clamp_min(_NORM_EPS)
    AI = cross / qnorm[:, None]  # [K, D]: q̂ᵀI
    G = img.T @ img  # [D, D]
    top = _TopT(K, T, cross.dtype, cross.device)
    mc = max(1, min(M, budget // (3 * cross.element_size() * max(K, Tm.shape[1]))))
    for m0 in range(0, M, mc):
        Tc = Tm[m0 : m0 + mc]
        pnorm = ((Tc @ G) * Tc).sum(1).clamp_min(0).sqrt().clamp_min(_NORM_EPS)
        top.update(m0, (AI @ Tc.T) / pnorm)
    return LayerScores(top.idx, top.vals, None)


def _rank_reorder_layer(
    idx: Tensor, vals: Tensor, img: Tensor, Tm: Tensor, T: int, budget: int, params: Mapping
) -> LayerScores:
    """rank reorder from each neuron's top images (rows [K, n]) and their activations [K, n]."""
    M = Tm.shape[0]
    n = idx.shape[1]
    p = float(params["p"])
    base = sim.rank_baseline(vals, p, int(params["seed"]), int(params["n_perm"])).clamp_min(
        torch.finfo(vals.dtype).tiny
    )
    K = idx.shape[0]
    top = _TopT(K, T, vals.dtype, vals.device)
    # About six [kb, n, mc] temporaries live at once (P values, argsort, gathers).
    elems = max(1, budget // (8 * vals.element_size() * 6))
    kb = max(1, min(K, elems // max(1, n * min(M, 256))))
    mc = max(1, min(M, elems // max(1, kb * n)))
    for k0 in range(0, K, kb):
        k1 = min(K, k0 + kb)
        emb = img[idx[k0:k1]]  # [kb, n, D]
        track = _TopT(k1 - k0, T, vals.dtype, vals.device)
        for m0 in range(0, M, mc):
            sub = emb @ Tm[m0 : m0 + mc].T  # P on the top images: [kb, n, mc]
            err = sim._reorder_error(vals[k0:k1], sub, p, float(params["scale_p"])) / base[k0:k1, None]
            track.update(m0, -err)
        top.vals = torch.cat([top.vals, track.vals]) if k0 else track.vals
        top.idx = torch.cat([top.idx, track.idx]) if k0 else track.idx
    return LayerScores(top.idx, top.vals, None)


# ---------------------------------------------------------------------------------------------
# The wpmi / soft_wpmi engine


_TOPK_CHUNK = 128


def row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(x, k, dim=1)`` for wide rows, about twice as fast on the CPU.

    The k largest values of a row lie in the k chunks (of 128 columns) with the largest maxima:
    a chunk holding one of them has a maximum at least that large, and at most k chunks can. So
    one vectorised max over the row and a topk over a few hundred candidates replace a topk over
    the whole row. Only the choice among exactly equal values may differ from torch.topk.
    """
    R, M = x.shape
    C = _TOPK_CHUNK
    n_chunks = -(-M // C)
    if n_chunks <= 2 * k:
        return torch.topk(x, k, dim=1, sorted=True)
    body = M - M % C
    cmax = x[:, :body].reshape(R, body // C, C).amax(dim=2)
    if body < M:
        cmax = torch.cat([cmax, x[:, body:].amax(dim=1, keepdim=True)], dim=1)
    chunk = torch.topk(cmax, k, dim=1, sorted=False).indices
    cols = (chunk[:, :, None] * C + torch.arange(C, device=x.device)).reshape(R, k * C)
    past_end = cols >= M  # only in the short last chunk
    cand = torch.gather(x, 1, cols.clamp(max=M - 1)).masked_fill_(past_end, -math.inf)
    v, pos = torch.topk(cand, k, dim=1, sorted=True)
    return v, torch.gather(cols, 1, pos)


class RowTop:
    """Each image's best concepts, filled from a·P rows as pmi_pass forms them (values are P)."""

    def __init__(self, N: int, top: int, dtype: torch.dtype, device: torch.device):
        self.top = top
        self.idx = torch.zeros((N, top), dtype=torch.long, device=device)
        self.vals = torch.full((N, top), math.nan, dtype=dtype, device=device)

    def update(self, ids: Tensor, scaled: Tensor, a: float) -> Tensor:
        """``scaled`` = a·P for images ``ids`` over all concepts (a > 0 keeps the order of P).

        Returns each row's maximum of ``scaled``, which the softmax needs anyway.
        """
        v, i = row_topk(scaled, self.top)
        self.idx[ids] = i
        self.vals[ids] = v / a
        return v[:, 0]


def _group_size(c_lo: float, c_hi: float, M: int, dtype: torch.dtype) -> int:
    """Largest group whose product of factors in [c_lo, 1 + c_hi·M] stays well inside float range."""
    lim = 69.0 if dtype == torch.float32 else 600.0  # ln(1e30) with margin below ln(max) = 88.7
    lo = math.log(c_lo)
    hi = math.log1p(c_hi * M)
    g = lim / max(-lo, hi, 1e-9)
    return int(max(1, min(32, math.floor(g))))


def pmi_pass(
    tops: Sequence[Tensor],
    image_emb: Tensor,
    concept_emb: Tensor,
    *,
    a: float,
    lam: float,
    weights: Tensor | None,
    min_prob: float,
    sink: Sink,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    on_progress: Progress | None = None,
    all_rows: bool = True,
    row_top: RowTop | None = None,
) -> Tensor:
    """WPMI (weights None) or SoftWPMI (weights p_r [n]) scores for layers with top images ``tops``.

    ``tops[l]`` is [K_l, n] image indices, best first. Final scores reach ``sink(l, m0, [K_l, mc])``
    one concept chunk at a time. Returns ``image_lse`` [N]; with ``all_rows=False`` it is only
    computed for images in some top list (NaN elsewhere), which is all the scores need.
    ``row_top`` (needs a > 0) collects each scored image's best concepts on the way.
    """
    if row_top is not None and not a > 0:
        raise ValueError(f"row_top needs a > 0 (the order of a·P is that of P), got a={a}")
    run = _PmiPass(tops, image_emb, concept_emb, a, lam, weights, min_prob, sink, memory_budget, on_progress)
    run.row_top = row_top
    first_rows = None if all_rows else run.union
    nr_first = run.N if first_rows is None else run.union.numel()
    M = run.M
    if run.mc >= M:  # fused: one pass over the images for every concept
        run.total = -(-nr_first // run.block_rows(nr_first, M, True))
        acc = torch.zeros(run.Ktot, M, dtype=run.dt, device=run.dev)
        run.rows_pass(first_rows, 0, M, False, acc)
        run.finish(acc, 0)
        return run.lse
    # Two passes: softmax denominators first, then concept chunks over the top images only.
    chunks = [(m0, min(M, m0 + run.mc)) for m0 in range(0, M, run.mc)]
    union = run.union.numel()
    run.total = -(-nr_first // run.block_rows(nr_first, M, False)) + sum(
        -(-union // run.block_rows(union, m1 - m0, True)) for m0, m1 in chunks
    )
    run.rows_pass(first_rows, 0, M, False, None)
    run.logs.zero_()
    for m0, m1 in chunks:
        acc = torch.zeros(run.Ktot, m1 - m0, dtype=run.dt, device=run.dev)
        run.rows_pass(run.union, m0, m1, True, acc)
        run.finish(acc, m0)
        del acc
    return run.lse


class _PmiPass:
    """The state of one pmi_pass: slots (layer, neuron, rank) → image, per-image softmax sums."""

    def __init__(
        self,
        tops: Sequence[Tensor],
        img: Tensor,
        Tm: Tensor,
        a: float,
        lam: float,
        weights: Tensor | None,
        min_prob: float,
        sink: Sink,
        memory_budget: int,
        on_progress: Progress | None,
    ) -> None:
        self.img, self.Tm, self.a, self.lam, self.sink = img, Tm, a, lam, sink
        self.budget, self.on_progress = memory_budget, on_progress
        self.row_top: RowTop | None = None
        self.dt, self.dev = img.dtype, img.device
        self.N, self.M = img.shape[0], Tm.shape[0]
        self.esz = img.element_size()
        self.n = n = tops[0].shape[1]
        self.offs = [0]
        for t in tops:
            self.offs.append(self.offs[-1] + t.shape[0])
        self.Ktot = Ktot = self.offs[-1]
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double().cpu()
        self.c = ((1 - w + min_prob) / w).to(self.dt).to(self.dev)  # factor offset per rank
        self.log_w_sum = float(torch.log(w).sum())
        # Slot s = (neuron s // n, rank s % n) of the layers' concatenated top lists; only its
        # image row is stored (int32 while the probe allows: 26 MB for 65,536 neurons × 100).
        ix = torch.int32 if self.N < 2**31 else torch.long
        self.slot_img = torch.cat([t.to(self.dev, ix).reshape(-1) for t in tops])
        # Concept chunk: log p(t|B) for all neurons of the chunk must fit in ~40% of the budget.
        self.mc = max(1, min(self.M, int(0.4 * memory_budget) // max(1, Ktot * self.esz)))
        self.gs_rows = max(8, min(256, (4 << 20) // max(1, self.M * self.esz)))  # factor buffers of ~4 MB
        self.lse = torch.full((self.N,), math.nan, dtype=self.dt, device=self.dev)
        self.logs = torch.zeros(
            self.N, dtype=self.dt, device=self.dev
        )  # log Σ exp(a·P − rowmax); 0 once lse is known
        self.union = torch.unique(self.slot_img)
        self.aI = img * a
        self.done = 0
        self.total = 1

    def block_rows(self, nr: int, width: int, with_acc: bool) -> int:
        """Rows of P per block: what the budget leaves after the accumulator and factor buffers."""
        esz = self.esz
        free = self.budget - (self.Ktot * width * esz if with_acc else 0) - 2 * self.gs_rows * width * esz
        rows = min(nr, int(free * 0.9) // max(1, width * esz))
        if with_acc:  # a block's group plan takes ~40 bytes per slot: ~PLAN_SLOTS slots per block
            rows = min(rows, nr * PLAN_SLOTS // max(1, self.slot_img.numel()))
        return max(16, rows)

    def rows_pass(self, rows: Tensor | None, m0: int, m1: int, known: bool, acc: Tensor | None) -> None:
        """P for rows (None = all images) × concepts [m0, m1); softmax; feed slots into acc."""
        dt, dev, esz = self.dt, self.dev, self.esz
        nr = self.N if rows is None else rows.numel()
        width = m1 - m0
        nb = self.block_rows(nr, width, acc is not None)
        n_blocks = -(-nr // nb)
        plans = None
        if acc is not None:
            pos = (
                self.slot_img
                if rows is None
                else torch.searchsorted(rows, self.slot_img, out_int32=self.slot_img.dtype == torch.int32)
            )
            # factors E + c_r·s lie in [c_min, 1 + c_max·s] with 1 ≤ s ≤ M (s = 1 once lse is known)
            g = _group_size(float(self.c.min()), float(self.c.max()), 1 if known else width, dt)
            plans = _plan_blocks(self.n, pos, nb, n_blocks, g)
        Tt = self.Tm[m0:m1].T
        E = torch.empty(min(nb, nr), width, dtype=dt, device=dev)
        # Matrix products in ~64 MB pieces (BLAS is ~2x slower on thin ones), softmax work in
        # ~8 MB pieces that stay in cache.
        sub_mm = max(1, min(nb, (64 << 20) // max(1, width * esz)))
        sub_ew = max(1, min(sub_mm, (8 << 20) // max(1, width * esz)))
        buf = torch.empty(self.gs_rows, width, dtype=dt, device=dev)
        tmp = torch.empty(self.gs_rows, width, dtype=dt, device=dev)
        for b in range(n_blocks):
            r0, r1 = b * nb, min(nr, (b + 1) * nb)
            ids = torch.arange(r0, r1, device=dev) if rows is None else rows[r0:r1]
            Eb = E[: r1 - r0]
            for q0 in range(0, r1 - r0, sub_mm):
                q1 = min(r1 - r0, q0 + sub_mm)
                src = self.aI[r0 + q0 : r0 + q1] if rows is None else self.aI[ids[q0:q1]]
                torch.mm(src, Tt, out=Eb[q0:q1])
                for s0 in range(q0, q1, sub_ew):
                    self._softmax_rows(Eb[s0 : min(q1, s0 + sub_ew)], ids[s0 : min(q1, s0 + sub_ew)], known)
            if plans is not None and acc is not None:
                scale = None if known else torch.exp(self.logs[ids])
                _feed(Eb, next(plans), self.n, self.c, scale, acc, buf, tmp)
            self.done += 1
            if self.on_progress is not None:
                self.on_progress(self.done, self.total)

    def _softmax_rows(self, e: Tensor, ids: Tensor, known: bool) -> None:
        """E = exp(a·P − shift) in place; on first sight of the rows also their lse and log-sums."""
        if known:
            e.sub_(self.lse[ids, None]).exp_()
            return
        # first sight of these rows, over all concepts
        shift = self.row_top.update(ids, e, self.a) if self.row_top is not None else e.amax(dim=1)
        e.sub_(shift[:, None]).exp_()
        ls = torch.log(e.sum(dim=1))
        self.lse[ids] = shift + ls
        self.logs[ids] = ls

    def finish(self, acc: Tensor, m0: int) -> None:
        # Σ_r log p_r − Σ_r log s(x_r) per neuron (log s is 0 for rows scored with known lse)
        acc.add_((self.log_w_sum - self.logs[self.slot_img].view(self.Ktot, self.n).sum(1))[:, None])
        for li, (k0, k1) in enumerate(zip(self.offs[:-1], self.offs[1:], strict=True)):
            lp = acc[k0:k1]
            prior = torch.logsumexp(lp, dim=0) - math.log(k1 - k0)
            self.sink(li, m0, lp.sub_(self.lam * prior))  # in place: acc is not read again
