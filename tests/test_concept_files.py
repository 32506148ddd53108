"""User concept and class-name files: encodings, control characters, files that are not files."""

from __future__ import annotations

import os

import pytest

from dissect_tui.concepts import class_names, load_concepts
from dissect_tui.errors import UserError

TEXT = "dog\ncat\nhot dog\n"


@pytest.mark.parametrize(
    "data",
    [
        TEXT.encode("utf-8"),
        b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode("utf-8"),  # Notepad: BOM + CRLF
        TEXT.encode("utf-16"),  # with its BOM
        TEXT.encode("utf-16-le"),  # no BOM (PowerShell's Out-File, some exporters)
        TEXT.encode("utf-16-be"),
        TEXT.encode("utf-32"),  # with its BOM, which starts like UTF-16-LE's
        TEXT.encode("utf-32-le"),
        TEXT.replace("\n", "\r\n").encode("utf-16-le"),
    ],
    ids=["utf8", "utf8-bom-crlf", "utf16-bom", "utf16le", "utf16be", "utf32-bom", "utf32le", "utf16le-crlf"],
)
def test_encodings_give_the_same_concepts(tmp_path, data):
    path = tmp_path / "concepts.txt"
    path.write_bytes(data)
    concepts = load_concepts(str(path))
    assert concepts.texts == ["dog", "cat", "hot dog"]
    assert concepts.describe_dropped() is None  # the final newline is no empty line
    assert class_names(str(path)) == ["dog", "cat", "hot dog"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"dog\nc\x00at\n", r"line 2 holds a control character \(NUL\) \(a binary file\?\)"),
        (b"dog\ncat\nbad \x1b]0;pwned\x07\n", r"line 3 holds a control character \(U\+001B\)"),
        ("dog\nevil\u202etxt\n".encode(), r"line 2 holds a control character \(U\+202E\)"),
        (b"dog\tcanine\n", r"line 1 holds a control character \(tab\)"),
        (b"\x00\x01\x02\x03" * 50, "control character"),  # binary, NULs without a text pattern
    ],
    ids=["nul", "escape", "bidi-override", "tab", "binary"],
)
def test_control_characters_are_refused_with_the_line(tmp_path, data, needle):
    path = tmp_path / "concepts.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=needle) as info:
        load_concepts(str(path))
    assert "\x1b" not in str(info.value) and "\x00" not in str(info.value)  # shown as stand-ins
    with pytest.raises(UserError, match="control character"):
        class_names(str(path))


def test_utf16_without_bom_that_does_not_decode_is_named(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_bytes("dog\ncat\n".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate at the end
    with pytest.raises(UserError, match="not UTF-16-LE"):
        load_concepts(str(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_named_not_read(tmp_path):
    fifo = tmp_path / "concepts.txt"
    os.mkfifo(fifo)  # nobody writes: reading it would block forever
    with pytest.raises(UserError, match=r"is a FIFO \(named pipe\), not a regular text file"):
        load_concepts(str(fifo))
    with pytest.raises(UserError, match=r"is a FIFO"):
        class_names(str(fifo))


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_device_is_named_not_reported_missing():
    with pytest.raises(UserError, match="/dev/null is a character device"):
        load_concepts("/dev/null")
    with pytest.raises(UserError, match="is a character device"):
        class_names("/dev/null")
