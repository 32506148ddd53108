"""Free-text concept queries and two-concept compositions over a stored run (SoftWPMI).

Called by the browser inside a worker (imports torch and numpy, never textual). Inputs are what
a run stores: each layer's top images per neuron (``top_idx`` [K, R], best first), the image
embeddings, and ``image_lse`` — each image's logsumexp of a·P over the run's concept set.

Approximation decision for ``score_free_concepts``: a new text is scored as if it had been added
to the run's concept set. Its softmax denominator on image i is logaddexp(image_lse[i], a·P_new[i]),
so its Q is exactly what a full re-run with the extended set would give for that concept (the
other concepts' scores would shift slightly, but they are not what is asked for). Several new
texts in one call are each added alone, not together, so the result for a text never depends on
what else was typed. The prior is over the layer's K neurons, as in the run. Only the stored
top-R images are used, so with R = 100 this equals SoftWPMI's default top_k = 100.

``compose_neuron`` follows the paper's A.4: a neuron's S best single concepts, every ordered pair
"w1 w2" (w1 ≠ w2) and the singles form a new concept set; Q is the softmax over that new set
and SoftWPMI is rerun with the prior over the same layer's neurons.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .scoring import DEFAULT_MEMORY_BUDGET, pmi_pass
from .similarity import soft_weights

__all__ = ["compose_neuron", "pair_texts", "score_free_concepts"]

ArrayLike = np.ndarray | Tensor


def _t(x: ArrayLike, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.as_tensor(x)
    return t.to(dtype) if dtype is not None else t


def _float(*xs: ArrayLike) -> torch.dtype:
    return torch.float64 if any(_t(x).dtype == torch.float64 for x in xs) else torch.float32


def pair_texts(singles: list[str]) -> list[str]:
    """All ordered pairs "w1 w2" of different positions, w1-major: the order ``pair_emb`` must follow."""
    return [f"{w1} {w2}" for i, w1 in enumerate(singles) for j, w2 in enumerate(singles) if i != j]


def score_free_concepts(
    top_idx: ArrayLike,
    image_emb: ArrayLike,
    image_lse: ArrayLike,
    new_emb: ArrayLike,
    a: float = 10.0,
    lam: float = 1.0,
    *,
    top_k: int = 100,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
) -> np.ndarray:
    """SoftWPMI [K, C] of C new concept embeddings for every neuron of a layer (see module docstring)."""
    dt = _float(image_emb, new_emb)
    top = _t(top_idx).long()
    img = _t(image_emb, dt)
    lse = _t(image_lse, dt).to(img.device)
    new = _t(new_emb, dt).to(img.device)
    if new.ndim == 1:
        new = new[None]
    if top.ndim != 2 or img.ndim != 2 or new.shape[1] != img.shape[1]:
        raise UserError("free-text query: embedding sizes of the run and the text encoder differ")
    top = top.to(img.device)
    K, R = top.shape
    if torch.isnan(lse[top]).any():
        raise UserError("free-text query: this run stores no softmax denominators for its top images")
    rows, pos = torch.unique(top, return_inverse=True)  # pos [K, R] into rows
    aP = (img @ new.T)[rows] * a  # [U, C]; N×D×C is cheap, copying U rows of img is not
    q = torch.exp(aP - torch.logaddexp(lse[rows, None], aP))
    w = soft_weights(R, top_k, p_start, p_end, dtype=dt, device=img.device)
    C = q.shape[1]
    logp = torch.empty(K, C, dtype=dt, device=img.device)
    cc = max(1, (1 << 24) // max(1, K * R))  # [K, R, cc] temporaries of at most ~64 MB
    for c0 in range(0, C, cc):
        terms = q[:, c0 : c0 + cc][pos]  # [K, R, cc]
        terms.sub_(1).mul_(w[None, :, None]).add_(1 + min_prob).log_()
        logp[:, c0 : c0 + cc] = terms.sum(dim=1)
    prior = torch.logsumexp(logp, dim=0) - math.log(K)
    return (logp - lam * prior).cpu().numpy()


def compose_neuron(
    top_idx: ArrayLike,
    unit: int,
    image_emb: ArrayLike,
    singles: list[str],
    singles_emb: ArrayLike,
    pair_emb: ArrayLike,
    a: float = 10.0,
    lam: float = 1.0,
    *,
    top_k: int = 100,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> list[tuple[str, float]]:
    """Rescore a neuron's singles and their ordered pairs with SoftWPMI over that new concept set.

    ``singles_emb`` [S, D] and ``pair_emb`` [S·(S−1), D] (in ``pair_texts(singles)`` order) are the
    text embeddings; returns [(text, score)] for all S + S·(S−1) texts, best first.
    """
    S = len(singles)
    pairs = pair_texts(singles)
    dt = _float(image_emb, singles_emb, pair_emb)
    top = _t(top_idx).long()
    img = _t(image_emb, dt)
    se = _t(singles_emb, dt).to(img.device).reshape(S, -1)
    pe = _t(pair_emb, dt).to(img.device).reshape(len(pairs), -1) if pairs else se[:0]
    if se.shape[1] != img.shape[1] or pe.shape[1] != img.shape[1]:
        raise UserError("composition: embedding sizes of the run and the text encoder differ")
    K, R = top.shape
    if not 0 <= unit < K:
        raise UserError(f"composition: unit {unit} is not in this layer (0..{K - 1})")
    texts = singles + pairs
    emb = torch.cat([se, pe])
    w = soft_weights(R, top_k, p_start, p_end, dtype=dt, device=img.device)
    row = torch.empty(len(texts), dtype=dt, device=img.device)

    def sink(_layer: int, m0: int, scores: Tensor) -> None:
        row[m0 : m0 + scores.shape[1]] = scores[unit]

    pmi_pass(
        [top.to(img.device)],
        img,
        emb,
        a=a,
        lam=lam,
        weights=w,
        min_prob=min_prob,
        sink=sink,
        memory_budget=memory_budget,
        all_rows=False,
    )
    vals = row.cpu().tolist()
    order = sorted(range(len(texts)), key=lambda i: (-vals[i], i))
    return [(texts[i], float(vals[i])) for i in order]
