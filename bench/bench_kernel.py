"""The grouped-product step of SoftWPMI scoring on the CPU: C kernel vs numba vs eager torch.

Issue 10 §4: keep the run-time compiled C kernel (dissect_tui/cpu_kernel.py) only if numba
cannot come within 1.25× of it. All variants run on the SAME row block and plan, in the same
process, one after the other, repeated; the table gives the first call (compile/JIT included)
and the min / median of the repeats, and the largest difference from the first variant.

- ``C, -ffast-math linked (before)``: the kernel as built before, linked with -ffast-math
  (crtfastmath.o: flush-to-zero for the whole process), built into a temporary folder.
- ``C, dissect_tui.cpu_kernel``: the kernel as the package builds it now (compiled with
  -ffast-math, linked without).
- ``C, no -ffast-math``: -O3 -march=native -fno-math-errno -fno-trapping-math only.
- ``numba, threads`` / ``numba, parallel``: the same loop as ``@njit(nogil=True, fastmath=True)``
  run on Python threads that split the neurons exactly like the C kernel, and as
  ``@njit(parallel=True)`` with ``prange`` over the same neuron ranges (if numba is installed).
- ``torch eager``: the fallback path of ``cpu_kernel.feed``.

A second table runs the whole scoring pass (``scoring.score_layers``) with the C kernel and with
eager torch on a smaller problem.

    python bench/bench_kernel.py [--rows 2000] [--concepts 20000] [--neurons 3904] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dissect_tui import cpu_kernel, scoring  # noqa: E402
from dissect_tui import similarity as sim  # noqa: E402


def build_c(compile_flags: list[str], link_flags: list[str], folder: Path) -> dict[str, object]:
    src, obj, lib = folder / "k.c", folder / "k.o", folder / f"k{len(list(folder.iterdir()))}.so"
    src.write_text(cpu_kernel._KERNEL_SRC)
    subprocess.run(["cc", *compile_flags, "-fPIC", "-c", "-o", str(obj), str(src)], check=True)
    subprocess.run(["cc", "-shared", *link_flags, "-o", str(lib), str(obj), "-lm"], check=True)
    dll = ctypes.CDLL(str(lib))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    fns = {}
    for name in ("feed_f32", "feed_f64"):
        fn = getattr(dll, name)
        fn.argtypes = [P, I64, I64, I64, P, P, P, I64, P, P, I64, I64, I64]
        fn.restype = None
        fns[name] = fn
    return fns


def numba_kernels():
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

    @numba.njit(nogil=True, fastmath=True, cache=False)
    def feed_range(E, size, rows, offs, gneuron, acc, nlo, nhi):  # pragma: no cover - jitted
        M = E.shape[1]
        tile = 1024
        s = np.empty(tile, dtype=E.dtype)
        for g in range(gneuron.shape[0]):
            n = gneuron[g]
            if n < nlo or n >= nhi:
                continue
            k = size[g]
            for m0 in range(0, M, tile):
                mt = min(tile, M - m0)
                r = rows[0, g]
                o = offs[0, g]
                for m in range(mt):
                    s[m] = E[r, m0 + m] + o
                for j in range(1, k):
                    r = rows[j, g]
                    o = offs[j, g]
                    for m in range(mt):
                        s[m] *= E[r, m0 + m] + o
                for m in range(mt):
                    acc[n, m0 + m] += np.log(s[m])

    @numba.njit(nogil=True, fastmath=True, parallel=True, cache=False)
    def feed_parallel(E, size, rows, offs, gneuron, acc, cuts):  # pragma: no cover - jitted
        for t in numba.prange(cuts.shape[0] - 1):
            feed_range(E, size, rows, offs, gneuron, acc, cuts[t], cuts[t + 1])

    return numba, feed_range, feed_parallel


def neuron_cuts(plan: cpu_kernel.GroupPlan, n_threads: int) -> list[int]:
    neuron, size = plan.neuron, plan.size
    lo, hi = int(neuron.min()), int(neuron.max()) + 1
    work = torch.zeros(hi - lo, dtype=torch.long).index_add_(0, neuron - lo, size)
    cum = torch.cumsum(work, 0)
    targets = torch.arange(1, n_threads, dtype=torch.long) * int(cum[-1]) // n_threads
    return [lo, *(lo + torch.searchsorted(cum, targets, right=True)).tolist(), hi]


def block_case(rows: int, M: int, K: int, n: int, N: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    E = torch.rand(rows, M, generator=g, dtype=dtype) ** 8  # exp(a·P − max) lies in (0, 1]
    tops = torch.stack([torch.randperm(N, generator=g)[:n] for _ in range(K)])
    slot_neuron = torch.arange(K).repeat_interleave(n)
    slot_row = tops.reshape(-1)
    inside = slot_row < rows  # the slots that fall into this block of rows
    slot_neuron, slot_row = slot_neuron[inside], slot_row[inside]
    slot_rank = torch.arange(n).repeat(K)
    slot_rank_all = slot_rank  # indexed by global slot id
    slot_ids = torch.nonzero(inside).flatten()
    w = sim.soft_weights(n, 100, 0.998, 0.97, dtype=torch.float64, device="cpu")
    c = ((1 - w + 1e-7) / w).to(dtype)
    s = torch.rand(rows, generator=g, dtype=dtype) * M + 1
    group = scoring._group_size(float(c.min()), float(c.max()), M, dtype)
    plan = cpu_kernel.plan_blocks(slot_neuron, slot_row, rows, 1, group)[0]
    plan.slots = slot_ids[plan.slots]  # back to global slot ids, as pmi_pass passes them
    off = (c[slot_rank_all[plan.slots]] * s[plan.rows]).contiguous()
    return E, plan, slot_rank_all, c, s, off, group


def timed(fn, reps: int) -> tuple[float, list[float]]:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000, help="rows of E in the block")
    ap.add_argument("--concepts", type=int, default=20000)
    ap.add_argument("--neurons", type=int, default=3904)
    ap.add_argument("--images", type=int, default=50000, help="N the top images are drawn from")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.concepts, args.neurons, args.images, args.reps = 400, 2000, 512, 8000, 2
    dtype = getattr(torch, args.dtype)
    name = "feed_f32" if dtype == torch.float32 else "feed_f64"
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(
        f"torch {torch.__version__}, {threads} threads, load {load:.1f}; block {args.rows} rows × "
        f"{args.concepts} concepts ({args.dtype}), {args.neurons} neurons × top {args.top_k} of {args.images}"
    )
    E, plan, slot_rank, c, s, off, group = block_case(
        args.rows, args.concepts, args.neurons, args.top_k, args.images, dtype
    )
    G = plan.neuron.numel()
    slots = int(plan.size.sum())
    print(f"{slots} slots in {G} groups of ≤ {group}; {slots * args.concepts:,} terms\n")
    K = args.neurons
    acc = torch.zeros(K, args.concepts, dtype=dtype)
    variants = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-kernel-"))
    base = ["-O3", "-march=native"]
    vec = ["-mprefer-vector-width=256"]
    before = build_c([*base, "-ffast-math", *vec], ["-ffast-math"], tmp)[name]
    variants["C, -ffast-math linked (before)"] = lambda: cpu_kernel._run_kernel(before, E, acc, plan, off)
    fn = cpu_kernel.kernel(dtype)
    if fn is None:
        print(f"dissect_tui.cpu_kernel: {cpu_kernel.kernel_note()}")
    else:
        variants["C, dissect_tui.cpu_kernel"] = lambda: cpu_kernel._run_kernel(fn, E, acc, plan, off)
    plain = build_c([*base, "-fno-math-errno", "-fno-trapping-math", *vec], [], tmp)[name]
    variants["C, no -ffast-math"] = lambda: cpu_kernel._run_kernel(plain, E, acc, plan, off)
    nb = numba_kernels()
    if nb is None:
        print("numba: not installed (pip install numba)")
    else:
        numba, feed_range, feed_parallel = nb
        arrays = [x.numpy() for x in (E, plan.size, plan.rows, off, plan.neuron, acc)]
        cuts = neuron_cuts(plan, threads)

        def numba_threads() -> None:
            ths = [
                threading.Thread(target=feed_range, args=(*arrays, cuts[i], cuts[i + 1]))
                for i in range(len(cuts) - 1)
            ]
            for th in ths:
                th.start()
            for th in ths:
                th.join()

        import numpy as np

        cuts_np = np.asarray(cuts, dtype=np.int64)
        variants[f"numba {numba.__version__}, threads"] = numba_threads
        variants[f"numba {numba.__version__}, parallel"] = lambda: feed_parallel(*arrays, cuts_np)
    buf = torch.empty(
        max(8, min(256, (4 << 20) // (args.concepts * E.element_size()))), args.concepts, dtype=dtype
    )
    scratch = torch.empty_like(buf)

    def eager() -> None:
        os.environ[cpu_kernel.NO_KERNEL_ENV] = "1"
        try:
            cpu_kernel.feed(E, plan, slot_rank, c, s, acc, buf, scratch)
        finally:
            del os.environ[cpu_kernel.NO_KERNEL_ENV]

    variants["torch eager"] = eager
    results = []
    ref = None
    for label, run in variants.items():

        def once(run=run) -> None:
            acc.zero_()
            run()

        first, times = timed(once, args.reps)
        if ref is None:
            ref = acc.clone()
        results.append((label, first, times, float((acc - ref).abs().max())))
    c_min = next((min(t) for label, _, t, _ in results if label.startswith("C, dissect_tui")), None)
    print("| variant | first call s | min s | median s | × C kernel (min) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, first, times, diff in results:
        ratio = f"{min(times) / c_min:.2f}" if c_min else "—"
        med = sorted(times)[len(times) // 2]
        print(f"| {label} | {first:.3f} | {min(times):.3f} | {med:.3f} | {ratio} | {diff:.1e} |")

    # whole scoring pass, C kernel vs eager torch
    N, M, Kp, D = (4000, 2000, 256, 64) if args.quick else (20000, 8000, 1024, 512)
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    concepts = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    acts = torch.randn(N, Kp, generator=g)
    print(f"\nscoring.score_layers, SoftWPMI, N={N} K={Kp} M={M} D={D}:")
    print("| path | min s | labels equal to C kernel | max abs score diff |")
    print("|---|---:|---:|---:|")
    first = None
    for path in ("c-kernel", "torch"):
        if path == "torch":
            os.environ[cpu_kernel.NO_KERNEL_ENV] = "1"
        elif fn is None:
            continue
        _, times = timed(lambda: scoring.score_layer(acts, img, concepts, "soft_wpmi", top_concepts=5), 2)
        out = scoring.score_layer(acts, img, concepts, "soft_wpmi", top_concepts=5)
        os.environ.pop(cpu_kernel.NO_KERNEL_ENV, None)
        if first is None:
            first = out
        same = float((out.top_concepts[:, 0] == first.top_concepts[:, 0]).float().mean())
        diff = float((out.top_scores - first.top_scores).abs().max())
        print(f"| {path} | {min(times):.2f} | {same:.1%} | {diff:.1e} |")


if __name__ == "__main__":
    main()
