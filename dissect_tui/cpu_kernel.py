"""The grouped-product step of the WPMI/SoftWPMI pass (``scoring.pmi_pass``): plan, C kernel, torch.

For one block of rows E (``exp(a·P − shift)``, [rows, M]) every neuron slot r contributes a factor
``E[row_r] + off_r``; the slots of one neuron are multiplied in groups of at most g factors and
one log is taken per group: ``acc[neuron] += log Π_group (E[row] + off)`` (see scoring.py for the
maths). ``plan_blocks`` arranges the slots of every row block into ONE layout that both
implementations read:

- groups sorted by size (largest first), then by neuron; so the groups with an m-th member
  form a prefix of length ``counts[m]``, and a neuron's groups keep their order;
- ``rows[m, j]`` / ``slots[m, j]``: local row and slot id of member m of group j (member-major,
  padded with 0 where group j has fewer members; ``size[j]`` says how many).

Implementations (``feed`` picks one per call; ``active_path`` says which one a CPU run uses):

- ``"c-kernel"``: a small C loop, compiled once per machine and CPU with the system compiler
  into a private cache folder and loaded with ctypes (which releases the GIL, so Python threads
  split the neurons: each thread owns whole neurons, so no accumulator row is shared). One memory
  pass per term instead of eager torch's three; measured in bench/RESULTS.md ("CPU kernel").
- ``"torch"``: eager torch (index_select, add, multiply, log, index_add) — the only path on a GPU,
  and the CPU fallback without a compiler, with ``DISSECT_TUI_NO_KERNEL=1``, or when the cache
  folder is not private. Same numbers up to float rounding.

The kernel leaves the process as it found it: it is compiled with ``-ffast-math`` (which is what
vectorises ``logf``) but linked without it, because linking with it adds ``crtfastmath.o``, whose
constructor switches the whole process to flush-to-zero (``1e-310 * 1.0 == 0.0`` everywhere
afterwards). The library is only loaded from a folder owned by the user and not writable by
group or others (created 0700), and the plan is bounds-checked before the C loop sees it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["GroupPlan", "active_path", "feed", "kernel", "kernel_note", "plan_blocks"]

NO_KERNEL_ENV = "DISSECT_TUI_NO_KERNEL"


# ---------------------------------------------------------------------------------------------
# Plan: one layout for both implementations


@dataclass
class GroupPlan:
    """Slots of one row block arranged for grouped products (see the module docstring)."""

    neuron: Tensor  # [G] global neuron id of each group; groups sorted by size desc, then neuron
    size: Tensor  # [G] members per group (1..g)
    rows: Tensor  # [g_b, G] local row of member m of group j; 0 where size[j] <= m
    slots: Tensor  # [g_b, G] slot id of member m of group j (for the per-rank offset c_r)
    counts: list[int]  # counts[m] = number of groups with an m-th member (a prefix of the groups)


def plan_blocks(
    slot_neuron: Tensor | int, slot_row: Tensor, block_rows: int, n_blocks: int, g: int
) -> list[GroupPlan]:
    """Group each neuron's slots within each row block into groups of ≤ g, one plan per block.

    ``slot_neuron``: each slot's neuron, or an int n when slot s belongs to neuron s // n (n slots
    per neuron, neuron-major: what scoring passes, without a slot-sized array). A neuron's slots
    keep their order (rank order); group k of a neuron in a block holds its slots k·g … k·g + g − 1
    there.
    """
    return list(iter_plan_blocks(slot_neuron, slot_row, block_rows, n_blocks, g))


def iter_plan_blocks(
    slot_neuron: Tensor | int, slot_row: Tensor, block_rows: int, n_blocks: int, g: int
) -> Iterator[GroupPlan]:
    """``plan_blocks`` one block at a time: only the block being planned and fed holds anything
    slot-sized beyond one int32 block id per slot (26 MB for 65,536 neurons × 100 top images;
    planning all blocks at once took ~1 GB)."""
    dev = slot_row.device
    blk = torch.div(slot_row, block_rows, rounding_mode="floor")
    blk = blk.to(torch.int32) if n_blocks < 2**31 else blk
    for b in range(n_blocks):
        idx = torch.nonzero(blk == b).flatten()  # this block's slots, in slot order
        if isinstance(slot_neuron, int):  # neuron-major slots: slot order is neuron order
            neu = torch.div(idx, slot_neuron, rounding_mode="floor")
        else:  # any neuron per slot: neuron order, slot order within a neuron
            neu = slot_neuron[idx]
            by_neuron = torch.argsort(neu, stable=True)
            idx, neu = idx[by_neuron], neu[by_neuron]
        yield _plan_block(idx, neu, slot_row[idx] - b * block_rows, g, dev)


def _plan_block(slots: Tensor, neu: Tensor, rows: Tensor, g: int, dev: torch.device) -> GroupPlan:
    """One block's plan from its slots (global ids), their neurons (ascending) and local rows."""
    S = slots.numel()
    if S == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return GroupPlan(
            empty,
            empty,
            torch.zeros(0, 0, dtype=torch.long, device=dev),
            torch.zeros(0, 0, dtype=torch.long, device=dev),
            [],
        )
    new_seg = torch.ones(S, dtype=torch.bool, device=dev)
    new_seg[1:] = neu[1:] != neu[:-1]
    seg_start = torch.nonzero(new_seg).flatten()
    member = torch.arange(S, device=dev) - seg_start[torch.cumsum(new_seg, 0) - 1]
    member %= g  # position within the neuron's run, modulo the group size
    new_grp = member == 0
    grp_id = torch.cumsum(new_grp, 0) - 1
    G = int(grp_id[-1]) + 1
    grp_size = torch.bincount(grp_id, minlength=G)
    grp_neu = neu[new_grp].long()
    # Bigger groups first (so groups with an m-th member form a prefix), then neuron order
    # (stable sort: a neuron's groups keep their order, hence its sum order).
    grp_order = torch.argsort(g - grp_size, stable=True)
    grp_rank = torch.empty_like(grp_order)
    grp_rank[grp_order] = torch.arange(G, device=dev)
    col = grp_rank[grp_id]
    counts = [c for c in torch.bincount(member, minlength=g).tolist() if c > 0]
    out_rows = torch.zeros(len(counts), G, dtype=torch.long, device=dev)
    out_slots = torch.zeros(len(counts), G, dtype=torch.long, device=dev)
    out_rows[member, col] = rows.long()
    out_slots[member, col] = slots.long()
    return GroupPlan(grp_neu[grp_order], grp_size[grp_order], out_rows, out_slots, counts)


