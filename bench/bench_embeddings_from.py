"""Many models on one probe: the second model's index with --embeddings-from vs the first's.

The first index runs CLIP's image tower on every probe image and its text tower on the concept
set; the second model takes both from the first cache and runs only its own network. Prints the
time per stage of both, CPU only, small random models (nothing downloaded).

    python bench/bench_embeddings_from.py [--images 2000] [--concepts 3k]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_index_cpu import make_images  # noqa: E402
from small_models import SMALL_CLIP_CONFIG  # noqa: E402

from dissect_tui.indexer import run_index  # noqa: E402
from dissect_tui.settings import IndexSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--concepts", default="3k")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        make_images(tmp / "images", args.images)
        cfg = tmp / "small-clip.json"
        cfg.write_text(json.dumps(SMALL_CLIP_CONFIG))
        common = dict(
            model=f"{here / 'small_models.py'}:build",
            probe=[str(tmp / "images")],
            concepts=args.concepts,
            device="cpu",
            batch_size=args.batch_size,
        )
        rows = []
        for name, extra in (
            ("first model (runs CLIP)", {"clip": f"{cfg}:none", "db": tmp / "first.duckdb"}),
            (
                "second, --embeddings-from",
                {"embeddings_from": tmp / "first.duckdb", "db": tmp / "second.duckdb"},
            ),
        ):
            t0 = time.perf_counter()
            result = run_index(IndexSettings(**common, **extra))
            assert result is not None
            rows.append((name, result.stage_seconds, time.perf_counter() - t0))
    stages = list(rows[0][1])
    print(f"{'':<28}" + "".join(f"{s:>10}" for s in stages) + f"{'total s':>10}")
    for name, st, total in rows:
        print(f"{name:<28}" + "".join(f"{st.get(s, 0):>10.1f}" for s in stages) + f"{total:>10.1f}")
    print(
        f"second / first: {rows[1][2] / rows[0][2]:.2f}× the time ({args.images:,} images, {args.concepts} concepts)"
    )


if __name__ == "__main__":
    main()
