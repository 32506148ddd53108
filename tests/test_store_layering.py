"""store/ speaks SQL and nothing else: no PIL, torch or textual; JPEG sizes read from the header."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from dissect_tui.store.writer import _jpeg_size


def test_store_imports_no_pil_torch_or_textual():
    code = (
        "import sys, dissect_tui.store, dissect_tui.store.writer, dissect_tui.store.export, "
        "dissect_tui.store.shards, dissect_tui.store.lockdown, dissect_tui.store.user_sql; "
        "print(sorted(m for m in ('PIL', 'torch', 'textual') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    ("size", "mode", "options"),
    [
        ((96, 72), "RGB", {}),
        ((31, 200), "L", {}),
        ((96, 64), "RGB", {"progressive": True}),
        ((50, 40), "CMYK", {}),
    ],
)
def test_jpeg_size_from_the_frame_header(size, mode, options):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to make an APP1 segment"
    Image.new(mode, size).save(buf, format="JPEG", exif=exif, **options)
    assert _jpeg_size(buf.getvalue()) == size


@pytest.mark.parametrize("data", [b"", b"not a jpeg", b"\xff\xd8\xff", b"\xff\xd8\xff\xda\x00\x02"])
def test_jpeg_size_of_something_else_is_unknown(data):
    assert _jpeg_size(data) == (None, None)
