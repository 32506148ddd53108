"""The main screen's neuron view, filtered and sorted in memory (numpy; no UI, no SQL).

A keystroke in the filter must update the table in milliseconds even for 100k neurons, so the
run's neurons are loaded once and every filter is a numpy mask over precomputed columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dissect_tui.methods import DEFAULT_CUTOFF
from dissect_tui.store.browse import NeuronTable

SORT_KEYS = ("layer", "unit", "label", "score", "query")


@dataclass
class Filters:
    layers: frozenset[int] = frozenset()  # empty: all layers
    cutoff: float = DEFAULT_CUTOFF
    interpretable_only: bool = False
    text: str = ""
    pinned_only: bool = False


@dataclass
class QueryScores:
    """Scores of every neuron for a free-text concept query (extra columns when composed)."""

    title: str
    scores: np.ndarray  # [N] aligned with the NeuronTable
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. {"A": [N], "B": [N]}


class NeuronModel:
    def __init__(self, table: NeuronTable) -> None:
        self.table = table
        n = len(table)
        self.n = n
        self._hay: list[str] = []
        self.set_top_concepts(table.top_concepts)
        # Stable orders per sort key, computed once; a filter then only masks them.
        pos = np.arange(n)
        self._orders: dict[str, np.ndarray] = {
            "layer": pos,
            "unit": np.lexsort((table.layer_idx, table.unit)),
            "score": np.argsort(-table.similarity, kind="stable"),
        }
        self.query: QueryScores | None = None
        self.pinned = np.zeros(n, dtype=bool)
        self._index: dict[tuple[str, int], int] | None = None  # built on first lookup

    def set_top_concepts(self, tops: list[str]) -> None:
        """Lower-cased haystack: label and top concepts, searched with `in` per keystroke."""
        self.table.top_concepts = tops
        self._hay = [f"{a}\t{b}".casefold() for a, b in zip(self.table.label, tops, strict=True)]

    # -- lookups -----------------------------------------------------------------------
    def row_of(self, layer: str, unit: int) -> int | None:
        if self._index is None:
            t = self.table
            self._index = {
                (t.layers[li], u): i
                for i, (li, u) in enumerate(zip(t.layer_idx.tolist(), t.unit.tolist(), strict=True))
            }
        return self._index.get((layer, unit))

    def key(self, row: int) -> tuple[str, int]:
        return self.table.layers[int(self.table.layer_idx[row])], int(self.table.unit[row])

    def set_query(self, query: QueryScores | None) -> None:
        self.query = query
        if query is not None:
            self._orders["query"] = np.argsort(-query.scores, kind="stable")
        else:
            self._orders.pop("query", None)

    # -- filtering ---------------------------------------------------------------------
    def interpretable(self, cutoff: float) -> np.ndarray:
        return self.table.similarity > cutoff

    def mask(self, f: Filters) -> np.ndarray:
        m = np.ones(self.n, dtype=bool)
        if f.layers:
            m &= np.isin(self.table.layer_idx, np.fromiter(f.layers, dtype=np.int32))
        if f.interpretable_only:
            m &= self.interpretable(f.cutoff)
        if f.pinned_only:
            m &= self.pinned
        text = f.text.strip().casefold()
        if text:
            hit = np.zeros(self.n, dtype=bool)
            hay = self._hay
            cand = np.flatnonzero(m)
            hit[[i for i in cand.tolist() if text in hay[i]]] = True
            m &= hit
        return m

    def view(self, f: Filters, sort: str = "layer", reverse: bool = False) -> np.ndarray:
        """Row indices of the filtered neurons in display order."""
        if sort == "label" and "label" not in self._orders:  # sorting 100k strings: only when asked
            # Case-insensitive, as a reader expects: "ball" before "Mrs".
            keys = np.array([s.casefold() for s in self.table.label], dtype=object)
            self._orders["label"] = np.argsort(keys, kind="stable")
        order = self._orders.get(sort, self._orders["layer"])
        if reverse:
            order = order[::-1]
        return order[self.mask(f)[order]]

    def layer_counts(self, cutoff: float) -> list[tuple[str, int, int]]:
        """(layer, neurons, interpretable at cutoff) per layer."""
        k = len(self.table.layers)
        total = np.bincount(self.table.layer_idx, minlength=k)
        good = np.bincount(self.table.layer_idx, weights=self.interpretable(cutoff), minlength=k)
        return [(name, int(total[i]), int(good[i])) for i, name in enumerate(self.table.layers)]
