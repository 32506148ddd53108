"""The browsing session: one typed object every screen shares (no untyped app attributes).

It holds what outlives a screen: the open cache, the run, the neuron model with its pins, the
filters and sort order, the sidecar, and the CLIP explainer. Screens receive it in their
constructor; they talk to each other through Textual messages and ``dismiss`` results only.
No UI and no torch here: the explainer module (torch) is imported the first time it is needed,
from a worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dissect_tui.methods import DEFAULT_CUTOFF
from dissect_tui.store.reader import CacheReader
from dissect_tui.store.sidecar import Sidecar, run_key, sidecar_path
from dissect_tui.tui.model import Filters, NeuronModel

if TYPE_CHECKING:
    from dissect_tui.explain import Explainer


@dataclass
class BrowseSession:
    """One run of one cache, as browsed. ``reader`` is an open read-only CacheReader."""

    reader: CacheReader
    requested_run: int | None = None
    image_cls: Any = None  # textual-image widget class for thumbnails, None: placeholders
    sidecar_file: Path | None = None  # where pins and compositions go (default: beside the cache)
    clip: str | None = None  # CLIP spec replacing the run's (its weights moved), e.g. "ViT-B-16:./clip.pt"
    last_pair: tuple[str, str] = ("", "")  # the two-concept dialog starts with the last A and B
    run: dict[str, Any] = field(default_factory=dict)
    model: NeuronModel | None = None
    filters: Filters = field(default_factory=Filters)
    sort: str = "layer"
    reverse: bool = False
    sidecar: Sidecar | None = None
    _explainer: Explainer | None = field(default=None, init=False, repr=False)
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def run_id(self) -> int:
        return int(self.run["run_id"])

    @property
    def cache_stem(self) -> str:
        return self.reader.path.stem if self.reader.path else "neurons"

    def cursor(self) -> CacheReader:
        """A reader on its own DuckDB cursor, for one worker thread (close it when done)."""
        return CacheReader(self.reader.con.cursor(), self.reader.path)

    def start(self, run: dict[str, Any], model: NeuronModel) -> None:
        """The run has been loaded: the model replaces any previous one, τ starts at the run's cutoff."""
        self.run = run
        self.model = model
        cutoff = run.get("cutoff")
        self.filters = Filters(cutoff=float(cutoff) if cutoff is not None else DEFAULT_CUTOFF)

    # -- sidecar (call from a worker thread: SQLite file I/O) -----------------------------
    def open_sidecar(self, run: dict[str, Any]) -> str | None:
        """Open the writable sidecar for ``run``; returns a warning when results cannot be saved."""
        self.sidecar = None
        if self.reader.path is None:
            return None
        try:
            path = self.sidecar_file or sidecar_path(self.reader.path)
            self.sidecar = Sidecar(path, run_key(run))
        except Exception as exc:  # saving is a convenience: browsing must go on without it
            return f"results will not be saved: {exc}"
        return None

    def toggle_pin(self, row: int) -> tuple[str, int, bool]:
        """Pin or unpin a neuron in memory; returns (layer, unit, pinned) for :meth:`save_pin`."""
        assert self.model is not None
        self.model.pinned[row] = not self.model.pinned[row]
        layer, unit = self.model.key(row)
        return layer, unit, bool(self.model.pinned[row])

    def save_pin(self, layer: str, unit: int, pinned: bool) -> None:
        if self.sidecar is not None:
            self.sidecar.set_pin(layer, unit, pinned)

    # -- CLIP (call from a worker thread: loads torch and the text tower) -----------------
    @property
    def clip_loaded(self) -> bool:
        """True once the explainer has loaded CLIP (queries then take milliseconds)."""
        return self._explainer is not None and self._explainer.clip_loaded

    def explainer(self) -> Explainer:
        """The run's CLIP-backed explainer, created on first use and kept for the session."""
        with self._explainer_lock:
            if self._explainer is None:
                from dissect_tui.explain import Explainer

                self._explainer = Explainer(self.cursor, self.run, clip=self.clip)
            return self._explainer
