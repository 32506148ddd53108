"""`dissect-tui evaluate DB`: how good are the final layer's labels? (paper Section 4.2, Tables 1-3)

Each unit of the classifier layer is a class; its label is compared with the class name:
CLIP-text cosine, mpnet cosine, and — when the concept set contains the class names — top-1 /
top-5 accuracy and the mean / median rank of the class name among the unit's concepts.
``--similarity all`` rescores the stored activations with every similarity function (Table 3).
Results are printed and stored in the cache's ``metrics`` table.

The run, classifier layer, class names and text encoders come from ``evaluation_data.py``
(shared with `analyze`); the metric maths from ``evaluation.py``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from dissect_tui.commands._options import add_common_options
from dissect_tui.errors import UserError
from dissect_tui.evaluation_data import (
    ClassLayer,
    clip_text_encoder,
    encoded_note,
    load_scope,
    mpnet_encoder,
    open_db,
    rescore_ranks,
    resolve_class_layer,
    store_rows,
    text_cosines,
)
from dissect_tui.methods import METHOD_NAMES


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
# evaluate


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
    from rich.table import Table
    from rich.text import Text

    from dissect_tui.console import output_console, plain
    from dissect_tui.evaluation import LabelMetrics

    console = output_console()
    path, reader = open_db(args.db, save=not args.no_save)
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
    if (note := encoded_note(enc, saving=not args.no_save)) is not None:
        notes.append(note)

    what = "rescored" if args.similarity else "stored labels"
    title = (
        f"run {ctx.run_id} · {ctx.layer} ({ctx.n_units:,} units) · classes {ctx.classes_spec} · "
        f"concepts {ctx.run.get('concept_set')} ({ctx.run.get('n_concepts') or '?'}) · {what}"
    )
    table = Table(title=plain(title), title_justify="left")
    table.add_column("similarity", no_wrap=True, min_width=12)
    for _, head in COLUMNS:
        table.add_column(head, justify="right")
    for method, m in results.items():
        values = dict(m.rows())
        table.add_row(plain(method), *(_fmt(key, values[key]) for key, _ in COLUMNS))
    console.print(table)
    first = next(iter(results.values()))
    console.print(
        plain(
            f"units {first.n_units:,}; class names in the concept set: {first.n_matched:,}"
            + (f"; ranks over {first.rank_scope}" if first.rank_scope and first.top1 is not None else "")
            + f"; text encoders: {enc.name}"
            + (f", {mp.name}" if mp is not None else "")
        )
    )
    for m in results.values():
        notes.extend(n for n in m.notes if n not in notes)
    for note in notes:
        console.print(Text("note: ", style="yellow") + plain(note))

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
        console.print(plain(store_rows(path, entries, encoders=[enc])))
    return 0
