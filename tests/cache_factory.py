"""Build small synthetic caches with the real writer (numpy only, no torch), for UI and SQL tests.

Activations are planted: unit u of every layer responds to concept (u * 7) % n_concepts, so
labels, top images and top concepts are consistent with each other like in a real index.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from dissect_tui.store import CacheWriter

DEFAULT_LAYERS = {"conv1": 8, "layer1": 16, "layer4": 12, "fc": 10}


def _thumb(rng: np.random.Generator) -> bytes:
    arr = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_cache(
    path: Path,
    layers: dict[str, int] | None = None,
    n_images: int = 80,
    concepts: list[str] | None = None,
    dim: int = 16,
    seed: int = 0,
    top_n: int = 20,
    n_failed: int = 2,
    cutoff: float = 0.16,
) -> Path:
    layers = dict(layers or DEFAULT_LAYERS)
    rng = np.random.default_rng(seed)
    if concepts is None:
        concepts = [
            "dog",
            "cat",
            "water",
            "sky",
            "grass",
            "red",
            "striped",
            "wheel",
            "face",
            "tree",
            "50% off",
            "it's",
            "ünïcode",
        ]
    m = len(concepts)
    img_emb = rng.normal(size=(n_images, dim)).astype(np.float32)
    img_emb /= np.linalg.norm(img_emb, axis=1, keepdims=True)
    con_emb = rng.normal(size=(m, dim)).astype(np.float32)
    con_emb /= np.linalg.norm(con_emb, axis=1, keepdims=True)
    p = img_emb @ con_emb.T
    ok_ids = np.arange(n_images)
    with CacheWriter(path) as w:
        run_id = w.add_run(
            kind="index",
            target="tiny",
            target_weights="none",
            clip_model="tiny",
            clip_pretrained="none",
            clip_key="tiny:none",
            probe=["synthetic"],
            n_images=n_images + n_failed,
            n_failed_images=n_failed,
            concept_set="test",
            n_concepts=m,
            layers=list(layers),
            pool="mean",
            similarity="soft_wpmi",
            hyperparameters={"a": 10, "lam": 1},
            cutoff=cutoff,
            device="cpu",
            precision="fp32",
            batch_size=16,
            stage_seconds={"images": 1.0},
            settings={},
        )
        w.write_layers(
            [
                {
                    "layer": name,
                    "n_units": k,
                    "module_type": "Conv2d",
                    "output_shape": f"[{k}]",
                    "pool": "mean",
                }
                for name, k in layers.items()
            ]
        )
        paths = [f"/probe/img_{i:04d}.jpg" for i in range(n_images + n_failed)]
        errors = [None] * n_images + ["cannot identify image file"] * n_failed
        sizes = [(64, 48)] * n_images + [None] * n_failed
        w.write_images(paths, ["synthetic"] * len(paths), sizes, errors)
        cids = w.concept_ids(concepts)
        w.write_concept_embeddings("tiny:none", cids, con_emb)
        w.write_image_embeddings(ok_ids, img_emb)
        w.write_run_concepts(run_id, cids)
        thumbs: dict[int, bytes] = {}
        for layer, k in layers.items():
            target = np.array([(u * 7) % m for u in range(k)])
            acts = p[:, target] * 3 + rng.normal(scale=0.1, size=(n_images, k)).astype(np.float32)
            w.write_activations(layer, ok_ids, acts)
            order = np.argsort(-acts, axis=0, kind="stable")[:top_n].T  # [K, top_n]
            w.write_top_images(layer, ok_ids[order], np.take_along_axis(acts.T, order, axis=1))
            for i in order[:, :10].reshape(-1):
                thumbs.setdefault(int(i), _thumb(rng))
            scores = rng.normal(size=(k, m)).astype(np.float32) * 0.1
            scores[np.arange(k), target] += 0.3 + 0.05 * np.arange(k) / k
            top = np.argsort(-scores, axis=1, kind="stable")[:, : min(m, 10)]
            w.write_neuron_concepts(run_id, layer, cids[top], np.take_along_axis(scores, top, axis=1))
            w.write_neurons(
                run_id,
                layer,
                [concepts[t] for t in top[:, 0]],
                cids[top[:, 0]],
                np.take_along_axis(scores, top[:, :1], axis=1)[:, 0],
                cutoff,
            )
        w.write_thumbnails(thumbs)
        best = np.argsort(-p, axis=1)[:, :3]
        w.write_image_concepts(run_id, ok_ids, cids[best], np.take_along_axis(p, best, axis=1))
        lse = np.log(np.exp(10 * p).sum(axis=1))
        w.write_image_softmax(run_id, ok_ids, lse)
        # what `dissect-tui compose` stores for a few neurons, some explained better by a pair
        first = next(iter(layers))
        made = datetime(2026, 1, 1)
        comp = []
        for unit in range(min(4, layers[first])):
            a, b = concepts[unit % len(concepts)], concepts[(unit + 1) % len(concepts)]
            single = float(rng.normal())
            pair = single + (0.5 if unit % 2 == 0 else -0.5)
            comp += [
                (run_id, first, unit, 2, "pair", 1, f"{a} {b}", pair, made),
                (run_id, first, unit, 2, "single", 1, a, single, made),
            ]
        w.con.executemany("INSERT INTO compositions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", comp)
        if "fc" in layers and "layer4" in layers:
            w.write_linear_weights(
                "fc",
                "layer4",
                rng.normal(size=(layers["fc"], layers["layer4"])),
                rng.normal(size=layers["fc"]),
            )
        w.commit()
    return path
