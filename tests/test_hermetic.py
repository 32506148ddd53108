"""The test suite never writes into the user's home directory (tests/conftest.py)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
import torch

from dissect_tui import cpu_kernel, scoring

# The account's home from the password database: what HOME pointed to before conftest.py moved it.
REAL_HOME = pwd.getpwuid(os.getuid()).pw_dir


def _inside(path: str | Path, folder: str | Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def test_caches_resolve_outside_the_real_home():
    for path in (
        Path.home(),
        os.environ.get("XDG_CACHE_HOME", "~/.cache"),
        torch.hub.get_dir(),
        os.path.expanduser("~/.cache/clip"),  # open_clip's URL downloads
    ):
        assert not _inside(os.path.expanduser(path), REAL_HOME), path
    from huggingface_hub import constants

    assert not _inside(constants.HF_HUB_CACHE, REAL_HOME)


def test_the_compiled_kernel_is_built_outside_the_real_home(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {})  # build afresh in this process
    if cpu_kernel.kernel(torch.float32) is None:
        pytest.skip(f"no compiled kernel here: {cpu_kernel.kernel_note()}")
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    concepts = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    scoring.score_layer(torch.randn(60, 4, generator=g), img, concepts, "soft_wpmi")
    folder = cpu_kernel._cache_dir()
    assert not _inside(folder, REAL_HOME)
    assert _inside(folder, Path.home())
    assert list(folder.glob("pmi_*.so"))
