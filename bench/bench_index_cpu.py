"""End-to-end CPU index: N small generated JPEGs, a small CNN, a small CLIP-like model.

Prints the time per stage and images/s, as the indexer's own summary would, for one or more
`--workers` settings in the same run (decode overlap vs in-process decoding).

    python bench/bench_index_cpu.py [--images 2000] [--concepts 3k] [--workers 0,1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from small_models import SMALL_CLIP_CONFIG  # noqa: E402

from dissect_tui.indexer import IndexSettings, run_index  # noqa: E402


def make_images(folder: Path, n: int, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BILINEAR)
        img.save(sub / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--concepts", default="3k")
    ap.add_argument("--workers", default="0,1")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_images(tmp / "images", args.images)
        print(f"generated {args.images} images in {time.perf_counter() - t0:.1f} s")
        cfg = tmp / "small-clip.json"
        cfg.write_text(json.dumps(SMALL_CLIP_CONFIG))
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            settings = IndexSettings(
                model=f"{here / 'small_models.py'}:build",
                probe=[str(tmp / "images")],
                concepts=args.concepts,
                clip=f"{cfg}:none",
                db=tmp / f"w{workers}.duckdb",
                device="cpu",
                batch_size=args.batch_size,
                workers=workers,
            )
            t0 = time.perf_counter()
            result = run_index(settings)
            total = time.perf_counter() - t0
            rows.append((workers, result.stage_seconds, total, result.images_per_second))
    stages = list(rows[0][1])
    print(f"{'workers':>8}" + "".join(f"{s:>10}" for s in stages) + f"{'total s':>10}{'img/s':>8}")
    for workers, st, total, ips in rows:
        print(
            f"{workers:>8}" + "".join(f"{st.get(s, 0):>10.1f}" for s in stages) + f"{total:>10.1f}{ips:>8.0f}"
        )


if __name__ == "__main__":
    main()
