"""What `evaluate` and `analyze` share: the run, its classifier layer and class names, the text
encoders for label/class-name similarity, rescoring inputs, and storing metrics.

The metric maths itself is in ``evaluation.py``; the commands in ``commands/evaluate.py`` and
``commands/analyze.py`` only parse options and print. Torch is imported only where a model or
a rescoring needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dissect_tui.errors import OfflineError, UserError

SHIPPED_CLASSES = ("imagenet", "places365", "cifar100")
CLASS_COUNTS = {1000: "imagenet", 365: "places365", 100: "cifar100"}


@dataclass
class ClassLayer:
    """The classifier layer of a run and everything needed to compare its units with classes."""

    run: dict[str, Any]
    run_id: int
    layer: str
    input_layer: str | None
    n_units: int
    classes_spec: str
    class_names: list[str]


def resolve_device(device: str) -> str:
    """The device string for a text tower or rescoring (dissect_tui.runtime decides)."""
    from dissect_tui.runtime import resolve_device as resolve

    return str(resolve(device))


def default_classes(target: str | None, n_units: int) -> str | None:
    """Class list implied by the target name, else by the unit count; None when unknown."""
    name = (target or "").lower()
    if "places365" in name:
        return "places365"
    if "cifar100" in name or "cifar-100" in name:
        return "cifar100"
    if n_units == 1000 and not name.endswith(".py") and ":" not in name:
        return "imagenet"  # torchvision classifiers (resnet*, vit_*, …) are ImageNet-1k
    return CLASS_COUNTS.get(n_units)


def resolve_class_layer(
    reader: Any,
    run_id: int | None,
    layer: str | None,
    classes: str | None,
    need_weights: bool = False,
) -> ClassLayer:
    """The run, its classifier layer and class names, or one clear UserError."""
    from dissect_tui.concepts import class_names
    from dissect_tui.store.metrics import classifier_layers, labelled_layers

    run = reader.run(run_id)
    rid = int(run["run_id"])
    infos = {info.layer: info for info in sorted(reader.layers(), key=lambda info: info.position)}
    stored = dict(classifier_layers(reader))  # last layer first: the default

    def network_order(names: Any) -> str:
        return ", ".join(
            sorted(names, key=lambda n: (n not in infos, infos[n].position if n in infos else 0))
        )

    if layer is None:
        if stored:
            layer = next(iter(stored))
        else:
            guesses = [name for name in ("fc", "heads", "classifier", "head") if name in infos]
            if need_weights or not guesses:
                raise UserError(
                    "this cache stores no classifier weights, so the final layer is unknown: "
                    + (
                        "re-index a model with a linear final layer (fc / heads)"
                        if need_weights
                        else "pass --layer NAME"
                    )
                )
            layer = guesses[0]
    if layer not in infos:
        raise UserError(f"no layer {layer!r} in this cache; layers: {network_order(infos) or 'none'}")
    if need_weights and layer not in stored:
        have = network_order(stored) or "none"
        raise UserError(
            f"no weights stored for layer {layer!r} (layers with weights: {have}); re-index with "
            f"{layer} among --layers so its weights are stored"
        )
    if layer not in labelled_layers(reader, rid):
        raise UserError(f"run {rid} has no labels for layer {layer!r}; relabel or re-index with that layer")
    n_units = int(infos[layer].n_units)
    spec = classes or default_classes(run.get("target"), n_units)
    if spec is None:
        raise UserError(
            f"layer {layer} has {n_units} units and no class list is known for target "
            f"{run.get('target')!r}: pass --classes FILE (one class name per line, in unit order)"
        )
    names = class_names(spec)
    if len(names) != n_units:
        raise UserError(
            f"class list {spec} has {len(names)} names but layer {layer} has {n_units} units: "
            "pass --classes FILE with one name per unit, in unit order"
        )
    return ClassLayer(run, rid, layer, stored.get(layer), n_units, spec, names)


def clip_text_encoder(reader: Any, run: dict[str, Any], clip: str | None, device: str) -> Any:
    """CLIP text encoder for label/class-name similarity.

    Without --clip: the cache's stored concept embeddings of the run's text tower (without
    a prompt template, so texts are compared as written) and the run's CLIP, loaded only for
    texts the cache lacks. With --clip: that model for every text (never mixed with stored
    vectors of another model).
    """
    from dissect_tui import text_similarity as ts
    from dissect_tui.store.metrics import concept_embeddings_by_text

    if clip:
        return ts.CachedTextEncoder(
            {}, lambda: ts.load_clip_text(clip, resolve_device(device)), f"CLIP {clip}"
        )
    from dissect_tui.text_encoding import tower_key

    # Texts the tower encodes here are stored under its key when the metrics are saved
    # (store_rows), so the next evaluate/analyze of this cache loads no CLIP for them.
    base_key = tower_key(str(run.get("clip_key") or ""), run.get("template")) or None
    stored = concept_embeddings_by_text(reader, base_key) if base_key else {}
    spec = f"{run.get('clip_model')}:{run.get('clip_pretrained')}"

    def load() -> Any:
        try:
            loaded = ts.load_clip_text(spec, resolve_device(device))
        except UserError as exc:
            raise UserError(
                f"texts missing from the cache need the run's CLIP text tower ({spec}): {exc} "
                "(pass --clip NAME:/path/to/checkpoint for a local copy)"
            ) from None
        key = getattr(getattr(loaded, "clip", None), "key", None)
        if key is not None and key != base_key:
            encoder.store_key = None  # other weights under the run's path now: never store their vectors
        return loaded

    encoder = ts.CachedTextEncoder(stored, load, f"CLIP {spec}", store_key=base_key)
    return encoder


def encoded_note(encoder: Any, saving: bool) -> str | None:
    """The note for texts the CLIP encoder had to compute, or None when every text was stored."""
    n = getattr(encoder, "n_encoded", 0)
    if not n:
        return None
    kept = " (kept in the cache with the metrics: the next run loads no CLIP for them)"
    keeps = saving and getattr(encoder, "store_key", None)
    return f"{n} texts were not in the cache and were encoded with {encoder.name}" + (kept if keeps else "")


def mpnet_encoder(spec: str | None, device: str, notes: list[str]) -> Any | None:
    """The mpnet encoder, or None with a note when skipped (explicit failures are errors)."""
    from dissect_tui import text_similarity as ts

    if spec is not None and spec.strip().lower() == "none":
        return None
    try:
        # sentence-transformers picks CUDA itself; resolving "auto" here would import torch early
        return ts.load_mpnet(spec or ts.DEFAULT_MPNET, None if device == "auto" else device)
    except ts.MissingDependency as exc:
        notes.append(f"mpnet skipped: {exc}")
    except OfflineError as exc:
        if spec is not None:
            raise  # the user asked for this model: say why it failed
        notes.append(f"mpnet skipped: {exc}")
    return None


def text_cosines(encoder: Any, a: list[str], b: list[str]) -> np.ndarray:
    from dissect_tui.evaluation import paired_cosine
    from dissect_tui.text_similarity import encode_unique

    return paired_cosine(encode_unique(encoder, a), encode_unique(encoder, b))


def open_db(arg: str, save: bool = False) -> tuple[Path, Any]:
    """The cache's path and a reader on it. ``save``: the command will store its metrics, so it
    takes the cache's write lock first, before any work: another dissect-tui process writing
    the cache is reported now, not after minutes of computing (released when the command ends)."""
    from dissect_tui.store import open_cache, resolve_cache
    from dissect_tui.store.metrics import reserve_for_metrics

    path = resolve_cache(arg)
    assert path is not None
    if save:
        reserve_for_metrics(path)
    return path, open_cache(path)


def store_rows(
    path: Path,
    entries: Sequence[tuple[int, str, Sequence[tuple[str, float | None, str | None]]]],
    encoders: Sequence[Any] = (),
) -> str:
    """Save metrics; texts that ``encoders`` (CachedTextEncoder) had to encode are stored with them
    as embeddings of their text tower, so the next evaluate/analyze loads no CLIP for them."""
    from dissect_tui.store.metrics import save_metrics

    embeddings = []
    for enc in encoders:
        key, fresh = getattr(enc, "store_key", None), getattr(enc, "fresh", None)
        if key and fresh:
            embeddings.append((key, list(fresh), np.stack(list(fresh.values()))))
    save_metrics(path, entries, embeddings)
    n = sum(len(rows) for _, _, rows in entries)
    names = ", ".join(f"'{a}'" for a in sorted({a for _, a, _ in entries}))
    return f"stored {n} metrics in {path} (SELECT * FROM metrics WHERE analysis IN ({names}))"


@dataclass
class Scope:
    """The activations, embeddings and concepts a rescoring needs, aligned on image id."""

    acts: Any  # torch [N, K]
    image_emb: Any  # torch [N, D]
    concept_emb: Any  # torch [M, D]


def load_scope(reader: Any, ctx: ClassLayer, concept_ids: np.ndarray, device: str) -> Scope:
    import torch

    from dissect_tui.errors import CacheError

    index_run = reader.index_run(ctx.run_id)
    act_ids, acts = reader.layer_activations(ctx.layer)
    emb_ids, emb = reader.image_embeddings()
    common, ia, ie = np.intersect1d(act_ids, emb_ids, return_indices=True)
    if len(common) < 2:
        raise UserError(f"the cache has too few images with both activations and embeddings for {ctx.layer}")
    try:
        cemb = reader.concept_embeddings(index_run_key(ctx.run, index_run), concept_ids)
    except CacheError as exc:
        raise UserError(f"cannot rescore: {exc}") from None
    dev = torch.device(resolve_device(device))
    return Scope(
        torch.from_numpy(np.ascontiguousarray(acts[ia])).to(dev),
        torch.from_numpy(np.ascontiguousarray(emb[ie])).to(dev),
        torch.from_numpy(np.ascontiguousarray(cemb)).to(dev),
    )


def index_run_key(run: dict[str, Any], index_run: dict[str, Any]) -> str:
    """The clip_key under which the run's concept embeddings (as scored) are stored."""
    return str(run.get("clip_key") or index_run.get("clip_key"))


def rescore_ranks(scope: Scope, method: str, hp: dict[str, Any], n_concepts: int) -> np.ndarray:
    """[K, M] every concept index per unit, best first, by one similarity function."""
    from dissect_tui.methods import get_method
    from dissect_tui.scoring import score_layer

    known = get_method(method).defaults()  # a run records every setting; keep the scorer's own
    hp = {k: v for k, v in hp.items() if k in known}
    result = score_layer(
        scope.acts, scope.image_emb, scope.concept_emb, method, top_concepts=n_concepts, **hp
    )
    return result.top_concepts.cpu().numpy().astype(np.int64)
