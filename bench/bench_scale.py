"""Peak memory and time of `dissect-tui index` as the probe (N) and a layer (K) grow, CPU only.

Issue 12's target: 20,000 images × one 65,536-unit layer (5.2 GB of fp32 activations) indexed
with peak RSS ≤ 2.5 GB, every activation still in the cache, in no more time than the previous
path (which kept every activation in memory until the end). Each configuration runs in its own
process (peak RSS = that process's maximum resident set); the variants run in the same bench:

- ``streamed``: this checkout (activations go to the cache as they are produced);
- ``in-memory``: the code at ``--baseline`` (a git commit; default the last commit before
  streaming), extracted with `git archive` into a temporary folder.

A configuration whose in-memory estimate exceeds ``--max-gb`` is not run for that variant.

    python bench/bench_scale.py [--n 2500,5000,10000,20000] [--k 65536] [--fixed-n 5000]
                                [--ks 4096,16384,65536] [--target] [--variants streamed,in-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = "ca2a514"  # main before activations streamed to the cache

FACTORY = """
import torch
from torch import nn
from torchvision import transforms as T

K = {k}


def build():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Flatten()))
    model.add_module("wide", nn.Linear(8 * 8 * 8, K))
    pre = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    return model, pre
"""

# Peak RSS is this process's VmHWM: ru_maxrss would start at the parent's RSS at fork (Linux
# carries it across exec), and the parent has read the previous configuration's cache.
RUNNER = """
import resource, sys, time
sys.argv = ["dissect-tui"] + sys.argv[1:]
from dissect_tui.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - t0
try:
    with open("/proc/self/status") as f:
        peak = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", rc, seconds, peak, flush=True)
"""


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse, "RGB").resize((64, 64), Image.Resampling.BILINEAR).save(
            folder / f"{i:06d}.jpg"
        )


def run_one(code: Path, tmp: Path, images: Path, n: int, k: int, variant: str) -> dict:
    factory = tmp / f"wide{k}.py"
    factory.write_text(FACTORY.format(k=k))
    listing = tmp / f"list{n}.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.glob("*.jpg"))[:n]) + "\n")
    clip = tmp / "small-clip.json"
    db = tmp / f"{variant}-{n}-{k}.duckdb"
    runner = tmp / "runner.py"
    runner.write_text(textwrap.dedent(RUNNER))
    cmd = [
        sys.executable,
        str(runner),
        "index",
        f"{factory}:build",
        "--layers",
        "wide",
        "--probe",
        str(listing),
    ]
    cmd += ["--clip", f"{clip}:none", "--concepts", "cifar100", "--db", str(db), "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    _, rc, seconds, rss = line.split()
    size = db.stat().st_size if db.exists() else 0
    check = "-"
    if int(rc) == 0:
        import duckdb

        with duckdb.connect(str(db), read_only=True) as con:
            rows, width = con.execute("SELECT count(*), min(len(acts)) FROM activation_rows").fetchall()[0]
        check = "ok" if (rows, width) == (n, k) else f"{rows} rows × {width}"
        db.unlink()
    return {
        "rc": int(rc),
        "s": float(seconds),
        "rss_gb": int(rss) / 1e9,
        "file_gb": size / 1e9,
        "acts": check,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="2500,5000,10000,20000", help="N values at fixed --k")
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--fixed-n", type=int, default=5000)
    ap.add_argument("--ks", default="4096,16384,65536", help="K values at fixed --fixed-n")
    ap.add_argument("--target", action="store_true", help="also the 20,000 × 65,536 target")
    ap.add_argument("--variants", default="streamed,in-memory")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--max-gb", type=float, default=16.0, help="skip runs estimated above this RSS")
    args = ap.parse_args()
    variants = args.variants.split(",")
    configs = [(int(n), args.k) for n in args.n.split(",")] + [
        (args.fixed_n, int(k)) for k in args.ks.split(",")
    ]
    if args.target:
        configs.append((20_000, 65_536))
    configs = sorted(set(configs))
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "out") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "small-clip.json").write_text(json.dumps(_clip_config()))
        t0 = time.perf_counter()
        make_images(tmp / "images", max(n for n, _ in configs))
        print(
            f"generated {max(n for n, _ in configs):,} images in {time.perf_counter() - t0:.0f} s", flush=True
        )
        codes = {"streamed": ROOT}
        if "in-memory" in variants:
            base = tmp / "baseline"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline, "dissect_tui"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            codes["in-memory"] = base
        print(
            f"{'N':>7} {'K':>7} {'variant':>10} {'time s':>8} {'peak RSS GB':>12} {'file GB':>8} {'acts in cache':>14}"
        )
        for n, k in configs:
            for variant in variants:
                acts_gb = n * k * 4 / 1e9
                if variant == "in-memory" and 6.5 * acts_gb > args.max_gb:
                    print(
                        f"{n:>7,} {k:>7,} {variant:>10}   not run: ~{6.5 * acts_gb:.0f} GB estimated",
                        flush=True,
                    )
                    continue
                r = run_one(codes[variant], tmp, tmp / "images", n, k, variant)
                if "error" in r:
                    print(f"{n:>7,} {k:>7,} {variant:>10}   failed: {r['error']}", flush=True)
                    continue
                print(
                    f"{n:>7,} {k:>7,} {variant:>10} {r['s']:>8.1f} {r['rss_gb']:>12.2f} {r['file_gb']:>8.2f} {r['acts']:>14}",
                    flush=True,
                )


def _clip_config() -> dict:
    sys.path.insert(0, str(HERE))
    from small_models import SMALL_CLIP_CONFIG

    return SMALL_CLIP_CONFIG


if __name__ == "__main__":
    main()
