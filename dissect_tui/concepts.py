"""Concept sets: the shipped lists and user text files, cleaned the same way.

Shipped names map to files in ``dissect_tui/data/concepts`` (see PROVENANCE.txt there).
Cleaning strips whitespace, drops empty lines and duplicates (first occurrence wins) and
reports how many were dropped, so a user can tell what was scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dissect_tui.errors import UserError

# name -> (file, how a line becomes a concept text)
SHIPPED: dict[str, str] = {
    "20k": "20k.txt",
    "10k": "10k.txt",
    "3k": "3k.txt",
    "imagenet": "imagenet_labels.txt",
    "broden": "broden_labels_clean.txt",
    "cifar100": "cifar100_classes.txt",
    "places365": "categories_places365.txt",
}
DEFAULT_CONCEPT_SET = "20k"


@dataclass(frozen=True)
class ConceptSet:
    """A cleaned, ordered list of concept texts and where it came from."""

    name: str
    texts: list[str]
    dropped_empty: int = 0
    dropped_duplicates: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def describe_dropped(self) -> str | None:
        """One line about what cleaning removed, or None when nothing was removed."""
        if not (self.dropped_empty or self.dropped_duplicates):
            return None
        return (
            f"concept set {self.name}: dropped {self.dropped_empty} empty and "
            f"{self.dropped_duplicates} duplicate lines; {len(self.texts)} concepts remain"
        )


def _shipped_text(file_name: str) -> str:
    return resources.files("dissect_tui.data.concepts").joinpath(file_name).read_text("utf-8")


def _line_to_text(name: str, line: str) -> str:
    """Shipped class-name files carry extra fields; keep the readable name only."""
    line = line.strip()
    if name == "imagenet":
        # "great white shark, white shark, man-eater, ..." -> the first synonym
        return line.split(",")[0].strip()
    if name == "places365":
        # "/a/apartment_building/outdoor 8" -> "apartment building outdoor"
        path = line.rsplit(" ", 1)[0] if " " in line else line
        parts = [p for p in path.split("/") if p][1:]  # drop the initial letter folder
        return " ".join(parts).replace("_", " ").strip()
    return line


def clean(lines: list[str], name: str = "custom") -> ConceptSet:
    """Strip, drop empty lines and duplicates (first occurrence wins), keep order."""
    texts: list[str] = []
    seen: set[str] = set()
    empty = dupes = 0
    for raw in lines:
        text = _line_to_text(name, raw)
        if not text:
            empty += 1
        elif text in seen:
            dupes += 1
        else:
            seen.add(text)
            texts.append(text)
    return ConceptSet(name, texts, empty, dupes)


def load_concepts(spec: str) -> ConceptSet:
    """A shipped set by name (``20k``, ``imagenet`` …) or a UTF-8 text file, one concept a line."""
    if spec in SHIPPED:
        return clean(_shipped_text(SHIPPED[spec]).splitlines(), spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"unknown concept set {spec!r}: use one of {', '.join(SHIPPED)} or the path of a "
            "UTF-8 text file with one concept per line"
        )
    concepts = clean(read_text_file(path, "concept file").splitlines(), path.stem)
    if not concepts.texts:
        raise UserError(f"concept file {path} has no concepts (every line is empty)")
    return concepts


def class_names(spec: str) -> list[str]:
    """Class names in class-index order (no de-duplication: index i is class i).

    ``imagenet``, ``places365``, ``cifar100`` or a text file with one class per line.
    """
    if spec in ("imagenet", "places365", "cifar100"):
        lines = [line for line in _shipped_text(SHIPPED[spec]).splitlines() if line.strip()]
        return [_line_to_text(spec, line) for line in lines]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"unknown class-name list {spec!r}: use imagenet, places365, cifar100 or a text file")
    names = [line.strip() for line in read_text_file(path, "class-name list").splitlines() if line.strip()]
    if not names:
        raise UserError(f"class-name list {path} has no names (every line is empty)")
    return names


def read_text_file(path: Path, what: str) -> str:
    """A user's text file as UTF-8; a byte-order mark (Windows editors write one) is dropped and
    UTF-16 with a BOM is accepted too, so no concept starts with an invisible U+FEFF."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
