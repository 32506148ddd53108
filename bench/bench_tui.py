"""Browser speed: first paint and filter keystroke → table updated, for 4k and 100k neurons.

    python bench/bench_tui.py [--sizes 4k,100k] [--images 50000]

Builds synthetic caches with the real writer (labels and top concepts drawn from the shipped
20k concept list; images rows for --images probe images), then drives the app headless:
- first paint: App start until the neuron table holds the run's neurons (worker included);
- search ready: until the top concepts the text filter also searches are loaded (2nd phase);
- idle key: Pilot.press of a key that changes nothing (the harness's own cost);
- keystroke: typing a filter one character at a time, then deleting it; "filter" is the
  in-memory mask + sort + table update alone, "key→table" is Pilot.press (the Input
  widget, our handler and the redraw of the visible rows).
Prints a table; numbers depend on the machine (the CI box has 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dissect_tui.concepts import load_concepts
from dissect_tui.store.writer import CacheWriter

RESNET50 = {"conv1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


def build(path: Path, layers: dict[str, int], n_images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    try:
        concepts = list(load_concepts("20k").texts)
    except Exception:  # the list's loader signature may differ; any texts will do
        concepts = [f"concept {i}" for i in range(20000)]
    with CacheWriter(path) as w:
        run_id = w.add_run(kind="index", target="bench", clip_model="none", clip_pretrained="none",
                           clip_key="none", probe=["synthetic"], n_images=n_images, n_failed_images=0,
                           concept_set="20k", n_concepts=len(concepts), layers=list(layers), pool="mean",
                           similarity="soft_wpmi", hyperparameters={"a": 10, "lam": 1}, cutoff=0.16,
                           device="cpu", precision="fp32", batch_size=256, stage_seconds={}, settings={})  # fmt: skip
        w.write_layers([{"layer": n, "n_units": k, "module_type": "Conv2d", "output_shape": f"[{k}]", "pool": "mean"}
                        for n, k in layers.items()])  # fmt: skip
        paths = [f"/data/probe/img_{i:06d}.jpg" for i in range(n_images)]
        w.write_images(paths, ["synthetic"] * n_images, [(500, 375)] * n_images, [None] * n_images)
        cids = w.concept_ids(concepts)
        w.write_run_concepts(run_id, cids)
        ids = np.arange(n_images)
        emb = rng.normal(size=(n_images, 16)).astype(np.float32)
        w.write_image_embeddings(ids, emb / np.linalg.norm(emb, axis=1, keepdims=True))
        for layer, k in layers.items():  # what the detail screen reads: activations and top images
            acts = rng.random((n_images, k), dtype=np.float32)
            w.write_activations(layer, ids, acts)
            order = np.argsort(-acts, axis=0)[:20].T
            w.write_top_images(layer, ids[order], np.take_along_axis(acts.T, order, axis=1))
        for layer, k in layers.items():
            top = rng.integers(0, len(concepts), size=(k, 10))
            scores = np.sort(rng.normal(0.1, 0.08, size=(k, 10)).astype(np.float32), axis=1)[:, ::-1]
            w.write_neuron_concepts(run_id, layer, cids[top], scores)
            w.write_neurons(
                run_id, layer, [concepts[t] for t in top[:, 0]], cids[top[:, 0]], scores[:, 0], 0.16
            )
        w.commit()
    return path


async def measure(path: Path, text: str) -> dict[str, float]:
    from dissect_tui.store.reader import open_cache
    from dissect_tui.tui.app import BrowserApp
    from dissect_tui.tui.detail import DetailScreen
    from dissect_tui.tui.neuron_table import NeuronTable

    t0 = time.perf_counter()
    app = BrowserApp(open_cache(path))
    async with app.run_test(size=(120, 40)) as pilot:
        while not len(app.screen.query(NeuronTable)) or not len(app.screen.query_one(NeuronTable).rows):
            await asyncio.sleep(0.005)
        first_paint = time.perf_counter() - t0
        scr = app.screen
        n = scr.session.model.n
        while not scr.session.model.table.top_concepts[0]:  # the second loading phase (search texts)
            await asyncio.sleep(0.005)
        tops_loaded = time.perf_counter() - t0
        await pilot.press("slash")
        idle = []
        for _ in range(6):  # Pilot's own cost: a key that changes nothing
            t = time.perf_counter()
            await pilot.press("end")
            idle.append((time.perf_counter() - t) * 1000)
        press, filt = [], []
        for keys in [list(text), ["backspace"] * len(text)]:
            for key in keys:
                t = time.perf_counter()
                await pilot.press(key)
                press.append((time.perf_counter() - t) * 1000)
                filt.append(scr.last_update_ms)
        # the detail screen: Enter until its data is shown, Esc until the table is back
        await pilot.press("escape")
        opened, back = [], []
        for _ in range(5):
            t = time.perf_counter()
            await pilot.press("enter")
            while not isinstance(app.screen, DetailScreen) or app.screen.detail is None:
                await asyncio.sleep(0.002)
            await pilot.pause()
            opened.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await pilot.press("escape")
            while app.screen is not scr:
                await asyncio.sleep(0.002)
            await pilot.pause()
            back.append((time.perf_counter() - t) * 1000)
    return {
        "detail_open_ms": statistics.median(opened),
        "detail_back_ms": statistics.median(back),
        "neurons": n,
        "first_paint_s": first_paint,
        "tops_s": tops_loaded,
        "idle_ms": statistics.median(idle),
        "filter_med_ms": statistics.median(filt),
        "filter_max_ms": max(filt),
        "press_med_ms": statistics.median(press),
        "press_max_ms": max(press),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4k,100k")
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--text", default="dog")
    args = ap.parse_args()
    shapes = {"4k": RESNET50, "100k": {f"block{i:02d}": 4000 for i in range(25)}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            t = time.perf_counter()
            path = build(Path(tmp) / f"bench-{size}.duckdb", shapes[size], args.images)
            built = time.perf_counter() - t
            res = asyncio.run(measure(path, args.text))
            res.update(size=size, build_s=built)
            rows.append(res)
    print(f"\nbrowse benchmark ({args.images:,} images, filter text {args.text!r}, typed then deleted)")
    print(f"{'cache':>6} {'neurons':>8} {'first paint':>12} {'search ready':>13} {'filter med':>11} "
          f"{'filter max':>11} {'key→table med':>14} {'key→table max':>14} {'idle key':>9} "
          f"{'detail open':>12} {'Esc back':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['size']:>6} {r['neurons']:>8,} {r['first_paint_s']:>10.2f} s {r['tops_s']:>11.2f} s "
              f"{r['filter_med_ms']:>8.1f} ms {r['filter_max_ms']:>8.1f} ms {r['press_med_ms']:>11.1f} ms "
              f"{r['press_max_ms']:>11.1f} ms {r['idle_ms']:>6.1f} ms "
              f"{r['detail_open_ms']:>9.0f} ms {r['detail_back_ms']:>6.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
