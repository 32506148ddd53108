"""The type checker is part of the suite: ``python -m mypy dissect_tui`` reports no error.

mypy is configured in pyproject.toml ([tool.mypy]) and installed by the ``dev`` extra. It keeps
its incremental cache in .mypy_cache/ at the repository root (where a developer's own run keeps
it, and ignored by git through the .gitignore mypy writes there): a cold run takes tens of
seconds, a warm one about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "MYPY_FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_dissect_tui_type_checks_clean():
    result = mypy("dissect_tui")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"mypy dissect_tui found problems:\n{output}"
    assert output.startswith("Success: no issues found"), output
