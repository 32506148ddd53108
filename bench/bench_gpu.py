"""One-shot GPU benchmark for issue 5: files -> finished cache, --decode gpu vs --decode cpu.

Meant for ONE device call (about 8 minutes at most): it generates N ImageNet-like JPEGs
(500x375 / 375x500, random content with photo-like entropy; generation timed separately), then
runs the real pipeline (``dissect_tui.indexer.run_index``): ResNet-50 (random weights; conv1,
layer1-4, fc) + CLIP ViT-B-16 (random), 20k concepts, SoftWPMI, bf16 (+ channels_last, the CUDA
default), once with ``--decode gpu`` and once with ``--decode cpu`` (workers = cores), printing
images/s and seconds per stage; then the share of identical labels per layer between fp32 and
bf16 on the same inputs (a subset), and the target table. Every result is printed as soon as it
is known and, when the OUT environment variable is set, written to $OUT/bench_gpu.json and
$OUT/bench_gpu.log.

    python bench/bench_gpu.py                       # 50k images, the issue-5 setting
    python bench/bench_gpu.py --images 20000 --skip-fp32
    python bench/bench_gpu.py --quick               # tiny sizes; runs on a CPU (numbers mean nothing)

Without CUDA (``--quick`` on a laptop) "gpu" decoding runs the same tensor path on the CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare checkout

PER_FOLDER = 1000  # images per folder, so a subset is a list of folders
TARGET_SECONDS = 20.0
TARGET_IPS = 2500.0
TARGET_AGREEMENT = 0.99


# ---------------------------------------------------------------- output


class Report:
    """Prints lines at once and keeps results in $OUT/bench_gpu.json (rewritten after each step)."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.results: dict = {}
        if out:
            out.mkdir(parents=True, exist_ok=True)
            self.log = open(out / "bench_gpu.log", "a", encoding="utf-8")  # noqa: SIM115
        else:
            self.log = None

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def save(self, key: str, value) -> None:
        self.results[key] = value
        if self.out:
            (self.out / "bench_gpu.json").write_text(json.dumps(self.results, indent=1, default=str))


# ---------------------------------------------------------------- images


def _make_chunk(args: tuple[str, int, int, int]) -> int:
    """Write images [start, stop) into folder/NNN/: smooth colour field + shapes + grain."""
    from PIL import Image, ImageDraw

    root, start, stop, quality = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        size = (500, 375) if i % 4 else (375, 500)
        coarse = rng.integers(
            0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8
        )
        img = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
        # grain gives real-photo-like entropy (file size, Huffman decode cost)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(
            -12, 13, size=(size[1], size[0], 3), dtype=np.int16
        )
        folder = Path(root) / f"{i // PER_FOLDER:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(
            folder / f"{i:06d}.jpg", quality=quality
        )
    return stop - start


