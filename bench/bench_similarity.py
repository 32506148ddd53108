"""Benchmark scoring.score_layers (the P-free scorer) and compare it with similarity.py.

Prints four tables:
  1. the target size: ResNet-50-like layers (64, 256, 512, 1024, 2048 neurons) × M concepts ×
     N images, D = 512, SoftWPMI by default: score_layers' wall time (top images of every layer
     + the shared pass; top-image time per layer shown apart), CPU time and peak RSS, and the
     machine's matrix-product rate measured right after, with the floor it sets (the N×M×D
     product of P alone);
  2. the indexer's scoring stage at the target size, which also stores each image's top-5
     concepts and softmax normaliser: computed by a second pass over P (as before) against
     collected inside the scoring pass (image_top=5), with the share of equal image labels;
  3. scaling: time and peak RSS as N, K and M each double from a base size;
  4. scoring.score_layer against the dense similarity function on a size where P fits.

Every measurement runs in its own subprocess so peak RSS (ru_maxrss) belongs to that run alone;
"input RSS" is the RSS after the synthetic inputs were made, so peak − input is the scorer's own
memory. The machine may be shared: CPU seconds and the load average are printed next to wall
time. Quick run: ``python bench/bench_similarity.py --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RESNET50 = [64, 256, 512, 1024, 2048]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def _cur_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def child(cfg: dict) -> dict:
    """One measured run; returns timings and memory as a dict."""
    import torch

    from dissect_tui import scoring
    from dissect_tui.methods import METHODS

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    g = torch.Generator().manual_seed(0)
    N, M, D = cfg["N"], cfg["M"], cfg["D"]
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    layers = {f"k{k}_{i}": torch.randn(N, k, generator=g) for i, k in enumerate(cfg["layers"])}
    input_rss = _cur_rss_gb()
    out: dict = {"input_rss": input_rss}
    cpu0, t0 = time.process_time(), time.perf_counter()
    if cfg["mode"] in ("stage_separate", "stage_fused"):
        from dissect_tui.indexer import image_concept_summary

        fused = cfg["mode"] == "stage_fused"
        res = scoring.score_layers(
            layers,
            img,
            txt,
            cfg["method"],
            cfg["top"],
            memory_budget=cfg["budget"],
            image_top=5 if fused else 0,
        )
        first = next(iter(res.values()))
        if fused:
            ids = first.image_top_concepts
        else:
            ids = torch.from_numpy(image_concept_summary(img, txt, 10.0)[0])
        out["image_best"] = ids[:, 0].tolist()
    elif cfg["mode"] == "gemm":
        # this machine's matrix-product rate on the shapes pmi_pass uses (64 MB output pieces)
        rows = max(1, (64 << 20) // (4 * M))
        out_t = torch.empty(rows, M)
        torch.mm(img[:rows], txt.T, out=out_t)
        reps, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < 3.0:
            torch.mm(img[:rows], txt.T, out=out_t)
            reps += 1
        out["gflops"] = 2 * rows * M * D * reps / (time.perf_counter() - t1) / 1e9
    elif cfg["mode"] == "dense":
        acts = torch.cat(list(layers.values()), dim=1)
        scores = METHODS[cfg["method"]].dense(acts, img @ txt.T)
        vals, idx = scores.topk(cfg["top"], dim=1)
        out["result"] = {"vals": vals.tolist(), "idx": idx.tolist()}
    else:
        res = scoring.score_layers(layers, img, txt, cfg["method"], cfg["top"], memory_budget=cfg["budget"])
        out["pass_s"] = time.perf_counter() - t0
        if cfg["mode"] == "compare":
            out["result"] = {
                "vals": torch.cat([r.top_scores for r in res.values()]).tolist(),
                "idx": torch.cat([r.top_concepts for r in res.values()]).tolist(),
            }
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - cpu0
    if cfg["mode"] == "score":  # after the clock: score_layers already picks the top images itself
        per_layer = {}
        for name, a in layers.items():
            t = time.perf_counter()
            scoring.top_images(a, 100)
            per_layer[name] = time.perf_counter() - t
        out["top_images_s"] = per_layer
    out["peak_rss"] = _rss_gb()
    return out


def run(cfg: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--concepts", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument(
        "--layers", default=",".join(map(str, RESNET50)), help="neurons per layer, comma separated"
    )
    ap.add_argument("--method", default="soft_wpmi")
    ap.add_argument("--budget", type=float, default=1.0, help="scorer memory budget in GiB")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere (a minute or two)")
    ap.add_argument("--skip", default="", help="comma list of tables to skip: target,stage,scaling,compare")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    skip = set(filter(None, args.skip.split(",")))
    layers = [int(x) for x in args.layers.split(",")]
    N, M = args.images, args.concepts
    if args.quick:
        N, M, layers = 5_000, 2_000, [64, 256]
    base = {
        "D": args.dim,
        "method": args.method,
        "top": 100,
        "budget": int(args.budget * 2**30),
        "threads": args.threads,
    }
    print(
        f"# bench_similarity  torch {torch.__version__}  cores {os.cpu_count()}  threads {torch.get_num_threads()}"
    )
    print(f"# load average at start: {load()}")

    if "target" not in skip:
        cfg = {**base, "N": N, "M": M, "layers": layers, "mode": "score"}
        r = run(cfg)
        print(f"\n## {args.method}: {sum(layers)} neurons x {M} concepts x {N} images, D={args.dim}")
        print("| step | neurons | s |")
        print("|---|---:|---:|")
        print(f"| score_layers: top images + shared SoftWPMI pass | {sum(layers)} | {r['pass_s']:.2f} |")
        for (name, s), k in zip(r["top_images_s"].items(), layers, strict=True):
            print(f"| of which top images of {name} | {k} | {s:.2f} |")
        print(
            f"\ntotal wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak RSS {r['peak_rss']:.2f} GB "
            f"(inputs {r['input_rss']:.2f} GB, scorer {r['peak_rss'] - r['input_rss']:.2f} GB); load {load()}"
        )
        # Wall times differ between machines mostly by their matrix-product rate: the N×M×D
        # product of P is the floor of the stage, so its share says how much is left to gain.
        gf = run({**cfg, "N": 20_000, "layers": [1], "mode": "gemm"})["gflops"]
        floor = 2 * N * M * args.dim / gf / 1e9
        print(
            f"GEMM rate now {gf:.0f} GFLOP/s -> the N x M x D product alone takes {floor:.1f} s; "
            f"the stage is {r['wall_s'] / floor:.2f}x that floor"
        )

    if "stage" not in skip:
        print(f"\n## indexer scoring stage (scores + per-image top-5 and lse), {M} concepts x {N} images")
        print("| variant | wall s | CPU s | peak RSS GB |")
        print("|---|---:|---:|---:|")
        best = {}
        for mode, label in (
            ("stage_separate", "second pass over P"),
            ("stage_fused", "inside the scoring pass"),
        ):
            r = run({**base, "N": N, "M": M, "layers": layers, "mode": mode})
            best[mode] = torch.tensor(r["image_best"])
            print(f"| {label} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss']:.2f} |")
        same = (best["stage_separate"] == best["stage_fused"]).float().mean().item() * 100
        print(f"\nbest concept per image identical for {same:.3f}% of images; load {load()}")

    if "scaling" not in skip:
        bN, bM, bK = (2_000, 1_000, 128) if args.quick else (10_000, 4_000, 512)
        rows = [("base", bN, bK, bM), ("2N", 2 * bN, bK, bM), ("2K", bN, 2 * bK, bM), ("2M", bN, bK, 2 * bM)]
        print(f"\n## scaling ({args.method}, one layer, D={args.dim})")
        print("| size | N | K | M | wall s | CPU s | x base CPU | peak RSS GB | scorer GB | x base scorer |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        b = None
        for label, n, k, m in rows:
            r = run({**base, "N": n, "M": m, "layers": [k], "mode": "score"})
            mem = r["peak_rss"] - r["input_rss"]
            if b is None:
                b = (r["cpu_s"], mem)
            print(
                f"| {label} | {n} | {k} | {m} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['cpu_s'] / b[0]:.2f} | "
                f"{r['peak_rss']:.2f} | {mem:.3f} | {mem / max(b[1], 1e-9):.2f} |"
            )

    if "compare" not in skip:
        cN, cM, cK = (2_000, 1_000, [64]) if args.quick else (8_000, 4_000, [256])
        cfg = {**base, "N": cN, "M": cM, "layers": cK, "top": 5}
        print(f"\n## score_layer vs similarity.{args.method} (dense P), N={cN} M={cM} K={sum(cK)}")
        print("| implementation | wall s | CPU s | peak RSS GB | scorer GB |")
        print("|---|---:|---:|---:|---:|")
        res = {}
        for mode in ("compare", "dense"):
            r = run({**cfg, "mode": mode})
            res[mode] = r["result"]
            name = "scoring.score_layer" if mode == "compare" else f"similarity.{args.method}"
            print(
                f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss']:.2f} | "
                f"{r['peak_rss'] - r['input_rss']:.3f} |"
            )
        a, d = torch.tensor(res["compare"]["vals"]), torch.tensor(res["dense"]["vals"])
        ia, id_ = torch.tensor(res["compare"]["idx"]), torch.tensor(res["dense"]["idx"])
        print(
            f"\nlabels equal: {(ia[:, 0] == id_[:, 0]).float().mean().item() * 100:.2f}% of neurons; "
            f"top-5 indices equal: {(ia == id_).float().mean().item() * 100:.2f}%; "
            f"max |score diff| {(a - d).abs().max().item():.2e} (scores up to {d.abs().max().item():.1f})"
        )
    print(f"\n# load average at end: {load()}")


if __name__ == "__main__":
    main()