# ---------------------------------------------------------------------------------------------
# Feed: acc[neuron] += log Π_group (E[row] + c_r·s_row)


def feed(
    E: Tensor,
    plan: GroupPlan,
    slot_rank: Tensor | int,
    c: Tensor,
    s: Tensor | None,
    acc: Tensor,
    buf: Tensor,
    tmp: Tensor,
) -> None:
    """Add every group's log-product of this row block to ``acc``; ``s`` [rows] scales the offsets
    (None: 1). ``buf``/``tmp`` are [gs, M] scratch rows for the eager path."""
    G = plan.neuron.numel()
    if G == 0:
        return
    # [g_b, G], padding included (never read); an int n: slot s has rank s % n
    off = c[plan.slots % slot_rank] if isinstance(slot_rank, int) else c[slot_rank[plan.slots]]
    if s is not None:
        off = off * s[plan.rows]
    fn = kernel(E.dtype) if E.device.type == "cpu" else None
    if fn is not None:
        _run_kernel(fn, E, acc, plan, off.contiguous())
        return
    gs = buf.shape[0]
    for g0 in range(0, G, gs):
        g1 = min(G, g0 + gs)
        out = buf[: g1 - g0]
        for m, count in enumerate(plan.counts):
            k = min(count, g1) - g0
            if k <= 0:
                break
            rows = plan.rows[m, g0 : g0 + k]
            if m == 0:
                torch.index_select(E, 0, rows, out=out[:k])
                out[:k].add_(off[m, g0 : g0 + k, None])
            else:
                t = tmp[:k]
                torch.index_select(E, 0, rows, out=t)
                t.add_(off[m, g0 : g0 + k, None])
                out[:k].mul_(t)
        out.log_()
        acc.index_add_(0, plan.neuron[g0:g1], out)


# ---------------------------------------------------------------------------------------------
# The compiled kernel