def generate(root: Path, n: int, processes: int) -> float:
    t0 = time.perf_counter()
    step = max(1, min(500, n // (processes * 4) or 1))
    jobs = [(str(root), s, min(n, s + step), 90) for s in range(0, n, step)]
    with mp.get_context("fork").Pool(processes) as pool:
        done = sum(pool.imap_unordered(_make_chunk, jobs))
    assert done == n
    return time.perf_counter() - t0


def folders(root: Path, n: int) -> list[str]:
    return [str(root / f"{k:03d}") for k in range((n + PER_FOLDER - 1) // PER_FOLDER)]


# ---------------------------------------------------------------- runs


def index(
    args, probe: list[str], db: Path, decode: str, precision: str, rep: Report, tag: str, concepts: str = ""
) -> dict:
    import torch

    from dissect_tui.indexer import IndexSettings, run_index

    if decode == "gpu" and not torch.cuda.is_available():
        decode = "tensor"  # the same device path, on the CPU
    settings = IndexSettings(
        model=args.model,
        weights="none",
        layers=args.layers.split(","),
        probe=probe,
        concepts=concepts or args.concepts,
        clip=args.clip,
        db=db,
        cache_dir=db.parent,
        device=args.device,
        precision=precision,
        batch_size=args.batch_size,
        workers=args.workers,
        decode=decode,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_index(settings)
    total = time.perf_counter() - t0
    row = {
        "run": tag,
        "decode": decode,
        "precision": precision,
        "images": result.n_images,
        "failed": result.n_failed,
        "total_s": round(total, 2),
        "end_to_end_img_s": round(result.n_images / total, 1),
        "images_stage_img_s": round(result.images_per_second or 0, 1),
        "stages": result.stage_seconds,
        "notes": [n for n in result.notes if n.startswith("decode")],
        "db": str(result.path),
    }
    if torch.cuda.is_available():
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    stages = "  ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
    rep.line(
        f"{tag:<22} {decode:<6} {precision:<5} {result.n_images:>7} img  total {total:7.1f} s  "
        f"end-to-end {row['end_to_end_img_s']:>8.0f} img/s  images stage {row['images_stage_img_s']:>8.0f} img/s"
    )
    rep.line(
        f"{'':<22} stages s: {stages}"
        + (f"  peak GPU {row['peak_gpu_gib']} GiB" if "peak_gpu_gib" in row else "")
    )
    for note in row["notes"]:
        rep.line(f"{'':<22} {note}")
    return row


def labels_by_layer(db: Path) -> dict[str, list[str]]:
    from dissect_tui.store import open_cache

    with open_cache(db) as r:
        run = r.run()
        neurons = r.neurons(run["run_id"])
    out: dict[str, list[str]] = {}
    for layer, label in zip(neurons["layer"], neurons["label"], strict=True):
        out.setdefault(str(layer), []).append(str(label))
    return out


def disagreement(db_low: Path, db_ref: Path) -> dict:
    """Why labels differ between a low-precision and an fp32 cache of the same images.

    Separates the two sources of change: the target network (overlap of each neuron's top images)
    and CLIP (cosine between the two runs' embeddings of each image); and says how close the
    differing labels were (rank of the fp32 label in the low-precision run's list, score gap,
    next to the usual gap between a neuron's best and second-best concept).
    """
    from dissect_tui.store import open_cache

    def load(db: Path):
        with open_cache(db) as r:
            run_id = r.run()["run_id"]
            ranked: dict[tuple[str, int], list[tuple[str, float]]] = {}
            for layer, unit, _rank, text, score in r.neuron_concepts(run_id, limit=100):
                ranked.setdefault((layer, int(unit)), []).append((text, float(score)))
            _, rows = r.query("SELECT layer, unit, image_id FROM top_images")
            tops: dict[tuple[str, int], set[int]] = {}
            for layer, unit, image_id in rows:
                tops.setdefault((layer, int(unit)), set()).add(int(image_id))
            ids, emb = r.image_embeddings()
        return ranked, tops, dict(zip(ids.tolist(), emb, strict=True))

    low_ranked, low_tops, low_emb = load(db_low)
    ref_ranked, ref_tops, ref_emb = load(db_ref)
    ranks, gaps = [], []
    for key, ref in ref_ranked.items():
        low = low_ranked[key]
        if low[0][0] == ref[0][0]:
            continue
        texts = [t for t, _ in low]
        rank = texts.index(ref[0][0]) + 1 if ref[0][0] in texts else None
        ranks.append(rank)
        if rank is not None:
            gaps.append(low[0][1] - low[rank - 1][1])
    top2_gap = [v[0][1] - v[1][1] for v in low_ranked.values() if len(v) > 1]
    overlap = [len(low_tops[k] & ref_tops[k]) / max(1, len(ref_tops[k])) for k in ref_tops]
    common = sorted(set(low_emb) & set(ref_emb))
    cos = [float(np.dot(low_emb[i], ref_emb[i])) for i in common]  # embeddings are unit length
    return {
        "differing": len(ranks),
        "fp32_label_in_top5": float(np.mean([r is not None and r <= 5 for r in ranks])) if ranks else None,
        "median_gap_differing": float(np.median(gaps)) if gaps else None,
        "median_gap_top1_top2_all": float(np.median(top2_gap)) if top2_gap else None,
        "top_image_overlap_mean": float(np.mean(overlap)) if overlap else None,
        "top_image_overlap_min": float(np.min(overlap)) if overlap else None,
        "embedding_cos_min": float(np.min(cos)) if cos else None,
        "embedding_cos_median": float(np.median(cos)) if cos else None,
    }


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--fp32-images", type=int, default=10_000, help="subset for the fp32 vs bf16 labels")
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument(
        "--fp32-concepts", default=None, help="concepts of the fp32 vs bf16 runs (default --concepts)"
    )
    ap.add_argument("--quick", action="store_true", help="64 images, resnet18, ViT-B-32, 3k concepts")
    ap.add_argument("--decodes", default="gpu,cpu", help="decode modes to time, in order")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--layers", default="conv1,layer1,layer2,layer3,layer4,fc")
    ap.add_argument("--clip", default="ViT-B-16:none")
    ap.add_argument("--concepts", default="20k")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the indexer's (256 on CUDA)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--root", type=Path, default=None, help="where the images go (default a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the images and caches")
    args = ap.parse_args()
    if args.quick:
        args.images, args.fp32_images = min(args.images, 64), min(args.fp32_images, 64)
        args.model, args.clip, args.concepts = "resnet18", "ViT-B-32:none", "3k"
        args.batch_size = args.batch_size or 32
        args.fp32_images, args.fp32_concepts = min(args.fp32_images, 32), args.fp32_concepts or "cifar100"
        args.workers = min(args.workers, 2)

    import torch
    import torchvision

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    rep = Report(out)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    card = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    env = {
        "card": card,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rep.save("env", env)
    rep.line(
        f"bench_gpu: {card}, {env['cores']} cores, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )
    # bf16 autocast on a CPU is far slower than fp32 (minutes for 64 images): time fp32 there
    main_precision = "bf16" if cuda else "fp32"
    if not cuda:
        rep.line("NOTE: no CUDA device: this run proves the script works; its numbers mean nothing.")

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    try:
        if not images.exists() or len(list(images.glob("*/*.jpg"))) != args.images:
            shutil.rmtree(images, ignore_errors=True)
            secs = generate(images, args.images, os.cpu_count() or 1)
            mb = sum(p.stat().st_size for p in images.glob("*/*.jpg")) / 2**20
            rep.line(
                f"generated {args.images} JPEGs ({mb:.0f} MiB) in {secs:.1f} s (not part of any timing below)"
            )
            rep.save("generation", {"images": args.images, "seconds": round(secs, 2), "mib": round(mb, 1)})
        probe_all = folders(images, args.images)

        # warm-up: CUDA context, cuDNN heuristics, allocator; kept out of the table
        t0 = time.perf_counter()
        warm_n = min(args.images, 2 * PER_FOLDER if not args.quick else args.images)
        index(
            args, folders(images, warm_n)[:2], root / "warmup.duckdb", "gpu", main_precision, rep, "warm-up"
        )
        rep.line(f"(warm-up took {time.perf_counter() - t0:.1f} s)")

        rows = []
        for decode in args.decodes.split(","):
            rows.append(
                index(
                    args, probe_all, root / f"{decode}.duckdb", decode, main_precision, rep, f"full {decode}"
                )
            )
            rep.save("runs", rows)

        agreement = None
        if not args.skip_fp32:
            n_sub = min(args.fp32_images, args.images)
            listing = root / "subset.txt"  # a probe list file: the first n_sub images
            listing.write_text(
                "\n".join(str(images / f"{i // PER_FOLDER:03d}" / f"{i:06d}.jpg") for i in range(n_sub))
            )
            dbs = {}
            for precision in ("bf16", "fp32"):
                dbs[precision] = root / f"sub_{precision}.duckdb"
                tag = f"subset {n_sub} {precision}"
                rows.append(
                    index(
                        args, [str(listing)], dbs[precision], "gpu", precision, rep, tag, args.fp32_concepts
                    )
                )
                rep.save("runs", rows)
            a, b = labels_by_layer(dbs["bf16"]), labels_by_layer(dbs["fp32"])
            per_layer = {
                layer: float(np.mean([x == y for x, y in zip(a[layer], b[layer], strict=True)]))
                for layer in a
            }
            all_same = [x == y for layer in a for x, y in zip(a[layer], b[layer], strict=True)]
            agreement = float(np.mean(all_same))
            rep.line(
                f"bf16 vs fp32 identical labels on {n_sub} images: {agreement:.2%} of {len(all_same)} neurons"
            )
            for layer, share in per_layer.items():
                rep.line(f"    {layer:<8} {share:.2%} ({len(a[layer])} units)")
            why = disagreement(dbs["bf16"], dbs["fp32"])
            rep.line(
                "    why: {differing} labels differ; fp32 label in bf16's top 5: {fp32_label_in_top5}; "
                "median score gap of those {median_gap_differing} vs {median_gap_top1_top2_all} between "
                "any neuron's best two concepts".format(**why)
            )
            rep.line(
                "    target side: top-image overlap mean {top_image_overlap_mean} (min {top_image_overlap_min}); "
                "CLIP side: image embedding cos median {embedding_cos_median} (min {embedding_cos_min})".format(
                    **why
                )
            )
            rep.save(
                "bf16_vs_fp32", {"images": n_sub, "overall": agreement, "per_layer": per_layer, "why": why}
            )

        rep.line()
        rep.line(f"targets (issue 5), {args.images} images, {card}:")
        rep.line(f"| what | target | {' | '.join(r['run'] for r in rows if r['run'].startswith('full'))} |")
        full = [r for r in rows if r["run"].startswith("full")]
        rep.line("|---|---|" + "---|" * len(full))
        rep.line(
            f"| end to end, files -> cache | <= {TARGET_SECONDS:.0f} s | "
            + " | ".join(f"{r['total_s']:.1f} s" for r in full)
            + " |"
        )
        rep.line(
            f"| sustained (end to end) | >= {TARGET_IPS:,.0f} img/s | "
            + " | ".join(f"{r['end_to_end_img_s']:,.0f} img/s" for r in full)
            + " |"
        )
        rep.line(
            "| images stage | - | " + " | ".join(f"{r['images_stage_img_s']:,.0f} img/s" for r in full) + " |"
        )
        if agreement is not None:
            rep.line(
                f"| bf16 vs fp32 identical labels | >= {TARGET_AGREEMENT:.0%} | {agreement:.2%} (gpu decode) |"
            )
        rep.save("done", True)
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
