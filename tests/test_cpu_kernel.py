"""The compiled CPU kernel: no process-wide side effects, a private cache folder, checked plans."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dissect_tui import cpu_kernel, scoring

HAS_CC = bool(shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")) and sys.platform != "win32"
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: only the eager path exists here")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel cache of our own and no library loaded yet in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernel.NO_KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_kernel, "_state", {})
    return tmp_path / "cache" / "dissect-tui" / "kernels"


def _score() -> scoring.LayerScores:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    concepts = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    return scoring.score_layer(torch.randn(300, 12, generator=g), img, concepts, "soft_wpmi", top_concepts=5)


@needs_cc
def test_scoring_with_the_kernel_keeps_subnormal_numbers(tmp_path):
    """Linking with -ffast-math adds crtfastmath.o, which turns on flush-to-zero for the process."""
    script = textwrap.dedent(
        """
        import json
        import sys
        import numpy as np
        import torch
        from dissect_tui import cpu_kernel, scoring

        def subnormals():
            tiny = float(sys.argv[1])  # not a literal: no constant folding at compile time
            return (
                tiny * 1.0 != 0.0,
                float(np.float64(tiny) * np.float64(1.0)) != 0.0,
                float(np.float32(1e-40) * np.float32(float(sys.argv[2]))) != 0.0,
                float(torch.tensor(tiny, dtype=torch.float64) * 1.0) != 0.0,
                float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) != 0.0,
            )

        before = subnormals()
        g = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
        concepts = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
        scoring.score_layer(torch.randn(300, 12, generator=g), img, concepts, "soft_wpmi")
        print(json.dumps({"path": cpu_kernel.active_path(), "before": before, "after": subnormals()}))
        """
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop(cpu_kernel.NO_KERNEL_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", script, "1e-310", "1.0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["path"] == "c-kernel"
    assert all(result["before"])
    assert all(result["after"]), f"flush-to-zero after the kernel ran (python, numpy, torch): {result}"


@needs_cc
def test_kernel_is_built_in_a_private_folder(fresh):
    assert cpu_kernel.active_path() == "c-kernel"
    assert cpu_kernel.kernel_note() is None
    for folder in (fresh.parent, fresh):
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        assert mode == 0o700, f"{folder}: {mode:o}"
    (lib,) = fresh.glob("pmi_*.so")
    assert stat.S_IMODE(os.stat(lib).st_mode) & 0o077 == 0
    assert list(fresh.iterdir()) == [lib]  # no temporary files left behind


@needs_cc
@pytest.mark.parametrize("what", ["folder", "parent", "library"])
def test_a_cache_others_can_write_is_refused(fresh, what):
    assert cpu_kernel.active_path() == "c-kernel"  # build once, then open it up
    target = {"folder": fresh, "parent": fresh.parent, "library": next(fresh.glob("pmi_*.so"))}[what]
    os.chmod(target, 0o777)
    cpu_kernel._state.clear()
    assert cpu_kernel.kernel(torch.float32) is None
    assert cpu_kernel.active_path() == "torch"
    assert "writable by group or others" in cpu_kernel.kernel_note()
    _score()  # scoring goes on with eager torch


def test_another_users_cache_folder_is_refused(fresh, monkeypatch):
    fresh.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(fresh).st_uid + 1)
    assert cpu_kernel.active_path() == "torch"
    assert "belongs to another user" in cpu_kernel.kernel_note()


def test_a_symlinked_cache_folder_is_refused(fresh, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    fresh.parent.mkdir(parents=True, mode=0o700)
    fresh.symlink_to(elsewhere)
    assert cpu_kernel.active_path() == "torch"
    assert "symbolic link" in cpu_kernel.kernel_note()


def test_active_path_names_torch_where_the_kernel_does_not_run(fresh, monkeypatch):
    assert cpu_kernel.active_path("meta") == "torch"  # any non-CPU device
    monkeypatch.setenv(cpu_kernel.NO_KERNEL_ENV, "1")
    assert cpu_kernel.active_path() == "torch"
    assert cpu_kernel.kernel_note() is None  # asked for, nothing to tell


@needs_cc
def test_a_plan_that_does_not_fit_fails_before_the_c_loop(fresh):
    fn = cpu_kernel.kernel(torch.float32)
    E = torch.rand(8, 16)
    acc = torch.zeros(3, 16)
    slot_neuron = torch.tensor([0, 0, 1, 2, 2, 2])
    plan = cpu_kernel.plan_blocks(slot_neuron, torch.tensor([0, 1, 2, 3, 4, 7]), 8, 1, 2)[0]
    off = torch.ones(plan.rows.shape)
    cpu_kernel._run_kernel(fn, E, acc, plan, off)  # fits
    plan.rows[1, 0] = 8  # one row past the block
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernel._run_kernel(fn, E, acc, plan, off)
    plan.rows[1, 0] = 1
    plan.neuron[0] = 3  # one neuron past the accumulator
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernel._run_kernel(fn, E, acc, plan, off)


def test_one_plan_layout_covers_every_slot_once():
    g = torch.Generator().manual_seed(3)
    K, n, rows, block = 40, 9, 500, 64
    slot_neuron = torch.arange(K).repeat_interleave(n)
    slot_row = torch.stack([torch.randperm(rows, generator=g)[:n] for _ in range(K)]).reshape(-1)
    n_blocks = -(-rows // block)
    plans = cpu_kernel.plan_blocks(slot_neuron, slot_row, block, n_blocks, 4)
    seen = []
    for b, plan in enumerate(plans):
        G = plan.neuron.numel()
        assert plan.counts == sorted(plan.counts, reverse=True) and (not G or plan.counts[0] == G)
        assert torch.equal(plan.size, torch.tensor([sum(c > j for c in plan.counts) for j in range(G)]))
        for j in range(G):
            members = plan.slots[: int(plan.size[j]), j]
            assert (slot_neuron[members] == plan.neuron[j]).all()
            assert torch.equal(plan.rows[: int(plan.size[j]), j], slot_row[members] - b * block)
            seen += members.tolist()
        # a neuron's groups keep rank order: its slots appear in increasing order
        for k in plan.neuron.unique().tolist():
            cols = (plan.neuron == k).nonzero().flatten()
            ordered = torch.cat([plan.slots[: int(plan.size[j]), j] for j in cols.tolist()])
            assert torch.equal(ordered, ordered.sort().values)
    assert sorted(seen) == list(range(K * n))
