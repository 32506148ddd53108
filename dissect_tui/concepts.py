"""Concept sets: the shipped lists and user text files, cleaned the same way.

Shipped names map to files in ``dissect_tui/data/concepts`` (see PROVENANCE.txt there).
Cleaning strips whitespace, drops empty lines and duplicates (first occurrence wins) and
reports how many were dropped, so a user can tell what was scored.

User files (``read_text_lines``) are UTF-8, or UTF-16/32 with or without a byte-order mark;
a line with a NUL or another control character is refused with its line number, and a FIFO
or device is refused by name (it would block or never end).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dissect_tui.errors import UserError
from dissect_tui.text import has_control, printable
from dissect_tui.userfiles import FileTooLarge, NotRegularFile, non_regular_kind, read_regular

MAX_TEXT_BYTES = 256 << 20  # a concept or class-name file (20k concepts are 0.2 MB)

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
SHIPPED_CLASS_LISTS = ("imagenet", "places365", "cifar100")  # class names in class-index order


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
    if (kind := non_regular_kind(path)) is not None:
        raise UserError(f"concept file {path} is {kind}, not a regular text file")
    if not path.is_file():
        raise UserError(
            _missing_list(
                spec,
                path,
                "concept file",
                "concept set",
                SHIPPED,
                "UTF-8 text file with one concept per line",
            )
        )
    concepts = clean(read_text_lines(path, "concept file"), path.stem)
    if not concepts.texts:
        raise UserError(f"concept file {path} has no concepts (every line is empty)")
    return concepts


def looks_like_path(spec: str) -> bool:
    """Whether the user meant a file rather than a shipped name: a folder part, ``~``, ``.``, or
    a file suffix (``mine.txt``)."""
    return "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or bool(Path(spec).suffix)


def _missing_list(
    spec: str, path: Path, file_what: str, set_what: str, shipped: Iterable[str], file_hint: str
) -> str:
    """Why ``spec`` names nothing: a file that is not there, a folder, or an unknown shipped name."""
    names = ", ".join(shipped)
    if path.is_dir():
        return f"{file_what} {path} is a folder, not a text file (shipped {set_what}s: {names})"
    if looks_like_path(spec):
        return f"{file_what} {path} not found (shipped {set_what}s: {names})"
    return f"unknown {set_what} {spec!r}: the shipped ones are {names}; or give the path of a {file_hint}"


def class_names(spec: str) -> list[str]:
    """Class names in class-index order (no de-duplication: index i is class i).

    ``imagenet``, ``places365``, ``cifar100`` or a text file with one class per line.
    """
    if spec in SHIPPED_CLASS_LISTS:
        lines = [line for line in _shipped_text(SHIPPED[spec]).splitlines() if line.strip()]
        return [_line_to_text(spec, line) for line in lines]
    path = Path(spec).expanduser()
    if (kind := non_regular_kind(path)) is not None:
        raise UserError(f"class-name list {path} is {kind}, not a regular text file")
    if not path.is_file():
        raise UserError(
            _missing_list(
                spec,
                path,
                "class-name list",
                "class-name list",
                SHIPPED_CLASS_LISTS,
                "text file, one name per line",
            )
        )
    names = [line.strip() for line in read_text_lines(path, "class-name list") if line.strip()]
    if not names:
        raise UserError(f"class-name list {path} has no names (every line is empty)")
    return names


# BOMs, longest first (the UTF-32-LE BOM starts with the UTF-16-LE one).
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


def _sniff_encoding(data: bytes) -> tuple[str, int]:
    """(codec, bytes to skip): from a byte-order mark, else from where the NUL bytes of mostly
    ASCII UTF-16/32 text fall (Windows tools write UTF-16-LE without a BOM too), else UTF-8."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec, len(bom)
    sample = data[:4096]
    if b"\x00" not in sample:
        return "utf-8", 0
    n4 = len(sample) // 4 * 4
    if n4:
        zero4 = [sum(sample[i] == 0 for i in range(k, n4, 4)) / (n4 // 4) for k in range(4)]
        if zero4[1] > 0.9 and zero4[2] > 0.9 and zero4[3] > 0.9 and zero4[0] < 0.5:
            return "utf-32-le", 0
        if zero4[0] > 0.9 and zero4[1] > 0.9 and zero4[2] > 0.9 and zero4[3] < 0.5:
            return "utf-32-be", 0
    n2 = len(sample) // 2 * 2
    if n2:
        even = sum(sample[i] == 0 for i in range(0, n2, 2)) / (n2 // 2)
        odd = sum(sample[i] == 0 for i in range(1, n2, 2)) / (n2 // 2)
        if odd > 0.6 and even < 0.2:
            return "utf-16-le", 0
        if even > 0.6 and odd < 0.2:
            return "utf-16-be", 0
    return "utf-8", 0  # NULs without a pattern: reported below as control characters


def _control_name(ch: str) -> str:
    if ch == "\x00":
        return "NUL"
    if ch == "\t":
        return "tab"
    return f"U+{ord(ch):04X}"


def read_text_lines(path: Path, what: str) -> list[str]:
    """A user's text file as lines: UTF-8 (a byte-order mark is dropped), or UTF-16/UTF-32 with
    or without a BOM; CRLF and LF line ends. A line holding a NUL or another control character
    (tab, escape, bidi override ...) is refused with its line number: it means a binary file, a
    wrong encoding or a format with fields, and a concept text is shown to everyone who opens
    the cache."""
    try:
        data = read_regular(path, MAX_TEXT_BYTES)
    except NotRegularFile as exc:
        raise UserError(f"{what} {path} is {exc.kind}, not a regular text file") from None
    except FileTooLarge as exc:
        raise UserError(f"{what} {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    codec, skip = _sniff_encoding(data)
    try:
        text = data[skip:].decode(codec)
    except UnicodeDecodeError as exc:
        shown = "UTF-8" if codec == "utf-8" else f"{codec.upper()} (as its NUL bytes suggest)"
        raise UserError(
            f"{what} {path} is not {shown} text ({exc.reason} at byte {exc.start + skip})"
            + ("; save it as UTF-8" if codec != "utf-8" else "")
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if has_control(line):
            bad = next(ch for ch in line if has_control(ch))
            hint = " (a binary file?)" if bad == "\x00" else ""
            raise UserError(
                f"{what} {path} line {number} holds a control character "
                f"({_control_name(bad)}){hint}: {printable(line[:80])!r}"
            )
        lines[number - 1] = line
    return lines


def read_text_file(path: Path, what: str) -> str:
    """``read_text_lines`` joined with newlines (kept for callers that want one string)."""
    return "\n".join(read_text_lines(path, what))
