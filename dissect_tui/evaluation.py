"""The maths behind `evaluate` and `analyze`: pure functions over numpy arrays.

Nothing here reads a cache, loads a model or prints; the commands gather the arrays
(labels, embeddings, weights, activations) and these functions turn them into numbers, so
every metric can be checked on hand-built inputs whose right answers are known.

Conventions: ranks are 1-based; a true class missing from a ranked list has rank NaN and
counts as a miss for top-k accuracy. Cosines re-normalise their inputs, so callers may pass
raw embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------------------
# Text matching and cosines


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive key used to find class names in a concept set."""
    return " ".join(text.lower().split())


def match_class_names(class_names: Sequence[str], concept_texts: Sequence[str]) -> np.ndarray:
    """[C] position of each class name in the concept list (first match wins), -1 when absent."""
    where: dict[str, int] = {}
    for i, text in enumerate(concept_texts):
        where.setdefault(normalize_text(text), i)
    return np.array([where.get(normalize_text(c), -1) for c in class_names], dtype=np.int64)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[K] cosine between row k of a and row k of b."""
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine needs equal shapes, got {a.shape} and {b.shape}")
    return np.einsum("kd,kd->k", _unit_rows(a), _unit_rows(b))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[A, B] cosine between every row of a and every row of b."""
    return _unit_rows(a) @ _unit_rows(b).T


# --------------------------------------------------------------------------------------
# Ranks and accuracy of the true class


def ranks_in_lists(ranked: np.ndarray, true_idx: np.ndarray) -> np.ndarray:
    """[K] 1-based position of true_idx[k] in row k of ranked [K, T] (best first); NaN if absent.

    Rows with true_idx < 0 (class not in the concept set) are NaN as well.
    """
    ranked = np.asarray(ranked)
    true_idx = np.asarray(true_idx)
    hits = ranked == true_idx[:, None]
    found = hits.any(axis=1) & (true_idx >= 0)
    ranks = np.full(len(true_idx), np.nan)
    ranks[found] = hits[found].argmax(axis=1) + 1
    return ranks