_KERNEL_SRC = r"""
#include <math.h>
#include <stdint.h>
#define TILE 1024
/* Groups j whose neuron lies in [nlo, nhi): acc[neuron[j]] += log prod_m (E[rows[m,j]] + offs[m,j]).
   rows/offs are member-major [g, G] (leading dimension ldR); size[j] members per group. */
#define FEED(NAME, T, LOG)                                                                       \
void NAME(const T* E, int64_t ldE, int64_t M, int64_t G, const int64_t* size,                    \
          const int64_t* rows, const T* offs, int64_t ldR, const int64_t* gneuron,               \
          T* acc, int64_t ldA, int64_t nlo, int64_t nhi) {                                       \
  T s[TILE] __attribute__((aligned(64)));                                                        \
  for (int64_t g = 0; g < G; ++g) {                                                              \
    int64_t n = gneuron[g];                                                                      \
    if (n < nlo || n >= nhi) continue;                                                           \
    T* a = acc + n * ldA;                                                                        \
    int64_t k = size[g];                                                                         \
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {                                                   \
      int64_t mt = M - m0 < TILE ? M - m0 : TILE;                                                \
      const T* e0 = E + rows[g] * ldE + m0;                                                      \
      T o0 = offs[g];                                                                            \
      for (int64_t m = 0; m < mt; ++m) s[m] = e0[m] + o0;                                        \
      for (int64_t j = 1; j < k; ++j) {                                                          \
        const T* e = E + rows[j * ldR + g] * ldE + m0;                                           \
        T o = offs[j * ldR + g];                                                                 \
        for (int64_t m = 0; m < mt; ++m) s[m] *= e[m] + o;                                       \
      }                                                                                          \
      T* am = a + m0;                                                                            \
      for (int64_t m = 0; m < mt; ++m) am[m] += LOG(s[m]);                                       \
    }                                                                                            \
  }                                                                                              \
}
FEED(feed_f32, float, logf)
FEED(feed_f64, double, log)
"""

# Compile flags: -ffast-math lets gcc vectorise logf (glibc's libmvec); it is NOT given to the
# link step, which would add crtfastmath.o and set flush-to-zero for the whole process.
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")
# 256-bit vectors (8-wide vector logf) are ~15% faster on some CPUs whose gcc tuning picks 128
# (znver1); compilers without the option get the default.
_VECTOR_FLAGS = (("-mprefer-vector-width=256",), ())

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": CDLL | None, "reason": why not


class _NotPrivate(OSError):
    """A cache folder or file that another user could have written."""


def kernel(dtype: torch.dtype):
    """The compiled feed function for float32/float64, or None (eager torch is used then)."""
    name = {torch.float32: "feed_f32", torch.float64: "feed_f64"}.get(dtype)
    if name is None or os.environ.get(NO_KERNEL_ENV):
        return None
    lib = _library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [P, I64, I64, I64, P, P, P, I64, P, P, I64, I64, I64]
    fn.restype = None
    return fn


