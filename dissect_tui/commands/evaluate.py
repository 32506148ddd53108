"""`dissect-tui evaluate DB`: how good are the final layer's labels? (paper Section 4.2, Tables 1-3)

Each unit of the classifier layer is a class; its label is compared with the class name:
CLIP-text cosine, mpnet cosine, and — when the concept set contains the class names — top-1 /
top-5 accuracy and the mean / median rank of the class name among the unit's concepts.
``--similarity all`` rescores the stored activations with every similarity function (Table 3).
Results are printed and stored in the cache's ``metrics`` table.

Also home to the helpers `analyze` shares: resolving the run, the classifier layer, its class
names and the text encoders.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dissect_tui.errors import OfflineError, UserError
from dissect_tui.methods import METHOD_NAMES

SHIPPED_CLASSES = ("imagenet", "places365", "cifar100")
CLASS_COUNTS = {1000: "imagenet", 365: "places365", 100: "cifar100"}


# --------------------------------------------------------------------------------------
# argparse


def add_common_options(p: argparse.ArgumentParser, mpnet: bool = True, classes: bool = True) -> None:
    """Options shared by evaluate and the analyze subcommands."""
    p.add_argument("db", help="cache file (or a model name: cache/NAME.duckdb)")
    p.add_argument("--run", type=int, help="run id (default: the latest)")
    if classes:
        p.add_argument(
            "--layer",
            help="the classifier layer whose units are classes (default: the one with stored weights)",
        )
        p.add_argument(
            "--classes",
            metavar="imagenet|places365|cifar100|FILE",
            help="class names in unit order (default: from the target and the unit count)",
        )
        p.add_argument(
            "--clip",
            metavar="SPEC",
            help="CLIP for the text similarity of every text, e.g. ViT-B-16:/path/weights.pt (default: the "
            "run's stored text embeddings, loading the run's CLIP only for texts the cache lacks)",
        )
    if mpnet:
        p.add_argument(
            "--mpnet",
            metavar="MODEL|none",
            help="sentence-transformers model name or local folder for the mpnet similarity "
            "(default all-mpnet-base-v2; skipped with a note when unavailable), none to skip",
        )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--no-save", action="store_true", help="print only; do not store the metrics in the cache")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compare final-layer labels with the class names (paper Tables 1-3)",
        description="Final-layer evaluation against ground truth: CLIP-text and mpnet cosine between "
        "each class unit's label and its class name; top-1/top-5 accuracy and mean/median rank of the "
        "class name when the concept set contains the class names. Stores the results in the cache's "
        "metrics table.",
    )
    add_common_options(p)
    p.add_argument(
        "--similarity",
        choices=("all", *METHOD_NAMES),
        help="rescore the stored activations with this similarity function (all: the four side by "
        "side, paper Table 3) instead of evaluating the run's stored labels",
    )
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------
# shared context


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
    infos = {info.layer: info for info in reader.layers()}
    stored = dict(classifier_layers(reader))
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
        raise UserError(f"no layer {layer!r} in this cache; layers: {', '.join(infos) or 'none'}")
    if need_weights and layer not in stored:
        have = ", ".join(stored) or "none"
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

    base_key = tower_key(str(run.get("clip_key") or ""), run.get("template"))
    stored = concept_embeddings_by_text(reader, base_key) if base_key else {}
    spec = f"{run.get('clip_model')}:{run.get('clip_pretrained')}"

    def load() -> Any:
        try:
            return ts.load_clip_text(spec, resolve_device(device))
        except UserError as exc:
            raise UserError(
                f"texts missing from the cache need the run's CLIP text tower ({spec}): {exc} "
                "(pass --clip NAME:/path/to/checkpoint for a local copy)"
            ) from None

    return ts.CachedTextEncoder(stored, load, f"CLIP {spec}")


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


def open_db(arg: str) -> tuple[Path, Any]:
    from dissect_tui.store import open_cache, resolve_cache

    path = resolve_cache(arg)
    assert path is not None
    return path, open_cache(path)


def store_rows(path: Path, entries: list[tuple[int, str, list[tuple[str, float | None, str | None]]]]) -> str:
    from dissect_tui.store.metrics import save_metrics

    save_metrics(path, entries)
    n = sum(len(rows) for _, _, rows in entries)
    names = ", ".join(f"'{a}'" for a in sorted({a for _, a, _ in entries}))
    return f"stored {n} metrics in {path} (SELECT * FROM metrics WHERE analysis IN ({names}))"


# --------------------------------------------------------------------------------------
# evaluate


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


def _evaluate_stored(
    reader: Any, ctx: ClassLayer, args: argparse.Namespace, enc: Any, mp: Any, notes: list[str]
):
    """Metrics of the labels the run stored (ranks from stored lists, rescored past them)."""
    from dissect_tui.evaluation import label_metrics, match_class_names, ranks_in_lists
    from dissect_tui.store.metrics import layer_labels, neuron_concept_ids

    labels, _ = layer_labels(reader, ctx.run_id, ctx.layer)
    concept_ids, texts = reader.run_concepts(ctx.run_id)
    true_idx = match_class_names(ctx.class_names, texts)
    clip_cos = text_cosines(enc, labels, ctx.class_names)
    mp_cos = text_cosines(mp, labels, ctx.class_names) if mp is not None else None
    ranks, list_length, scope_txt = None, None, ""
    if (true_idx >= 0).any():
        position = {int(c): i for i, c in enumerate(concept_ids)}
        stored = neuron_concept_ids(reader, ctx.run_id, ctx.layer)
        ranked = np.vectorize(lambda c: position.get(int(c), -2))(stored) if stored.size else stored
        ranks = ranks_in_lists(ranked, true_idx)
        t = ranked.shape[1]
        scope_txt = f"stored top {t}"
        lost = (true_idx >= 0) & np.isnan(ranks)
        if lost.any() and t < len(texts):
            # class names beyond the stored lists: rescore over the whole set for exact ranks
            try:
                scope = load_scope(reader, ctx, concept_ids, args.device)
                full = rescore_ranks(
                    scope, ctx.run["similarity"], dict(ctx.run.get("hyperparameters") or {}), len(texts)
                )
                exact = ranks_in_lists(full, true_idx)
                ranks[lost] = np.maximum(exact[lost], t + 1)
                scope_txt = (
                    f"all {len(texts)} concepts ({int(lost.sum())} ranks past the stored top {t} rescored)"
                )
            except (ImportError, UserError) as exc:
                list_length = t
                notes.append(f"could not rescore past the stored top {t}: {exc}")
        if not (true_idx >= 0).all():
            notes.append(
                f"{int((true_idx < 0).sum())} of {len(true_idx)} class names are not in the concept set; "
                "accuracy and ranks cover the others"
            )
    else:
        notes.append(
            f"the concept set ({ctx.run.get('concept_set')}) contains none of the class names: top-1/top-5 "
            f"and ranks need a run whose concepts include them (e.g. relabel --concepts {ctx.classes_spec})"
        )
    return label_metrics(ranks, true_idx, clip_cos, mp_cos, list_length, scope_txt)


def _evaluate_rescored(reader: Any, ctx: ClassLayer, methods: list[str], args, enc, mp, notes: list[str]):
    """Rescore the stored data with each method; metrics of the labels each would give."""
    from dissect_tui.evaluation import label_metrics, match_class_names, ranks_in_lists

    concept_ids, texts = reader.run_concepts(ctx.run_id)
    true_idx = match_class_names(ctx.class_names, texts)
    scope = load_scope(reader, ctx, concept_ids, args.device)
    out = {}
    for method in methods:
        hp = dict(ctx.run.get("hyperparameters") or {}) if method == ctx.run.get("similarity") else {}
        ranked = rescore_ranks(scope, method, hp, len(texts))
        labels = [texts[i] for i in ranked[:, 0]]
        clip_cos = text_cosines(enc, labels, ctx.class_names)
        mp_cos = text_cosines(mp, labels, ctx.class_names) if mp is not None else None
        ranks = ranks_in_lists(ranked, true_idx) if (true_idx >= 0).any() else None
        out[method] = label_metrics(ranks, true_idx, clip_cos, mp_cos, None, f"all {len(texts)} concepts")
    if not (true_idx >= 0).any():
        notes.append(
            f"the concept set ({ctx.run.get('concept_set')}) contains none of the class names: no top-1/top-5"
        )
    return out


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric in ("top1", "top5"):
        return f"{100 * value:.1f}%"
    if metric in ("mean_rank", "median_rank"):
        return f"{value:,.1f}"
    if metric in ("n_units", "n_matched"):
        return f"{int(value):,}"
    return f"{value:.4f}"


COLUMNS = [
    ("clip_cos", "CLIP cos"),
    ("mpnet_cos", "mpnet cos"),
    ("top1", "top-1 acc"),
    ("top5", "top-5 acc"),
    ("mean_rank", "mean rank"),
    ("median_rank", "median rank"),
]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dissect_tui.evaluation import LabelMetrics

    console = Console()
    path, reader = open_db(args.db)
    notes: list[str] = []
    with reader:
        ctx = resolve_class_layer(reader, args.run, args.layer, args.classes)
        enc = clip_text_encoder(reader, ctx.run, args.clip, args.device)
        mp = mpnet_encoder(args.mpnet, args.device, notes)
        results: dict[str, LabelMetrics]
        if args.similarity:
            methods = list(METHOD_NAMES) if args.similarity == "all" else [args.similarity]
            results = _evaluate_rescored(reader, ctx, methods, args, enc, mp, notes)
        else:
            results = {str(ctx.run.get("similarity")): _evaluate_stored(reader, ctx, args, enc, mp, notes)}
    if getattr(enc, "n_encoded", 0):
        notes.append(f"{enc.n_encoded} texts were not in the cache and were encoded with {enc.name}")

    what = "rescored" if args.similarity else "stored labels"
    title = (
        f"run {ctx.run_id} · {ctx.layer} ({ctx.n_units:,} units) · classes {ctx.classes_spec} · "
        f"concepts {ctx.run.get('concept_set')} ({ctx.run.get('n_concepts') or '?'}) · {what}"
    )
    table = Table(title=escape(title), title_justify="left")
    table.add_column("similarity", no_wrap=True, min_width=12)
    for _, head in COLUMNS:
        table.add_column(head, justify="right")
    for method, m in results.items():
        values = dict(m.rows())
        table.add_row(method, *(_fmt(key, values[key]) for key, _ in COLUMNS))
    console.print(table)
    first = next(iter(results.values()))
    console.print(
        f"units {first.n_units:,}; class names in the concept set: {first.n_matched:,}"
        + (f"; ranks over {first.rank_scope}" if first.rank_scope and first.top1 is not None else "")
        + f"; text encoders: {enc.name}"
        + (f", {mp.name}" if mp is not None else ""),
        markup=False,
    )
    for m in results.values():
        notes.extend(n for n in m.notes if n not in notes)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")

    if not args.no_save:
        entries = []
        for method, m in results.items():
            analysis = f"evaluate:{method}" if args.similarity else "evaluate"
            details = json.dumps(
                {
                    "layer": ctx.layer,
                    "classes": ctx.classes_spec,
                    "similarity": method,
                    "rank_scope": m.rank_scope,
                    "clip": enc.name,
                    "mpnet": mp.name if mp is not None else None,
                    "notes": notes + [n for n in m.notes if n not in notes],
                }
            )
            entries.append((ctx.run_id, analysis, [(k, v, details) for k, v in m.rows() if v is not None]))
        console.print(escape(store_rows(path, entries)))
    return 0
