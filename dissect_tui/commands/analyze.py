"""`dissect-tui analyze weights|predict|interpretability DB`: the paper's analyses of a stored run.

weights           Section 5: similarity between a class and the concepts of the penultimate
                  neurons it weights highest, by weight rank; weight/similarity correlation.
predict           Appendix A.6: predict each probe image's class from the label of the neuron
                  that contributes most to the network's prediction.
interpretability  Appendix A.8: share of interpretable neurons per layer at a cutoff, and the
                  cutoff at which that share crosses chosen levels.

Everything works on the cache (activations, weights, labels, embeddings); results are printed
and stored in the ``metrics`` table under analysis 'weights', 'predict', 'interpretability'.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from dissect_tui.commands._options import add_common_options
from dissect_tui.errors import UserError
from dissect_tui.evaluation_data import (
    clip_text_encoder,
    encoded_note,
    mpnet_encoder,
    open_db,
    resolve_class_layer,
    store_rows,
)
from dissect_tui.methods import DEFAULT_CUTOFF, DEFAULT_METHOD

DEFAULT_LEVELS = "0.1,0.25,0.5,0.75,0.9"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="weight/concept analysis, prediction from labels, interpretability (paper §5, A.6, A.8)",
        description="Analyses of a stored run; results are printed and stored in the cache's metrics table.",
    )
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    w = sub.add_parser(
        "weights",
        help="class-neuron concept similarity by weight rank, and its correlation with the weights (§5)",
        description="For the final layer's weights W [classes, neurons]: the similarity between class c's "
        "name and the label of the neuron with c's k-th highest weight, averaged over classes, for k = 1..K; "
        "Pearson correlation between weight and similarity over all weights and the highest ones.",
    )
    add_common_options(w)
    w.add_argument("--k", type=int, default=10, help="weight ranks to show (default 10)")
    w.add_argument(
        "--top-weights",
        type=int,
        default=50_000,
        help="correlation over this many highest weights (default 50000)",
    )
    w.set_defaults(func=run_weights)

    pr = sub.add_parser(
        "predict",
        help="predict classes from the label of the most contributing neuron (A.6)",
        description="Per probe image: c = the network's prediction (argmax of the final layer); j = the "
        "penultimate neuron with the highest W[c, j]·a_j; the prediction from descriptions is the class "
        "whose name is most similar (CLIP text) to neuron j's label. Reports agreement with c.",
    )
    add_common_options(pr, mpnet=False)
    pr.add_argument("--examples", type=int, default=8, help="most used neurons to list (default 8)")
    pr.set_defaults(func=run_predict)

    it = sub.add_parser(
        "interpretability",
        help="fraction of interpretable neurons per layer and the cutoffs where it crosses levels (A.8)",
        description="Per layer: the fraction of neurons whose score is above the cutoff τ, and for each level "
        "L the τ at which that fraction crosses L (at any lower τ at least L are interpretable).",
    )
    add_common_options(it, mpnet=False, classes=False)
    it.add_argument("--cutoff", type=float, help="τ (default: the run's cutoff)")
    it.add_argument(
        "--levels", default=DEFAULT_LEVELS, help=f"comma-separated fractions (default {DEFAULT_LEVELS})"
    )
    it.set_defaults(func=run_interpretability)


# --------------------------------------------------------------------------------------
# terminal plots (no dependency beyond rich)

_BLOCKS = " ▏▎▍▌▋▊▉█"


def hbar(value: float, lo: float, hi: float, width: int = 30) -> str:
    """A horizontal bar of ``width`` cells for value in [lo, hi], eighth-cell resolution."""
    if not math.isfinite(value) or hi <= lo:
        return ""
    frac = min(max((value - lo) / (hi - lo), 0.0), 1.0)
    eighths = round(frac * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_BLOCKS[rest] if rest else "")


def bar_plot(labels: list[str], values: list[float], lo: float | None = None, width: int = 30) -> str:
    """One line per value: label, bar, number. The axis starts at lo (default: just below the minimum)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    vmin, vmax = min(finite), max(finite)
    if lo is None:
        lo = vmin - 0.1 * (vmax - vmin or abs(vmax) or 1.0)
    pad = max(len(s) for s in labels)
    lines = [
        f"{s:>{pad}} │{hbar(v, lo, vmax, width):<{width}} {v:.4f}"
        for s, v in zip(labels, values, strict=True)
    ]
    lines.append(f"{'':>{pad}} └{'─' * width} axis from {lo:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# weights


def _input_labels(reader: Any, run_id: int, input_layer: str | None, n_inputs: int) -> list[str]:
    from dissect_tui.store.metrics import layer_labels

    if input_layer is None:
        raise UserError(
            "the layer feeding the classifier was not recorded at index time; re-index with it among --layers"
        )
    labels, _ = layer_labels(reader, run_id, input_layer)
    if not labels:
        raise UserError(f"run {run_id} has no labels for {input_layer}, the layer feeding the classifier")
    if len(labels) != n_inputs:
        raise UserError(
            f"{input_layer} has {len(labels)} labelled neurons but the weights have {n_inputs} inputs"
        )
    return labels


def _similarity_matrix(encoder: Any, class_names: list[str], labels: list[str]) -> np.ndarray:
    """[C, K] similarity between class name c and neuron label j (labels encoded once each)."""
    from dissect_tui.evaluation import cosine_matrix
    from dissect_tui.text_similarity import encode_unique

    uniq = list(dict.fromkeys(labels))
    where = {t: i for i, t in enumerate(uniq)}
    sim = cosine_matrix(encode_unique(encoder, class_names), encode_unique(encoder, uniq))
    return sim[:, [where[t] for t in labels]]


def _class_layer_weights(reader: Any, args: argparse.Namespace) -> tuple[Any, np.ndarray, Any, list[str]]:
    """The class layer of ``args`` with its stored weights W [C, K], bias and its inputs' labels."""
    ctx = resolve_class_layer(reader, args.run, args.layer, args.classes, need_weights=True)
    stored = reader.linear_weights(ctx.layer)
    assert stored is not None  # resolve_class_layer checked
    _, w, b = stored
    if w.shape[0] != ctx.n_units:
        raise UserError(f"stored weights of {ctx.layer} have {w.shape[0]} rows for {ctx.n_units} units")
    return ctx, w, b, _input_labels(reader, ctx.run_id, ctx.input_layer, w.shape[1])


def run_weights(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from dissect_tui.console import output_console, plain
    from dissect_tui.evaluation import weight_similarity

    console = output_console()
    notes: list[str] = []
    path, reader = open_db(args.db, save=not args.no_save)
    with reader:
        ctx, w, _, labels = _class_layer_weights(reader, args)
        encoders = {"clip": clip_text_encoder(reader, ctx.run, args.clip, args.device)}
        mp = mpnet_encoder(args.mpnet, args.device, notes)
        if mp is not None:
            encoders["mpnet"] = mp
        results = {
            key: weight_similarity(
                w, _similarity_matrix(enc, ctx.class_names, labels), args.k, args.top_weights
            )
            for key, enc in encoders.items()
        }

    console.print(
        plain(f"run {ctx.run_id} · {ctx.layer} ← {ctx.input_layer} · W {w.shape[0]}×{w.shape[1]} · classes ")
        + plain(ctx.classes_spec)
        + Text(
            "\nk-th: similarity(class c, label of the neuron with c's k-th highest weight), "
            "mean over classes; mean top-k: the same averaged over the k highest weights"
        )
    )
    table = Table()
    table.add_column("k", justify="right")
    for key in results:
        table.add_column(f"{key} k-th", justify="right")
        table.add_column(f"{key} mean top-k", justify="right")
    first = next(iter(results.values()))
    for i, k in enumerate(first.ks):
        table.add_row(str(k), *(f"{v:.4f}" for r in results.values() for v in (r.kth[i], r.top_k_mean[i])))
    table.add_row("all", *(f"{v:.4f}" for r in results.values() for v in (r.all_mean, r.all_mean)))
    console.print(table)
    for key, r in results.items():
        console.print(
            f"{key}: Pearson(weight, similarity) = {r.corr_all:.4f} over all {w.size:,} weights, "
            f"{r.corr_top:.4f} over the top {r.n_top:,}"
        )
    console.print(
        Text("\n")
        + plain(f"{encoders['clip'].name} similarity by weight rank (last bar: mean over all weights)")
    )
    clip = results["clip"]
    plot = bar_plot([f"k={k}" for k in clip.ks] + ["all"], clip.kth + [clip.all_mean])
    console.print(plot, markup=False, highlight=False)
    if (note := encoded_note(encoders["clip"], saving=not args.no_save)) is not None:
        notes.append(note)
    for note in notes:
        console.print(Text("note: ", style="yellow") + plain(note))

    if not args.no_save:
        details = json.dumps(
            {
                "layer": ctx.layer,
                "input_layer": ctx.input_layer,
                "classes": ctx.classes_spec,
                "encoders": {k: e.name for k, e in encoders.items()},
                "notes": notes,
            }
        )
        rows = [(m, v, details) for key, r in results.items() for m, v in r.rows(key)]
        console.print(plain(store_rows(path, [(ctx.run_id, "weights", rows)], encoders=[encoders["clip"]])))
    return 0


# --------------------------------------------------------------------------------------
# predict


def run_predict(args: argparse.Namespace) -> int:
    from collections import Counter

    from rich.table import Table
    from rich.text import Text

    from dissect_tui.console import output_console, plain
    from dissect_tui.evaluation import predict_from_descriptions

    console = output_console()
    notes: list[str] = []
    path, reader = open_db(args.db, save=not args.no_save)
    with reader:
        ctx, w, b, labels = _class_layer_weights(reader, args)
        logit_ids, logits = reader.layer_activations(ctx.layer)
        input_ids, inputs = reader.layer_activations(str(ctx.input_layer))
        common, il, ii = np.intersect1d(logit_ids, input_ids, return_indices=True)
        if len(common) == 0:
            raise UserError(f"no probe image has activations of both {ctx.layer} and {ctx.input_layer}")
        if logits.shape[1] != w.shape[0] or inputs.shape[1] != w.shape[1]:
            raise UserError(
                f"stored activations ({logits.shape[1]} / {inputs.shape[1]} units) do not fit the stored "
                f"weights {w.shape[0]}×{w.shape[1]}"
            )
        enc = clip_text_encoder(reader, ctx.run, args.clip, args.device)
        sim = _similarity_matrix(enc, ctx.class_names, labels).T  # [K, C]
    res = predict_from_descriptions(logits[il], inputs[ii], w, sim, b)
    if (note := encoded_note(enc, saving=not args.no_save)) is not None:
        notes.append(note)
    if res.linear_agreement is not None and res.linear_agreement < 0.99:
        notes.append(
            f"W·a + b reproduces the stored prediction for only {100 * res.linear_agreement:.1f}% of images "
            f"(pooling of {ctx.input_layer} differs from what feeds {ctx.layer}?); contributions are approximate"
        )

    console.print(
        plain(
            f"run {ctx.run_id} · {ctx.layer} ← {ctx.input_layer} · classes {ctx.classes_spec} · {res.n_images:,} images"
        )
    )
    console.print(
        f"[bold]prediction from descriptions agrees with the network on {100 * res.accuracy:.2f}%[/] of probe "
        f"images ({int(round(res.accuracy * res.n_images)):,}/{res.n_images:,})"
    )
    table = Table(title="most used neurons", title_justify="left")
    for col, just in (
        ("neuron", "right"),
        ("label", "left"),
        ("→ class", "left"),
        ("images", "right"),
        ("agree", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    label_class = sim.argmax(axis=1)
    for j, count in Counter(res.neuron.tolist()).most_common(args.examples):
        mask = res.neuron == j
        agree = float(np.mean(res.description_pred[mask] == res.network_pred[mask]))
        table.add_row(
            plain(f"{ctx.input_layer}:{j}"),
            plain(labels[j]),
            plain(ctx.class_names[label_class[j]]),
            f"{count:,}",
            f"{100 * agree:.0f}%",
        )
    console.print(table)
    for note in notes:
        console.print(Text("note: ", style="yellow") + plain(note))

    if not args.no_save:
        details = json.dumps(
            {
                "layer": ctx.layer,
                "input_layer": ctx.input_layer,
                "classes": ctx.classes_spec,
                "clip": enc.name,
                "notes": notes,
            }
        )
        rows = [
            ("accuracy", res.accuracy, details),
            ("n_images", float(res.n_images), details),
            ("linear_agreement", res.linear_agreement, details),
        ]
        console.print(plain(store_rows(path, [(ctx.run_id, "predict", rows)], encoders=[enc])))
    return 0


# --------------------------------------------------------------------------------------
# interpretability


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"--levels takes comma-separated fractions like {DEFAULT_LEVELS}, got {text!r}"
        ) from None
    bad = [x for x in levels if not 0 < x <= 1]
    if not levels or bad:
        raise UserError(f"--levels must be fractions in (0, 1], got {text!r}")
    return levels


def run_interpretability(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from dissect_tui.console import output_console, plain
    from dissect_tui.evaluation import crossing_thresholds, interpretable_fraction
    from dissect_tui.store.metrics import labelled_layers, layer_labels

    console = output_console()
    levels = parse_levels(args.levels)
    path, reader = open_db(args.db, save=not args.no_save)
    with reader:
        run = reader.run(args.run)
        rid = int(run["run_id"])
        tau = args.cutoff if args.cutoff is not None else run.get("cutoff")
        if tau is None:
            raise UserError(f"run {rid} recorded no cutoff: pass --cutoff T")
        scores = {layer: layer_labels(reader, rid, layer)[1] for layer in labelled_layers(reader, rid)}
    if not scores:
        raise UserError(f"run {rid} has no labelled neurons")

    table = Table(
        title=plain(f"run {rid} · {run.get('similarity')} scores · interpretable: score > τ = {tau:g}"),
        title_justify="left",
        box=box.SIMPLE_HEAD,  # light borders leave room for the levels at 80 columns
    )
    # no_wrap + min_width: at 80 columns rich would otherwise cut numbers to "0.90…"
    table.add_column("layer", no_wrap=True)
    table.add_column("neurons", justify="right", no_wrap=True)
    table.add_column("> τ", justify="right", no_wrap=True, min_width=6)
    table.add_column("", justify="left", no_wrap=True, min_width=5)
    for level in levels:
        table.add_column(f"τ@{100 * level:g}%", justify="right", no_wrap=True, min_width=6)
    rows: list[tuple[str, float | None, str | None]] = []
    for layer, s in scores.items():
        frac = interpretable_fraction(s, tau)
        crossings = crossing_thresholds(s, levels)
        table.add_row(
            plain(layer),
            f"{len(s):,}",
            f"{100 * frac:.1f}%",
            hbar(frac, 0.0, 1.0, 5),
            *(f"{t:.3f}" for t in crossings),
        )
        detail = json.dumps({"layer": layer, "tau": tau, "n_units": len(s)})
        rows.append((f"{layer}.fraction", frac, detail))
        rows += [(f"{layer}.tau@{level:g}", t, detail) for level, t in zip(levels, crossings, strict=True)]
    console.print(table)
    console.print(
        "> τ: share of neurons scoring above τ; τ@L: for any cutoff below this value at least L of the layer's neurons are interpretable "
        "(the ⌈L·K⌉-th highest score)"
    )
    if run.get("similarity") != DEFAULT_METHOD:
        note = (
            f"τ = {DEFAULT_CUTOFF} is calibrated for {DEFAULT_METHOD}; this run used {run.get('similarity')}"
        )
        console.print(Text("note: ", style="yellow") + plain(note))
    if not args.no_save:
        console.print(plain(store_rows(path, [(rid, "interpretability", rows)])))
    return 0