def active_path(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """``"c-kernel"`` or ``"torch"``: what computes the grouped products of a scoring run on
    ``device`` (building the kernel on first use). Record it with a run's settings: the two
    paths agree up to float rounding, not bit for bit."""
    if torch.device(device).type != "cpu":
        return "torch"
    return "c-kernel" if kernel(dtype) is not None else "torch"


def kernel_note() -> str | None:
    """Why a CPU run does not use the compiled kernel (one line for the user), or None."""
    if os.environ.get(NO_KERNEL_ENV):
        return None  # asked for
    if _library() is not None:
        return None
    reason = _state.get("reason") or "unavailable"
    return f"scoring: compiled CPU kernel not used ({reason}); scoring with eager torch (slower)"


def _library():
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                _state["lib"] = None
                _state["reason"] = _reason(exc)
        return _state["lib"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _NotPrivate):
        return str(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        err = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"the C compiler failed: {err[-1][:200] if err else exc}"
    if isinstance(exc, subprocess.TimeoutExpired):
        return "the C compiler timed out"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dissect-tui/kernels`` (default ``~/.cache``), private to this user."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = base
    for part in ("dissect-tui", "kernels"):
        folder = folder / part
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        check_private(folder, directory=True)
    return folder


def check_private(path: Path, *, directory: bool) -> None:
    """Refuse (``_NotPrivate``) a symlink, another user's file or folder, or one that group or
    others may write: a library loaded from there would run their code in this process."""
    st = os.lstat(path)
    kind = "folder" if directory else "file"
    if stat.S_ISLNK(st.st_mode):
        raise _NotPrivate(f"{path} is a symbolic link")
    if directory != stat.S_ISDIR(st.st_mode) or (not directory and not stat.S_ISREG(st.st_mode)):
        raise _NotPrivate(f"{path} is not a {kind}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise _NotPrivate(f"{kind} {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise _NotPrivate(f"{kind} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _build():
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if sys.platform == "win32":
        _state["reason"] = "not built on Windows"
        return None
    if cc is None:
        _state["reason"] = "no C compiler found (cc, gcc)"
        return None
    # -march=native code must never be loaded on another CPU (a shared home directory).
    digest = hashlib.sha256(
        (_KERNEL_SRC + " ".join(_COMPILE_FLAGS) + platform.machine() + _cpu_id()).encode()
    ).hexdigest()[:16]
    root = _cache_dir()
    so = root / f"pmi_{digest}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src = Path(tmp) / "pmi.c"
            obj = Path(tmp) / "pmi.o"
            out = Path(tmp) / so.name
            src.write_text(_KERNEL_SRC)
            for i, extra in enumerate(_VECTOR_FLAGS):
                try:
                    _cc([cc, *_COMPILE_FLAGS, *extra, "-c", "-o", str(obj), str(src)])
                    break
                except subprocess.CalledProcessError:
                    if i == len(_VECTOR_FLAGS) - 1:
                        raise
            _cc([cc, "-shared", "-o", str(out), str(obj), "-lm"])  # no fast-math: no crtfastmath
            os.chmod(out, 0o700)
            os.replace(out, so)  # atomic: concurrent builders never load a half-written file
    check_private(so, directory=False)
    return ctypes.CDLL(str(so))


def _cc(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def _cpu_id() -> str:
    """The CPU model and feature flags (Linux), or the host name where /proc is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.node()


def _check_plan(E: Tensor, acc: Tensor, plan: GroupPlan, off: Tensor) -> None:
    """The C loop has no bounds checks: a plan that would read or write outside E/acc is a bug
    that must fail here, loudly, instead of corrupting memory."""
    G = plan.neuron.numel()
    width = plan.rows.shape[0]
    ok = (
        E.dtype == acc.dtype == off.dtype
        and E.stride(1) == 1
        and acc.stride(1) == 1
        and acc.shape[1] == E.shape[1]
        and plan.rows.shape == plan.slots.shape == off.shape == (width, G)
        and plan.size.shape == (G,)
        and plan.rows.is_contiguous()
        and off.is_contiguous()
        and all(t.dtype == torch.long for t in (plan.rows, plan.size, plan.neuron))
    )
    if ok and G:
        ok = (
            int(plan.size.min()) >= 1
            and int(plan.size.max()) <= width
            and int(plan.rows.min()) >= 0
            and int(plan.rows.max()) < E.shape[0]
            and int(plan.neuron.min()) >= 0
            and int(plan.neuron.max()) < acc.shape[0]
        )
    if not ok:
        raise RuntimeError("internal error: grouped-product plan does not fit its buffers")


def _run_kernel(fn, E: Tensor, acc: Tensor, plan: GroupPlan, off: Tensor) -> None:
    """Split the neurons into ranges of about equal work, one per thread (no shared acc rows)."""
    _check_plan(E, acc, plan, off)
    G = plan.neuron.numel()
    M = E.shape[1]
    size, neuron = plan.size.contiguous(), plan.neuron.contiguous()
    n_threads = max(1, min(torch.get_num_threads(), G // 64 or 1))
    if n_threads > 1:
        lo, hi = int(neuron.min()), int(neuron.max()) + 1
        work = torch.zeros(hi - lo, dtype=torch.long).index_add_(0, neuron - lo, size)
        cum = torch.cumsum(work, 0)
        targets = torch.arange(1, n_threads, dtype=torch.long) * int(cum[-1]) // n_threads
        cuts = [lo, *(lo + torch.searchsorted(cum, targets, right=True)).tolist(), hi]
    else:
        cuts = [0, acc.shape[0]]

    def part(nlo: int, nhi: int) -> None:
        if nhi > nlo:
            fn(
                E.data_ptr(),
                E.stride(0),
                M,
                G,
                size.data_ptr(),
                plan.rows.data_ptr(),
                off.data_ptr(),
                plan.rows.stride(0),
                neuron.data_ptr(),
                acc.data_ptr(),
                acc.stride(0),
                nlo,
                nhi,
            )

    if len(cuts) == 2:
        part(cuts[0], cuts[1])
        return
    threads = [threading.Thread(target=part, args=(cuts[i], cuts[i + 1])) for i in range(len(cuts) - 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
