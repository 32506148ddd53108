"""All 20k shipped concepts through a random-weight ViT-B-16 text tower, as the indexer runs it
(per-batch truncation to the longest real token length; see bench_text_encoding.py for the
padded-vs-truncated comparison and equality).

    python bench/bench_concepts_20k.py [--clip ViT-B-16:none]
"""

from __future__ import annotations

import argparse
import os
import time

from dissect_tui.clip_backend import load_clip
from dissect_tui.concepts import load_concepts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default="ViT-B-16:none")
    ap.add_argument("--concepts", default="20k")
    args = ap.parse_args()
    clip = load_clip(args.clip)
    texts = load_concepts(args.concepts).texts
    load = os.getloadavg()
    t0 = time.perf_counter()
    clip.encode_texts(texts)
    seconds = time.perf_counter() - t0
    print(
        f"{len(texts):,} concepts, {args.clip} text tower (truncation {'on' if clip.truncates_text else 'off'}): "
        f"{seconds:.1f} s, {len(texts) / seconds:,.0f} texts/s; load average before {load[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
