"""`torchrun --nproc_per_node=2 -m dissect_tui index …` on the CPU (gloo): one cache, equal to a
single process's; a failing rank fails the run with one line of ours and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from tiny_clip import make_tiny_clip
from tiny_models import make_image_tree, write_tiny_cnn_factory

ROOT = Path(__file__).resolve().parents[1]

RANK_FAILS = """
import torch
from tiny_cnn import build as _build


def build():
    model = _build()
    forward = model.forward

    def failing(x):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("rank one ran out of luck")
        return forward(x)

    model.forward = failing
    return model
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    images = make_image_tree(root, 44, broken=True)
    factory = write_tiny_cnn_factory(root)
    (root / "rank_fails.py").write_text(RANK_FAILS)
    clip = make_tiny_clip(root)
    return {"root": root, "images": images, "factory": factory, "clip": clip.spec}


def _index_args(ws, model: str, db: Path) -> list[str]:
    return [
        "index", model, "--layers", "conv1,layer1,fc", "--probe", str(ws["images"]), "--clip", ws["clip"],
        "--concepts", "cifar100", "--device", "cpu", "--batch-size", "6", "--db", str(db), "--quiet",
    ]  # fmt: skip


def _env(root: Path) -> dict[str, str]:
    # one thread per process, as torchrun sets it: the single-process reference computes alike
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}


def _torchrun(ws, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    return subprocess.run(
        [*cmd, "-m", "dissect_tui", *args],
        capture_output=True,
        text=True,
        env=_env(ws["root"]),
        cwd=ws["root"],
        timeout=300,
    )


def _rows(db: Path, sql: str):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_two_ranks_write_the_cache_one_process_writes(ws, tmp_path):
    single, multi = tmp_path / "single.duckdb", tmp_path / "multi.duckdb"
    one = subprocess.run(
        [sys.executable, "-m", "dissect_tui", *_index_args(ws, ws["factory"], single)],
        capture_output=True, text=True, env=_env(ws["root"]), cwd=ws["root"], timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = _torchrun(ws, _index_args(ws, ws["factory"], multi))
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(multi)  # the path once: only rank 0 prints
    for sql in (
        "SELECT image_id, path, ok, error, width, height FROM images ORDER BY 1",
        "SELECT layer, unit, label, similarity, interpretable FROM neurons ORDER BY 1, 2",
        "SELECT layer, unit, rank, image_id, activation FROM top_images ORDER BY 1, 2, 3",
        "SELECT layer, unit, rank, concept_id, score FROM neuron_concepts ORDER BY 1, 2, 3",
        "SELECT image_id, rank, concept_id FROM image_concepts ORDER BY 1, 2",
        "SELECT image_id, jpeg FROM thumbnails ORDER BY 1",
        "SELECT layer, n_units, output_shape FROM layers ORDER BY position",
    ):
        assert _rows(single, sql) == _rows(multi, sql), sql
    a = _rows(single, "SELECT layer, image_id, acts FROM activation_rows ORDER BY 1, 2")
    b = _rows(multi, "SELECT layer, image_id, acts FROM activation_rows ORDER BY 1, 2")
    assert [r[:2] for r in a] == [r[:2] for r in b]
    np.testing.assert_allclose(
        np.array([r[2] for r in a if r[0] == "fc"]), np.array([r[2] for r in b if r[0] == "fc"])
    )
    emb_a = np.array([r[0] for r in _rows(single, "SELECT emb FROM image_embeddings ORDER BY image_id")])
    emb_b = np.array([r[0] for r in _rows(multi, "SELECT emb FROM image_embeddings ORDER BY image_id")])
    np.testing.assert_allclose(emb_a, emb_b, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.duckdb", "single.duckdb"]


def test_a_failing_rank_fails_the_run_with_one_line_and_no_litter(ws, tmp_path):
    db = tmp_path / "failed.duckdb"
    out = _torchrun(ws, _index_args(ws, f"{ws['root'] / 'rank_fails.py'}:build", db))
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith(("error:", "interrupted"))]
    assert ours == ["error: rank 1 failed: RuntimeError: rank one ran out of luck"], out.stderr
    # torchrun's launcher adds its own failure report (ChildFailedError); no frame of ours is in it
    assert "dissect_tui/" not in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []
