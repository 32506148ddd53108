"""Text encoders for comparing labels with class names: CLIP's text tower and mpnet.

One small interface, ``encode(texts) -> np.ndarray [M, D]`` float32 with unit rows, so the
metrics in dissect_tui.evaluation never care which model produced the vectors and tests can
pass a double. The CLIP encoder can start from embeddings already stored in the cache and
load the text tower only for texts it has not seen. mpnet (sentence-transformers) is an
optional dependency: ``pip install 'dissect-tui[mpnet]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from dissect_tui.errors import OfflineError, UserError

DEFAULT_MPNET = "all-mpnet-base-v2"


class MissingDependency(UserError):
    """An optional package is not installed; the message says how to install it."""


class TextEncoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), D] float32, L2-normalised rows."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        x = x.reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def encode_unique(encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """Encode each distinct text once (labels repeat a lot) and scatter back to [len(texts), D]."""
    uniq: dict[str, int] = {}
    index = np.array([uniq.setdefault(t, len(uniq)) for t in texts], dtype=np.int64)
    emb = encoder.encode(list(uniq))
    return np.asarray(emb, dtype=np.float32)[index] if len(texts) else emb


class ClipTextEncoder:
    """The text tower of an open_clip model (dissect_tui.clip_backend.ClipModel)."""

    def __init__(self, clip: object, name: str) -> None:
        self.clip = clip
        self.name = name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, int(getattr(self.clip, "embed_dim", 0))), dtype=np.float32)
        emb = self.clip.encode_texts(list(texts))  # type: ignore[attr-defined]
        return _normalise(emb.detach().float().cpu().numpy())


def load_clip_text(spec: str, device: str = "cpu") -> ClipTextEncoder:
    """Load an open_clip model by spec ("ViT-B-16:openai", "NAME:/path/weights.pt", …)."""
    from dissect_tui.clip_backend import load_clip  # torch + open_clip: only when needed

    return ClipTextEncoder(load_clip(spec, device=device), f"CLIP {spec}")


class CachedTextEncoder:
    """Stored embeddings first (same text tower, so identical vectors), a lazily loaded encoder for the rest.

    ``fresh`` keeps what the encoder computed (text -> unit vector, in encoding order);
    ``store_key``, when set, is the text tower's key (``concept_embeddings.clip_key``) under
    which those vectors may be saved to the cache: None when they must not be (another model).
    """

    def __init__(
        self,
        stored: Mapping[str, np.ndarray],
        fallback: Callable[[], TextEncoder],
        name: str,
        store_key: str | None = None,
    ):
        self.stored = dict(stored)
        self._fallback_factory = fallback
        self._fallback: TextEncoder | None = None
        self.name = name
        self.store_key = store_key
        self.fresh: dict[str, np.ndarray] = {}
        self.n_encoded = 0  # texts that needed the model (reported by the commands)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.stored]
        if missing:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            fresh = dict(zip(missing, _normalise(self._fallback.encode(missing)), strict=True))
            self.stored.update(fresh)
            self.fresh.update(fresh)
            self.n_encoded += len(missing)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return _normalise(np.stack([self.stored[t] for t in texts]))


class SentenceEncoder:
    """A sentence-transformers model (mpnet by default)."""

    def __init__(self, model: object, name: str) -> None:
        self.model = model
        self.name = name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.model.encode(  # type: ignore[attr-defined]
            list(texts), batch_size=256, convert_to_numpy=True, normalize_embeddings=True
        )
        return _normalise(np.asarray(emb))


def load_mpnet(spec: str = DEFAULT_MPNET, device: str | None = None) -> SentenceEncoder:
    """A sentence-transformers model by hub name or local folder (device None: its own choice).

    Raises MissingDependency when sentence-transformers is not installed, OfflineError when
    the hub download fails (naming the local-folder option), UserError for a bad folder.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingDependency(
            "mpnet similarity needs sentence-transformers: pip install 'dissect-tui[mpnet]' "
            "(or pass --mpnet none)"
        ) from None
    local = Path(spec).expanduser()
    try:
        model = SentenceTransformer(str(local) if local.exists() else spec, device=device)
    except Exception as exc:  # noqa: BLE001 - hub/IO/format errors all mean "could not load"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if local.exists():
            raise UserError(f"{local} is not a sentence-transformers model folder: {first}") from None
        raise OfflineError(
            f"cannot load sentence-transformers model {spec!r} ({first}); offline? On a connected "
            f"machine run SentenceTransformer({spec!r}).save('DIR'), copy DIR here and pass "
            "--mpnet DIR, or --mpnet none to skip"
        ) from None
    return SentenceEncoder(model, f"mpnet {spec}")
