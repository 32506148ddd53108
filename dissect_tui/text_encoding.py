"""Concept texts -> CLIP text embeddings: the one path used by index, relabel, evaluate and the browser.

A run is encoded with a prompt template (``--template "a photo of {}"``, or none: texts as
written). The template is a first-class field of the run (``runs.template``) and of
:class:`TextEncoder`; concept embeddings in the cache are keyed by :func:`embedding_key`, the
text tower's identity plus the template, so texts encoded with different templates never mix.
Every free-text query of the browser goes through the same encoder, so it is scored against the
same normalisers as the run's own concepts.

Imports no torch: the encoder wraps a loaded ``clip_backend.ClipModel``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dissect_tui.errors import UserError

PLACEHOLDER = "{}"
MAX_TEMPLATE_CHARS = 200  # a prompt, not a payload: CLIP reads 77 tokens at most


def check_template(template: str | None) -> None:
    """A template is plain text with exactly one ``{}`` where the concept goes and no other brace.

    Format specs (``{:>100000000}``), fields (``{0.x}``) and escaped braces are refused: the
    template is filled by plain replacement, never by ``str.format``.
    """
    if template is None:
        return
    example = '"a photo of {}"'
    if not template.strip():
        raise UserError(f"--template is empty: give a prompt with one {{}}, e.g. {example}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"--template is {len(template):,} characters long; at most {MAX_TEMPLATE_CHARS}")
    if (
        template.count(PLACEHOLDER) != 1
        or template.replace(PLACEHOLDER, "").count("{")
        or (template.replace(PLACEHOLDER, "").count("}"))
    ):
        raise UserError(
            f"--template {template!r}: write exactly one {{}} where the concept goes and no other "
            f"brace, e.g. {example}"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in template):
        raise UserError("--template holds a control character (newline, tab, escape …)")


def apply_template(template: str | None, texts: Sequence[str]) -> list[str]:
    """The prompts the text tower sees for these concept texts."""
    if not template:
        return list(texts)
    head, tail = template.split(PLACEHOLDER, 1)
    return [f"{head}{t}{tail}" for t in texts]


def template_suffix(template: str | None) -> str:
    return f"|template={template}" if template else ""


def embedding_key(tower_key: str, template: str | None) -> str:
    """Key of stored concept embeddings (``concept_embeddings.clip_key``, ``runs.clip_key``)."""
    return tower_key + template_suffix(template)


def tower_key(run_embedding_key: str, template: str | None) -> str:
    """The text tower's own identity (texts as written) from a run's embedding key and template."""
    suffix = template_suffix(template)
    if suffix and run_embedding_key.endswith(suffix):
        return run_embedding_key[: -len(suffix)]
    return run_embedding_key


class TextEncoder:
    """A CLIP text tower plus a prompt template: ``encode(concepts)`` -> [M, D] L2-normalised float32.

    ``clip`` is a loaded ``ClipModel`` or a zero-argument loader called on first use (so a run
    whose concepts are all cached never loads CLIP). ``key`` identifies its embeddings.
    """

    def __init__(self, clip: Any, template: str | None, tower: str | None = None):
        check_template(template)
        self.template = template or None
        self._clip: Any = clip if hasattr(clip, "encode_texts") else None
        self._load: Callable[[], Any] | None = None if self._clip is not None else clip
        tower = tower if tower is not None else (self._clip.key if self._clip is not None else None)
        if tower is None:
            raise ValueError("TextEncoder needs the tower key when CLIP is loaded lazily")
        self._tower: str = tower

    @property
    def key(self) -> str:
        return embedding_key(self._tower, self.template)

    @property
    def tower_key(self) -> str:
        return self._tower

    @property
    def clip(self) -> Any:
        if self._clip is None:
            assert self._load is not None
            self._clip = self._load()
        return self._clip

    @property
    def loaded(self) -> bool:
        return self._clip is not None

    def prompts(self, concepts: Sequence[str]) -> list[str]:
        return apply_template(self.template, concepts)

    def encode(
        self, concepts: Sequence[str], batch_size: int = 256, on_batch: Callable[[int], None] | None = None
    ) -> Any:
        """Embeddings of the concepts' prompts on the CLIP device, float32, unit length."""
        return self.clip.encode_texts(self.prompts(concepts), batch_size=batch_size, on_batch=on_batch)
