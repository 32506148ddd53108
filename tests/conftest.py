"""Hermetic test runs: every home-directory cache points into a throw-away folder.

Libraries and dissect-tui write caches under the home directory (compiled CPU kernels in
``~/.cache/dissect-tui``, torch hub checkpoints, the Hugging Face hub, numba, matplotlib). The
environment is redirected when pytest starts — before any test module imports a library that
reads these variables at import time (``huggingface_hub.constants``) — and the session fixture
below checks it at the start of the run (tests/test_hermetic.py proves the redirection).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Variables that move a cache or config folder out of the home directory.
HOME_VARIABLES = {
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "XDG_DATA_HOME": "home/.local/share",
    "XDG_STATE_HOME": "home/.local/state",
    "TORCH_HOME": "home/.cache/torch",
    "HF_HOME": "home/.cache/huggingface",
    "HF_HUB_CACHE": "home/.cache/huggingface/hub",
    "HUGGINGFACE_HUB_CACHE": "home/.cache/huggingface/hub",
    "TRANSFORMERS_CACHE": "home/.cache/huggingface/hub",
    "SENTENCE_TRANSFORMERS_HOME": "home/.cache/torch/sentence_transformers",
    "NUMBA_CACHE_DIR": "home/.cache/numba",
    "MPLCONFIGDIR": "home/.config/matplotlib",
}

_session_root: Path | None = None
_saved: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    global _session_root
    _session_root = Path(tempfile.mkdtemp(prefix="dissect-tui-tests-"))
    for name, rel in HOME_VARIABLES.items():
        _saved[name] = os.environ.get(name)
        folder = _session_root / rel
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ[name] = str(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _session_root is not None:
        shutil.rmtree(_session_root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_home() -> Path:
    """The session's stand-in home directory (every variable above points below it)."""
    assert _session_root is not None
    home = _session_root / "home"
    for name, rel in HOME_VARIABLES.items():
        assert os.environ.get(name) == str(_session_root / rel), f"{name} was changed during the run"
    return home
