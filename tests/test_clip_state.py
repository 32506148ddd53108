"""Loading CLIP leaves logging alone, words damaged checkpoints in one line, and checks the text
tower internals it mirrors (issue 9 §7/§8, issue 10 §5)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import open_clip
import pytest
import torch
from tiny_clip import make_tiny_clip

from dissect_tui import clip_backend, compat
from dissect_tui.clip_backend import load_clip
from dissect_tui.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"))


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_loading_leaves_logging_as_it_was(tiny):
    """In a fresh process (pytest's own log handlers would hide it): open_clip's first
    logging.info() ran basicConfig(), leaving a root handler that prints every later record."""
    script = textwrap.dedent(
        """
        import json, logging, sys
        from dissect_tui.clip_backend import load_clip
        before = (len(logging.root.handlers), logging.root.manager.disable)
        load_clip(sys.argv[1])
        load_clip(sys.argv[2])
        print(json.dumps({"before": before, "after": (len(logging.root.handlers), logging.root.manager.disable)}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, tiny.random_spec, tiny.spec],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["after"] == result["before"] == [0, 0]
    assert "initialized randomly" not in out.stderr


def test_other_threads_log_normally_during_a_load(tiny, monkeypatch):
    """logging.disable() silenced every thread of the process while a model was built."""
    handler = ListHandler()
    mine = logging.getLogger("dissect-tui-test-other-thread")
    mine.addHandler(handler)
    mine.propagate = False
    real_create = open_clip.create_model

    def create_model(*args, **kwargs):
        def other() -> None:
            mine.warning("from another thread")
            open_clip.factory.logging.getLogger("dissect-tui-test-other-thread").warning(
                "via open_clip's module"
            )

        t = threading.Thread(target=other)
        t.start()
        t.join()
        return real_create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    try:
        load_clip(tiny.random_spec)
    finally:
        mine.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == ["from another thread", "via open_clip's module"]
    assert open_clip.factory.logging is logging  # the stand-in is gone again


@pytest.mark.parametrize(
    "kind",
    ["truncated zip", "random bytes", "text", "pickled object", "empty", "bit flip"],
)
def test_a_damaged_checkpoint_is_one_line_without_weights_only_advice(tiny, tmp_path, kind):
    good = tiny.checkpoint_path.read_bytes()
    data = {
        "truncated zip": good[: len(good) // 2],
        "random bytes": os.urandom(4096),
        "text": b"hello world\n" * 20,
        "pickled object": pickle.dumps({"weights": threading.Thread}),
        "empty": b"",
        "bit flip": good[:300] + bytes([good[300] ^ 0xFF]) + good[301:],
    }[kind]
    path = tmp_path / "clip.pt"
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        load_clip(f"{tiny.config_path}:{path}")
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert "weights_only" not in message and "arbitrary code" not in message
    assert str(path) in message
    assert "damaged" in message or "pickled Python objects" in message or "does not fit" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_checkpoint_or_config_is_named(tiny, tmp_path):
    fifo = tmp_path / "clip.pt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"is a FIFO \(named pipe\)"):
        load_clip(f"{tiny.config_path}:{fifo}")
    config = tmp_path / "clip.json"
    os.mkfifo(config)
    with pytest.raises(UserError, match=r"is a FIFO \(named pipe\)"):
        load_clip(f"{config}:none")


def test_text_truncation_needs_open_clips_pooling_to_match(tiny, monkeypatch):
    assert load_clip(tiny.spec).truncates_text
    wrong = compat.text_pool()

    def shifted(x, tokens, pool_type, eos_id):  # an open_clip whose internals moved on
        return wrong(x, tokens, pool_type, eos_id) + 1.0

    monkeypatch.setattr(compat, "text_pool", lambda: shifted)
    clip = load_clip(tiny.spec)
    assert not clip.truncates_text and clip._text_tower is None
    monkeypatch.setattr(compat, "text_pool", lambda: None)
    monkeypatch.setattr(compat, "text_pool_types", lambda: ())
    assert not load_clip(tiny.spec).truncates_text


def test_safe_alternatives_without_the_private_helper(monkeypatch):
    import open_clip.pretrained as ocp

    expected = list(ocp._get_safe_alternatives("open_clip_pytorch_model.bin"))
    assert compat.safe_alternatives("open_clip_pytorch_model.bin") == expected
    monkeypatch.delattr(ocp, "_get_safe_alternatives")
    assert compat.safe_alternatives("open_clip_pytorch_model.bin") == expected
    assert compat.safe_alternatives("weights.pth") == ["weights.safetensors"]
    assert compat.safe_alternatives("weights.safetensors") == []


def test_the_truncated_tower_still_equals_the_padded_one(tiny):
    clip = load_clip(tiny.spec)
    texts = ["dog", "a red car at night", "x"]
    torch.testing.assert_close(
        clip.encode_texts(texts), clip.encode_texts_padded(texts), rtol=1e-5, atol=1e-5
    )
    assert isinstance(clip_backend._truncating_tower(clip.model), clip_backend._TruncatingTextTower)
