"""The non-UI bridge for concept queries and two-concept explanations over a stored run.

Loads the run's CLIP text tower, encodes new texts, and scores them with SoftWPMI against the
stored image embeddings, top images and per-image softmax denominators
(dissect_tui.concept_query does the maths). Imports torch: the TUI imports this module only
inside a worker thread, the first time a feature needs CLIP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dissect_tui.errors import UserError
from dissect_tui.store.browse import NeuronTable
from dissect_tui.store.reader import CacheReader

TOP_IMAGES = 100  # SoftWPMI's B_k: the top 100 images of each neuron
BREADTHS = (10, 20, 100)


def same_text_tower(key: str, recorded: str) -> bool:
    """Whether two CLIP keys (clip_backend.ClipModel.key) name the same text tower. A local weights
    file is keyed ``NAME:FILENAME#SIZE-SHA``: a moved or renamed copy is the same tower when the
    model name and the content fingerprint agree."""
    if key == recorded:
        return True
    if "#" not in key or "#" not in recorded:
        return False
    (name, rest), (rname, rrest) = key.split(":", 1), recorded.split(":", 1)
    return name == rname and rest.split("#", 1)[1] == rrest.split("#", 1)[1]


class Cancelled(Exception):
    """Raised from a progress callback when the user cancelled the computation."""


def query_parameters(run: dict[str, Any]) -> tuple[float, float]:
    """SoftWPMI's ``a`` and ``lam`` for free-text queries over this run: the run's own when its
    method has them (its image_softmax was computed with that ``a``), else SoftWPMI's defaults.
    A value a damaged or hostile cache holds (null, text, inf, out of range) is one clear error."""
    from dissect_tui.methods import METHODS, SOFT_WPMI_A

    defaults = METHODS["soft_wpmi"].defaults()
    hp = run.get("hyperparameters") or {}
    method = METHODS.get(str(run.get("similarity")))
    if not isinstance(hp, dict) or method is None or not method.uses_softmax:
        return SOFT_WPMI_A, float(defaults["lam"])
    try:
        checked = method.validate({k: hp[k] for k in ("a", "lam") if k in hp})
    except UserError as exc:
        raise UserError(f"run {run.get('run_id')} records unusable hyperparameters: {exc}") from None
    return float(checked["a"]), float(checked["lam"])


class Explainer:
    """One run's CLIP and stored tensors, loaded lazily and kept for the session.

    ``cursor`` returns a fresh CacheReader on its own DuckDB cursor (one per calling thread).
    """

    def __init__(
        self, cursor: Callable[[], CacheReader], run: dict[str, Any], clip: str | None = None
    ) -> None:
        """``clip``: a CLIP spec (``NAME:PRETRAINED``, e.g. ``ViT-B-16:./clip.pt``) to load instead of
        the run's recorded one, for when its weights live elsewhere on this machine; it must be the
        same text tower (same model, same weights file contents)."""
        self._cursor = cursor
        self.run = run
        self.clip_override = clip
        self.a, self.lam = query_parameters(run)
        self._clip: Any = None
        self._images: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None
        self._tops: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------
    @property
    def clip_loaded(self) -> bool:
        return self._clip is not None

    @property
    def run_clip_spec(self) -> str:
        return f"{self.run.get('clip_model')}:{self.run.get('clip_pretrained')}"

    @property
    def clip_spec(self) -> str:
        return self.clip_override or self.run_clip_spec

    def clip(self) -> Any:
        with self._lock:
            if self._clip is None:
                from dissect_tui.clip_backend import load_clip

                hint = (
                    ""
                    if self.clip_override
                    else "; if its weights are elsewhere, pass --clip NAME:PATH (browse, compose)"
                )
                try:
                    clip = load_clip(self.clip_spec)
                except UserError as exc:
                    raise UserError(
                        f"concept queries need this run's CLIP ({self.clip_spec}): {exc}{hint}"
                    ) from None
                except Exception as exc:  # a damaged or mismatched checkpoint
                    raise UserError(f"cannot load this run's CLIP {self.clip_spec}: {exc}{hint}") from None
                recorded = self.run.get("clip_key")
                if self.clip_override and recorded and not same_text_tower(clip.key, recorded):
                    raise UserError(
                        f"--clip {self.clip_override} is not this run's CLIP: it is {clip.key}, the run used "
                        f"{recorded}; scores would be wrong"
                    )
                self._clip = clip
            return self._clip

    def _image_data(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(image ids [N] sorted, embeddings [N, D], softmax log-denominators [N]) of the run."""
        if self._images is None:
            cur = self._cursor()
            try:
                ids, emb = cur.image_embeddings()
                lse_ids, lse = cur.image_softmax(self.run["run_id"])
            finally:
                cur.close()
            lse_full = np.full(len(ids), np.nan, dtype=np.float32)
            pos = np.searchsorted(ids, lse_ids)
            ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == lse_ids) if len(ids) else pos < 0
            lse_full[pos[ok]] = lse[ok]
            self._images = (ids, torch.from_numpy(emb), torch.from_numpy(lse_full))
        return self._images

    def top_rows(self, layer: str) -> torch.Tensor:
        """[K, R] rows into the image embeddings of every neuron's top images."""
        if layer not in self._tops:
            ids, _, _ = self._image_data()
            cur = self._cursor()
            try:
                top_ids = cur.layer_top_images(layer, n=TOP_IMAGES)
            finally:
                cur.close()
            rows = np.searchsorted(ids, top_ids)
            if (
                len(ids) == 0
                or np.any(rows >= len(ids))
                or np.any(ids[np.minimum(rows, len(ids) - 1)] != top_ids)
            ):
                raise UserError(f"layer {layer}: a top image has no stored embedding; rebuild the cache")
            self._tops[layer] = torch.from_numpy(rows.astype(np.int64))
        return self._tops[layer]

    # -- concept query ---------------------------------------------------------------------
    def encode(self, texts: list[str], on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Free texts encoded exactly as the run's concepts were (same tower, same template)."""
        from dissect_tui.text_encoding import TextEncoder

        encoder = TextEncoder(self.clip(), self.run.get("template"))
        emb = encoder.encode(texts, batch_size=64, on_batch=on_batch)
        _, img, _ = self._image_data()
        if emb.shape[1] != img.shape[1]:
            raise UserError(
                f"CLIP {self.clip_spec} gives {emb.shape[1]}-d text embeddings but the cache stores "
                f"{img.shape[1]}-d image embeddings"
            )
        return emb.float().cpu()

    def query_scores(self, texts: list[str], table: NeuronTable) -> np.ndarray:
        """SoftWPMI score of every neuron of ``table`` for each free text: [len(table), len(texts)]."""
        new_emb = self.encode(texts)  # first: a missing CLIP is the likely failure
        from dissect_tui.concept_query import score_free_concepts

        _, img, lse = self._image_data()
        out = np.full((len(table), len(texts)), np.nan, dtype=np.float64)
        for li, layer in enumerate(table.layers):
            where = np.flatnonzero(table.layer_idx == li)
            if not len(where):
                continue
            scores = score_free_concepts(self.top_rows(layer), img, lse, new_emb, a=self.a, lam=self.lam)
            scores = np.asarray(torch.as_tensor(scores).double().cpu())
            out[where] = scores[table.unit[where]]
        return out

    # -- two-concept explanation of one neuron ---------------------------------------------
    def compose(
        self,
        layer: str,
        unit: int,
        breadth: int,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
        """Paper A.4: the neuron's top ``breadth`` single concepts and every ordered pair "w1 w2",
        rescored together with SoftWPMI. Returns (breadth used, pairs best first, singles best first).
        ``cancelled`` is polled after each encoded batch (then :class:`Cancelled` is raised)."""

        def on_texts(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if done and cancelled is not None and cancelled():
                raise Cancelled

        found = self.compose_many(layer, [unit], breadth, on_texts=on_texts)
        if not found:
            raise UserError(f"{layer}:{unit} has fewer than two stored concepts; nothing to compose")
        if cancelled is not None and cancelled():
            raise Cancelled
        _, used, pairs, singles = found[0]
        return used, pairs, singles

    # -- many neurons at once (`dissect-tui compose`) ------------------------------------------
    def compose_many(
        self,
        layer: str,
        units: list[int],
        breadth: int,
        on_texts: Callable[[int, int], None] | None = None,
    ) -> list[tuple[int, int, list[tuple[str, float]], list[tuple[str, float]]]]:
        """:meth:`compose` for several neurons of one layer: [(unit, breadth used, pairs, singles)].

        Pair texts repeat across neurons (they share top concepts), so each distinct one is encoded
        once; ``on_texts(done, total)`` follows the encoding. Neurons with fewer than two stored
        concepts are left out."""
        from dissect_tui.concept_query import compose_neuron, pair_texts

        run_id = self.run["run_id"]
        cur = self._cursor()
        try:
            rows = cur.neuron_concepts(run_id, layer, None, limit=breadth)
            cids, texts = cur.run_concepts(run_id)
            by_text = dict(zip(texts, cids.tolist(), strict=True))
            wanted = set(units)
            singles: dict[int, list[str]] = {}
            for _, unit, _, text, _ in rows:
                if unit in wanted:
                    singles.setdefault(int(unit), []).append(text)
            known = sorted({t for s in singles.values() for t in s})
            emb = cur.concept_embeddings(self.run["clip_key"], np.array([by_text[t] for t in known]))
        finally:
            cur.close()
        single_emb = dict(zip(known, torch.from_numpy(np.asarray(emb, dtype=np.float32)), strict=True))
        todo = [u for u in units if len(singles.get(u, [])) >= 2]
        if not todo:
            return []
        distinct = list(dict.fromkeys(p for u in todo for p in pair_texts(singles[u])))
        self.clip()  # load first: the slow step, before progress starts
        done = 0

        def on_batch(n: int) -> None:
            nonlocal done
            done += n
            if on_texts is not None:
                on_texts(done, len(distinct))

        if on_texts is not None:
            on_texts(0, len(distinct))
        encoded = self.encode(distinct, on_batch=on_batch) if distinct else torch.empty(0)
        pair_emb = {t: encoded[i] for i, t in enumerate(distinct)}
        _, img, _ = self._image_data()
        top = self.top_rows(layer)
        out = []
        for unit in todo:
            names = singles[unit]
            pairs = pair_texts(names)
            ranked = compose_neuron(
                top,
                unit,
                img,
                names,
                torch.stack([single_emb[t] for t in names]),
                torch.stack([pair_emb[t] for t in pairs]),
                a=self.a,
                lam=self.lam,
            )
            single_set = set(names)
            out.append(
                (
                    unit,
                    len(names),
                    [(t, float(v)) for t, v in ranked if t not in single_set],
                    [(t, float(v)) for t, v in ranked if t in single_set],
                )
            )
        return out
