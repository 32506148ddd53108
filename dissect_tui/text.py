"""Showing untrusted text: every string from a cache, a file or a user is hostile until made plain.

A cache is a file people share. A label, concept, path, layer name or SQL cell may hold terminal
control sequences (OSC 52 writes the clipboard, OSC 0 renames the window) or Rich/Textual markup
(``[/x]`` crashes the renderer, ``[@click=app.quit]`` becomes an action). Display code passes such
strings through :func:`printable` and shows them as plain text (``rich.text.Text``, never markup).
Data outputs (``--csv``, ``--json``, exports) keep strings as they are: they are data, not display.

No imports beyond the standard library: the CLI, the console and the TUI all use this module.
"""

from __future__ import annotations

import re
import unicodedata

# C0 controls (tab and newline included: a one-line cell must stay one line), DEL, C1 controls,
# and the Unicode bidi controls that reorder what a terminal shows ("Trojan source").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# The Control Pictures block has glyphs for C0 and DEL; everything else is shown as \xNN / \uNNNN.
_PICTURES = {i: chr(0x2400 + i) for i in range(0x20)} | {0x7F: "\u2421"}


def _show(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code in _PICTURES:
        return _PICTURES[code]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character replaced by a visible stand-in (ESC → ␛).

    Safe to write to a terminal; still needs to be shown as plain text, not parsed as markup.
    """
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(_show, text)


def has_control(text: str) -> bool:
    """True when ``text`` holds a character that :func:`printable` would replace."""
    return _CONTROL.search(text) is not None


def clean_line(text: str) -> str:
    """A user-typed or file-read line (concept, query, layer name) with control characters removed
    and Unicode normalised to NFC; callers decide whether an empty result is an error."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text)).strip()
