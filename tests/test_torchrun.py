"""`torchrun --nproc_per_node=2 -m dissect_tui index …` on the CPU (gloo): one cache, equal to a
single process's; a failing rank fails the run with one line of ours and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == RANK:
            raise EXC(f"rank {RANK} ran out of luck")
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
    for rank, exc in ((0, "OSError"), (1, "RuntimeError")):  # OSError: a one-line error on rank 0
        (root / f"rank{rank}_fails.py").write_text(f"RANK, EXC = {rank}, {exc}\n" + RANK_FAILS)
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


def _torchrun_cmd(args: list[str]) -> list[str]:
    """`torchrun --nproc_per_node=2 -m dissect_tui ARGS` on a free port."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    return [*launcher, "-m", "dissect_tui", *args]


def _torchrun(ws, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun_cmd(args),
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


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted", "[rank"))]


def test_a_failing_rank_fails_the_run_with_one_line_and_no_litter(ws, tmp_path):
    db = tmp_path / "failed.duckdb"
    out = _torchrun(ws, _index_args(ws, f"{ws['root'] / 'rank1_fails.py'}:build", db))
    assert out.returncode != 0
    assert _our_lines(out.stderr) == ["error: rank 1 failed: RuntimeError: rank 1 ran out of luck"], (
        out.stderr
    )
    # torchrun's launcher adds its own failure report (ChildFailedError); no frame of ours is in it
    assert "dissect_tui/" not in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("when", ["before the barrier", "in the images stage"])
def test_when_rank_0_fails_the_others_end_quietly(ws, tmp_path, when):
    """Rank 0's line is the run's only one: the other ranks, waiting in a collective when rank 0
    goes, exit without a traceback or a second line."""
    db = tmp_path / "x.duckdb"
    if when == "before the barrier":
        db.write_text("not a cache")  # rank 0 refuses the target before the others set up
        model, line = ws["factory"], "error: " + str(db) + " exists and is not a dissect-tui cache"
    else:
        model, line = f"{ws['root'] / 'rank0_fails.py'}:build", "error: rank 0 ran out of luck"
    out = _torchrun(ws, _index_args(ws, model, db))
    assert out.returncode != 0
    ours = _our_lines(out.stderr)
    assert len(ours) == 1 and ours[0].startswith(line), out.stderr
    assert "dissect_tui/" not in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["x.duckdb"] if when == "before the barrier" else []
    )


STALLS = """
import os, time
import torch
from tiny_cnn import build as _build


def build():
    model = _build()
    forward = model.forward

    def stalling(x):  # every rank, in its images stage: say so, then wait for the Ctrl-C
        open(os.environ["STALL_DIR"] + f"/rank{torch.distributed.get_rank()}", "w").close()
        time.sleep(120)
        return forward(x)

    model.forward = stalling
    return model
"""


def test_ctrl_c_under_torchrun_is_one_line_from_rank_0_and_no_litter(ws, tmp_path):
    """Ctrl-C reaches torchrun and every rank (one process group): rank 0 says `interrupted`, the
    others end quietly, the rank shards and the temporary cache are gone."""
    (tmp_path / "stalls.py").write_text(STALLS)
    out, ready = tmp_path / "out", tmp_path / "ready"
    out.mkdir()
    ready.mkdir()
    env = {**_env(ws["root"]), "STALL_DIR": str(ready)}
    args = _index_args(ws, f"{tmp_path / 'stalls.py'}:build", out / "x.duckdb")
    proc = subprocess.Popen(
        _torchrun_cmd(args), env=env, cwd=ws["root"], start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240  # a safety net: both ranks normally stall within seconds
        while len(list(ready.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(p.name for p in ready.iterdir()) == ["rank0", "rank1"]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert _our_lines(err) == ["interrupted"], err
    assert "dissect_tui/" not in err, err
    assert list(out.iterdir()) == []
