"""Scale-out: `dissect-tui index` in one process against `torchrun --nproc_per_node=G`, same inputs.

Both runs are the real command in fresh processes, on N generated JPEGs with random weights
(nothing downloaded). Prints wall time, images/s and the speed-up, and checks that the two
caches agree (image ids, labels, top images) — the speed-up of a run that writes something else
would mean nothing.

On a GPU machine, each rank takes `cuda:LOCAL_RANK`, so G is at most the number of cards
(default: all of them). On the CPU the ranks use gloo and share the cores: each rank gets
cores / G threads and the single process all of them, so the figure is the overhead (or gain)
of splitting, not of more hardware.

    python bench/bench_torchrun.py [--images 2000] [--ranks 2] [--device cpu]
    python bench/bench_torchrun.py --device cuda --model resnet50 --clip ViT-B-16:none --images 50000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_index_cpu import make_images  # noqa: E402
from small_models import SMALL_CLIP_CONFIG  # noqa: E402

# What must be equal between the single-process cache and the torchrun one.
AGREE = {
    "images": "SELECT image_id, path, ok FROM images ORDER BY 1",
    "labels": "SELECT layer, unit, label FROM neurons ORDER BY 1, 2",
    "top images": "SELECT layer, unit, rank, image_id FROM top_images ORDER BY 1, 2, 3",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], threads: int, cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds


def _agreement(a: Path, b: Path) -> dict[str, float]:
    """Share of equal rows per table (1.0 = identical)."""
    out = {}
    with duckdb.connect(str(a), read_only=True) as ca, duckdb.connect(str(b), read_only=True) as cb:
        for name, sql in AGREE.items():
            ra, rb = ca.execute(sql).fetchall(), cb.execute(sql).fetchall()
            same = sum(x == y for x, y in zip(ra, rb, strict=False))
            out[name] = same / max(len(ra), len(rb), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one card per rank)")
    ap.add_argument("--ranks", type=int, default=0, help="G (default: every CUDA card, or 2 on the CPU)")
    ap.add_argument("--model", default="", help="torchvision name (random weights); default the small CNN")
    ap.add_argument("--layers", default="", help="layers to record (default: the model's)")
    ap.add_argument("--clip", default="", help="open_clip NAME:none (default: the small CLIP-like model)")
    ap.add_argument("--concepts", default="3k")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    if args.device.startswith("cuda"):
        import torch

        cards = torch.cuda.device_count()
        ranks = args.ranks or cards
        if ranks < 2 or ranks > cards:
            sys.exit(f"{cards} CUDA card(s): a GPU speed-up needs 2 ≤ --ranks ≤ the number of cards")
    else:
        ranks = args.ranks or 2

    with tempfile.TemporaryDirectory(dir=HERE / "out" if (HERE / "out").is_dir() else None) as tmp_s:
        tmp = Path(tmp_s)
        make_images(tmp / "images", args.images)
        clip = args.clip
        if not clip:
            (tmp / "small-clip.json").write_text(json.dumps(SMALL_CLIP_CONFIG))
            clip = f"{tmp / 'small-clip.json'}:none"
        model = args.model or f"{HERE / 'small_models.py'}:build"
        common = [model, *(["--weights", "none"] if args.model else [])]  # a factory builds its own weights
        common += [
            "--probe", str(tmp / "images"), "--clip", clip, "--concepts", args.concepts,
            "--device", args.device, "--batch-size", str(args.batch_size), "--quiet",
        ]  # fmt: skip
        if args.layers:
            common += ["--layers", args.layers]

        single, multi = tmp / "single.duckdb", tmp / "multi.duckdb"
        one = _run([sys.executable, "-m", "dissect_tui", "index", *common, "--db", str(single)], cores, tmp)
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={_free_port()}",
        ]  # fmt: skip
        threads = cores if args.device.startswith("cuda") else max(1, cores // ranks)
        many = _run([*launcher, "-m", "dissect_tui", "index", *common, "--db", str(multi)], threads, tmp)
        agree = _agreement(single, multi)

    print(f"{args.images:,} images, {args.device}, {cores} cores, model {args.model or 'small CNN'}")
    print(f"{'run':<34}{'wall s':>9}{'img/s':>9}")
    print(f"{'one process':<34}{one:>9.1f}{args.images / one:>9.0f}")
    print(f"{f'torchrun, {ranks} ranks':<34}{many:>9.1f}{args.images / many:>9.0f}")
    print(f"speed-up: {one / many:.2f}× with {ranks} ranks")
    print("agreement with the single process: " + ", ".join(f"{k} {v:.2%}" for k, v in agree.items()))


if __name__ == "__main__":
    main()