def accuracy_at(ranks: np.ndarray, k: int) -> float:
    """Fraction of ranks <= k; NaN (not found) counts as a miss."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return math.nan
    return float(np.mean(np.nan_to_num(ranks, nan=np.inf) <= k))


@dataclass
class LabelMetrics:
    """Final-layer label quality against the class names (paper Tables 1-3)."""

    n_units: int
    n_matched: int  # units whose class name is in the concept set
    clip_cos: float | None = None
    mpnet_cos: float | None = None
    top1: float | None = None
    top5: float | None = None
    mean_rank: float | None = None
    median_rank: float | None = None
    rank_scope: str = ""  # "all M concepts" or "stored top T"
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float | None]]:
        """(metric, value) pairs in display order; None values are metrics not computed."""
        return [
            ("clip_cos", self.clip_cos),
            ("mpnet_cos", self.mpnet_cos),
            ("top1", self.top1),
            ("top5", self.top5),
            ("mean_rank", self.mean_rank),
            ("median_rank", self.median_rank),
            ("n_units", float(self.n_units)),
            ("n_matched", float(self.n_matched)),
        ]


def label_metrics(
    ranks: np.ndarray | None,
    true_idx: np.ndarray,
    clip_cos: np.ndarray | None = None,
    mpnet_cos: np.ndarray | None = None,
    list_length: int | None = None,
    rank_scope: str = "",
) -> LabelMetrics:
    """Summarise per-unit results.

    ranks: [K] 1-based rank of each unit's class name among its concepts (NaN: not in the
    ranked list; None: no ranking available); true_idx: [K] index of the class name in the
    concept list (-1: absent); clip_cos / mpnet_cos: [K] cosine between each unit's label and
    its class name; list_length: length of a truncated ranked list (NaN ranks then count as
    list_length + 1, a lower bound, and a note says so). Accuracy and ranks are computed over
    the units whose class is in the concept set.
    """
    true_idx = np.asarray(true_idx)
    matched = true_idx >= 0
    out = LabelMetrics(n_units=len(true_idx), n_matched=int(matched.sum()), rank_scope=rank_scope)
    if clip_cos is not None:
        out.clip_cos = float(np.mean(clip_cos))
    if mpnet_cos is not None:
        out.mpnet_cos = float(np.mean(mpnet_cos))
    if ranks is None or not matched.any():
        return out
    ranks = np.asarray(ranks, dtype=np.float64)[matched]
    out.top1 = accuracy_at(ranks, 1)
    out.top5 = accuracy_at(ranks, 5)
    missing = int(np.isnan(ranks).sum())
    if missing:
        if list_length is None:
            raise ValueError("NaN ranks need list_length (the length of the truncated list)")
        out.notes.append(
            f"{missing} true classes are outside the top {list_length}; their rank counted as "
            f"{list_length + 1} (mean/median rank are lower bounds)"
        )
        ranks = np.nan_to_num(ranks, nan=list_length + 1)
    out.mean_rank = float(np.mean(ranks))
    out.median_rank = float(np.median(ranks))
    return out


# --------------------------------------------------------------------------------------
# Neuron-weight analysis (paper Section 5)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else math.nan


@dataclass
class WeightAnalysis:
    ks: list[int]
    kth: list[float]  # mean over classes of sim(class, neuron with the k-th highest weight)
    top_k_mean: list[float]  # mean over classes of the mean similarity of the top-k weights
    all_mean: float  # mean similarity over every (class, neuron) pair
    corr_all: float  # Pearson(weight, similarity) over every weight
    corr_top: float  # the same over the n_top highest weights
    n_top: int

    def rows(self, prefix: str) -> list[tuple[str, float]]:
        out = [(f"{prefix}.k{k}", v) for k, v in zip(self.ks, self.kth, strict=True)]
        out += [(f"{prefix}.top{k}_mean", v) for k, v in zip(self.ks, self.top_k_mean, strict=True)]
        out += [
            (f"{prefix}.all", self.all_mean),
            (f"{prefix}.pearson_all", self.corr_all),
            (f"{prefix}.pearson_top", self.corr_top),
            (f"{prefix}.n_top", float(self.n_top)),  # how many weights pearson_top covers
        ]
        return out


def weight_similarity(
    weights: np.ndarray, sim: np.ndarray, max_k: int = 10, top_weights: int = 50_000
) -> WeightAnalysis:
    """Relate final-layer weights W [C, K] to concept similarity S [C, K].

    S[c, j] is the similarity between the label of input neuron j and the name of class c.
    For each class its weights are ranked high to low; kth[k-1] averages S at the k-th
    highest weight over classes. Correlations are over all C*K weights and over the
    ``top_weights`` largest weights (all of them when there are fewer).
    """
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(sim, dtype=np.float64)
    if w.shape != s.shape:
        raise ValueError(f"weights {w.shape} and similarities {s.shape} differ in shape")
    c, k_in = w.shape
    max_k = max(1, min(max_k, k_in))
    order = np.argsort(-w, axis=1, kind="stable")[:, :max_k]  # [C, max_k]
    s_sorted = np.take_along_axis(s, order, axis=1)
    kth = s_sorted.mean(axis=0)
    cum = np.cumsum(s_sorted, axis=1) / np.arange(1, max_k + 1)
    n_top = min(top_weights, w.size)
    flat_w, flat_s = w.ravel(), s.ravel()
    top = np.argpartition(-flat_w, n_top - 1)[:n_top] if n_top < w.size else np.arange(w.size)
    return WeightAnalysis(
        ks=list(range(1, max_k + 1)),
        kth=[float(v) for v in kth],
        top_k_mean=[float(v) for v in cum.mean(axis=0)],
        all_mean=float(s.mean()),
        corr_all=pearson(flat_w, flat_s),
        corr_top=pearson(flat_w[top], flat_s[top]),
        n_top=int(n_top),
    )


# --------------------------------------------------------------------------------------
# Class prediction from descriptions (paper appendix A.6)


@dataclass
class PredictionResult:
    accuracy: float  # agreement with the network's own prediction
    n_images: int
    network_pred: np.ndarray  # [N] argmax of the final layer
    neuron: np.ndarray  # [N] input neuron with the highest contribution W[c, j] * a_j
    description_pred: np.ndarray  # [N] class whose name is closest to that neuron's label
    linear_agreement: float | None = None  # argmax(a W^T + b) == argmax(logits), a sanity check


def predict_from_descriptions(
    logits: np.ndarray,
    inputs: np.ndarray,
    weights: np.ndarray,
    neuron_class_sim: np.ndarray,
    bias: np.ndarray | None = None,
    chunk: int = 4096,
) -> PredictionResult:
    """logits [N, C], inputs [N, K] (what feeds the classifier), W [C, K], sim [K, C].

    neuron_class_sim[j, c] is the similarity between neuron j's label and class c's name.
    """
    logits = np.asarray(logits, dtype=np.float32)
    inputs = np.asarray(inputs, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    n = logits.shape[0]
    if inputs.shape[0] != n or w.shape != (logits.shape[1], inputs.shape[1]):
        raise ValueError(f"shapes do not fit: logits {logits.shape}, inputs {inputs.shape}, W {w.shape}")
    label_class = np.asarray(neuron_class_sim).argmax(axis=1)  # [K]
    pred = logits.argmax(axis=1)
    neuron = np.empty(n, dtype=np.int64)
    agree = 0
    for start in range(0, n, chunk):
        a = inputs[start : start + chunk]
        p = pred[start : start + chunk]
        neuron[start : start + chunk] = (w[p] * a).argmax(axis=1)
        recon = a @ w.T + (0 if bias is None else np.asarray(bias, dtype=np.float32))
        agree += int((recon.argmax(axis=1) == p).sum())
    described = label_class[neuron]
    return PredictionResult(
        accuracy=float(np.mean(described == pred)) if n else math.nan,
        n_images=n,
        network_pred=pred,
        neuron=neuron,
        description_pred=described,
        linear_agreement=agree / n if n else None,
    )


# --------------------------------------------------------------------------------------
# Interpretability (paper appendix A.8)


def interpretable_fraction(scores: np.ndarray, tau: float) -> float:
    """Fraction of neurons whose score is above tau (the indexer's `interpretable` rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean(scores > tau)) if scores.size else math.nan


def crossing_thresholds(scores: np.ndarray, levels: Sequence[float]) -> list[float]:
    """For each level L, the cutoff tau_L where the interpretable fraction crosses L.

    The fraction f(tau) = mean(score > tau) falls as tau rises. tau_L is the ceil(L*K)-th
    highest score: for every tau below tau_L at least a fraction L of the neurons is
    interpretable, and at tau_L itself fewer than L are.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    out = []
    for level in levels:
        if not s.size:
            out.append(math.nan)
            continue
        need = max(1, math.ceil(level * len(s) - 1e-9))
        out.append(float(s[min(need, len(s)) - 1]))
    return out
