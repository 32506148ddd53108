"""`index --embeddings-from OTHER.duckdb`: the CLIP side of a run taken from another cache.

Image embeddings depend only on the probe images and the CLIP model; concept embeddings only on
the texts, the CLIP text tower and the prompt template. When several models are dissected on one
probe, the second and later runs take both from the first cache instead of running CLIP again, so
CLIP is not even loaded (its weights may be gone from the machine). The probe must be the same
images in the same order; a concept the other cache never encoded is encoded only if the CLIP can
be loaded, otherwise the command says which concepts are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dissect_tui.errors import CacheError, UserError
from dissect_tui.store import open_cache
from dissect_tui.text_encoding import embedding_key, tower_key


@dataclass
class EmbeddingSource:
    """Image and concept embeddings of another cache built on the same probe with one CLIP."""

    path: Path
    run: dict[str, Any]  # the other cache's index run
    tower: str  # identity of its CLIP text tower (no template)
    clip_spec: str  # NAME:PRETRAINED of its CLIP, to load it for concepts it lacks
    image_ids: np.ndarray  # [N] sorted
    image_emb: np.ndarray  # [N, D]
    _concepts: dict[str, dict[str, np.ndarray]]  # embedding key -> text -> vector

    def images(self, ok_ids: np.ndarray) -> np.ndarray:
        """Embeddings of these image ids, or one clear error naming the first missing image."""
        rows = np.searchsorted(self.image_ids, ok_ids)
        inside = rows < len(self.image_ids)
        found = np.zeros(len(ok_ids), dtype=bool)
        found[inside] = self.image_ids[rows[inside]] == ok_ids[inside]
        if not found.all():
            missing = ok_ids[~found]
            raise UserError(
                f"{len(missing)} probe images decoded here have no embedding in {self.path} (first: image "
                f"{int(missing[0])}): it was built from other image files; index without --embeddings-from"
            )
        return self.image_emb[rows]

    def concepts(self, template: str | None, texts: list[str]) -> dict[str, np.ndarray]:
        """The stored embeddings of whichever of these texts the other cache encoded this way."""
        table = self._concepts.get(embedding_key(self.tower, template), {})
        return {t: table[t] for t in texts if t in table}


def open_embedding_source(path: Path, probe: Any) -> EmbeddingSource:
    """Read another cache's embeddings after checking it was built on exactly this probe."""
    path = Path(path).expanduser()
    try:
        reader = open_cache(path)
    except CacheError as exc:
        raise UserError(f"--embeddings-from: {exc}") from None
    with reader:
        run = reader.index_run()
        cols, rows = reader.query("SELECT path, source FROM images ORDER BY image_id")
        theirs = [(r[0], r[1]) for r in rows]
        ours = [(it.path, it.source) for it in probe]
        _check_same_probe(path, ours, theirs)
        ids, emb = reader.image_embeddings()
        _, keyed = reader.query(
            "SELECT e.clip_key, c.text FROM concept_embeddings e JOIN concepts c USING (concept_id)"
        )
        keys = sorted({k for k, _ in keyed})
        concepts = {key: reader.embeddings_by_text(key, [t for k, t in keyed if k == key]) for key in keys}
    tower = tower_key(str(run.get("clip_key") or ""), run.get("template"))
    spec = f"{run.get('clip_model')}:{run.get('clip_pretrained')}"
    return EmbeddingSource(path, run, tower, spec, ids, emb, concepts)


def _check_same_probe(path: Path, ours: list[tuple[str, str]], theirs: list[tuple[str, str]]) -> None:
    if ours == theirs:
        return
    where = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if where is None:
        detail = f"{len(theirs):,} images there, {len(ours):,} here"
    else:
        detail = f"image {where} is {theirs[where][0]} there and {ours[where][0]} here"
    raise UserError(
        f"--embeddings-from {path} was built on other probe images ({detail}); give the same --probe "
        "specs in the same order, or index without --embeddings-from"
    )
