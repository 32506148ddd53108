"""The docs that users read agree with the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

from dissect_tui.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_method_page_lists_every_default_and_range_of_the_registry():
    text = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- ranges:start -->\n(.*?)<!-- ranges:end -->", text, re.S).group(1)
    rows = [line.strip("|").split("|") for line in block.strip().splitlines()[2:]]
    documented = {(m.strip(), p.strip()): (d.strip(), r.strip(), doc.strip()) for m, p, d, r, doc in rows}
    expected = {
        (m.name, p.name): (f"{p.default:g}", p.interval(), p.doc) for m in METHODS.values() for p in m.params
    }
    assert documented == expected


def test_no_document_points_at_files_outside_the_repository():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "dissect_tui").rglob("*.py")]:
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
