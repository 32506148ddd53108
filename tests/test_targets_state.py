"""Target loading leaves the process as it found it: sys.path, warnings, other threads' models;
damaged weights files are one line (issue 9 §7/§8)."""

from __future__ import annotations

import os
import pickle
import sys
import threading
import warnings

import pytest
import torch
import torchvision
from torch import nn

from dissect_tui.errors import UserError
from dissect_tui.targets import load_target
from dissect_tui.weights_init import skipped_weight_init

FACTORY = """
import sys
import threading

import helper_{tag}  # a sibling module, found next to this file

SEEN = {{"path": list(sys.path)}}
other = threading.Thread(target=lambda: SEEN.update(other=_try_import()))


def _try_import():
    try:
        import sibling_only_{tag}  # noqa: F401
    except ImportError:
        return "not found"
    return "found"


other.start()
other.join()


def build():
    return helper_{tag}.make()
"""

HELPER = """
import torch


def make():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
"""


def write_factory(folder, tag: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"helper_{tag}.py").write_text(HELPER)
    (folder / f"sibling_only_{tag}.py").write_text("X = 1\n")
    path = folder / f"model_{tag}.py"
    path.write_text(FACTORY.format(tag=tag))
    return path


def test_a_factory_file_imports_its_siblings_without_touching_sys_path(tmp_path):
    path = write_factory(tmp_path / "models", "a")
    before_path, before_meta = list(sys.path), list(sys.meta_path)
    target = load_target(f"{path}:build", weights="none")
    assert isinstance(target.model, nn.Sequential)
    user_module = next(m for n, m in sys.modules.items() if n.startswith("dissect_tui_user_model_a_"))
    assert user_module.SEEN["path"] == before_path  # sys.path was the same during the import
    assert user_module.SEEN["other"] == "not found"  # another thread did not see the folder
    assert sys.path == before_path and sys.meta_path == before_meta


def test_a_factory_that_fails_to_import_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_b.py").write_text("import no_such_module_anywhere_b\n\ndef build():\n    pass\n")
    before_path, before_meta = list(sys.path), list(sys.meta_path)
    with pytest.raises(UserError, match="no_such_module_anywhere_b"):
        load_target(f"{folder / 'model_b.py'}:build")
    assert not [n for n in sys.modules if n.startswith("dissect_tui_user_model_b_")]
    assert sys.path == before_path and sys.meta_path == before_meta


def test_random_googlenet_builds_without_warnings_or_filter_changes(monkeypatch):
    outside = warnings.filters
    during = []
    real = torchvision.models.get_model

    def get_model(*args, **kwargs):
        during.append(warnings.filters is outside)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outside = warnings.filters
        target = load_target("googlenet", weights="none")
    assert target.model is not None
    assert during == [True]  # no catch_warnings around the build (it swaps the global list)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("kind", ["truncated", "random", "pickled object", "text"])
def test_a_damaged_weights_file_is_one_line_without_weights_only_advice(tmp_path, kind):
    good = tmp_path / "good.pth"
    torch.save(nn.Linear(3, 2).state_dict(), good)
    data = {
        "truncated": good.read_bytes()[:300],
        "random": os.urandom(2048),
        "pickled object": pickle.dumps({"fc.weight": threading.Thread}),
        "text": b"weights\n" * 40,
    }[kind]
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        load_target("resnet18", weights=str(path))
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert "weights_only" not in message and "arbitrary code" not in message
    assert "damaged" in message or "not a PyTorch checkpoint" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_weights_is_named(tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"is a FIFO \(named pipe\), not a regular file"):
        load_target("resnet18", weights=str(fifo))


def test_skipped_init_is_only_for_the_thread_that_asked():
    """The fills were swapped for no-ops process-wide: a model built meanwhile by another
    thread kept torch.empty's leftover memory as its weights."""
    result = {}
    inside, go = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        w = torch.full((64,), 7.0)
        nn.init.normal_(w)
        result["changed"] = not bool((w == 7.0).all())
        go.set()

    t = threading.Thread(target=other)
    t.start()
    with skipped_weight_init():
        mine = torch.full((64,), 7.0)
        nn.init.normal_(mine)
        inside.set()
        go.wait()
    t.join()
    assert bool((mine == 7.0).all())  # skipped here
    assert result["changed"]  # initialised there


def test_nested_and_concurrent_skips_restore_the_fills():
    """Two threads inside at once (each builds its own checkpointed model), one of them nested."""
    original = nn.init.kaiming_uniform_
    barrier = threading.Barrier(2, timeout=60)  # a safety net against a deadlock, not a timing
    errors = []

    def worker() -> None:
        try:
            with skipped_weight_init():
                barrier.wait()
                with skipped_weight_init():
                    pass
                barrier.wait()
        except threading.BrokenBarrierError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "the two threads could not be inside skipped_weight_init together"
    assert nn.init.kaiming_uniform_ is original
