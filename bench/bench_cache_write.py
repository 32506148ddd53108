"""Cache write speed: activations + top lists for N images × the ResNet-50 layer widths.

Issue target (CPU, 2 cores): 50,000 images × 3,904 neurons (conv1, layer1–4), activations and
top lists, thumbnails excluded, ≤ 15 s. Prints one row per part and the total.

    python bench/bench_cache_write.py [--images 50000] [--layers 64,256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dissect_tui.store import CacheWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--layers", default="64,256,512,1024,2048")
    ap.add_argument("--top", type=int, default=100)
    args = ap.parse_args()
    widths = [int(w) for w in args.layers.split(",")]
    rng = np.random.default_rng(0)
    n = args.images
    ids = np.arange(n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        write_s = 0.0
        with CacheWriter(path) as w:
            for i, k in enumerate(widths):
                acts = rng.standard_normal((n, k), dtype=np.float32)
                t0 = time.perf_counter()
                w.write_activations(f"layer{i}", ids, acts)
                # top lists are computed by the scorer, not timed here
                top = rng.integers(0, n, size=(k, args.top))
                vals = rng.standard_normal((k, args.top), dtype=np.float32)
                t1 = time.perf_counter()
                w.write_top_images(f"layer{i}", top, vals)
                t2 = time.perf_counter()
                rows.append((f"layer{i} ({k})", t1 - t0, t2 - t1))
                write_s += t2 - t0
            t0 = time.perf_counter()
            w.commit()
            commit_s = time.perf_counter() - t0
        total = write_s + commit_s
        size_mb = path.stat().st_size / 2**20
    print(f"{'part':<16}{'activations s':>15}{'top lists s':>13}")
    for name, a, b in rows:
        print(f"{name:<16}{a:>15.2f}{b:>13.2f}")
    print(f"{'commit':<16}{commit_s:>15.2f}   (one transaction: the data is written here)")
    neurons = sum(widths)
    print(
        f"total {total:.2f} s for {n:,} images × {neurons:,} neurons "
        f"({n * neurons / total / 1e6:.1f} M values/s), file {size_mb:,.0f} MiB, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
