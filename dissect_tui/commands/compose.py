"""`dissect-tui compose DB --layer L [--unit U ...]`: two-concept explanations (paper A.4) in batch.

For each neuron, its top ``--breadth`` stored concepts and every ordered pair "w1 w2" of them are
encoded with the run's CLIP text tower (and template) and rescored together with SoftWPMI. A pair
that beats the best single concept suggests the neuron responds to a combination. Results are
printed and stored in the cache's ``compositions`` relation (docs/SQL.md), where SQL and the
browser's detail screen find them.
"""

from __future__ import annotations

import argparse
from typing import Any

from dissect_tui.errors import UserError

DEFAULT_BREADTH = 10
MAX_BREADTH = 100
DEFAULT_KEEP = 10


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compose",
        help="explain neurons by pairs of concepts (paper A.4); stored in the cache",
        description="For each neuron of --layer (or each --unit), rescore its top --breadth concepts and every "
        "ordered pair of them with SoftWPMI through the run's CLIP text tower; print the best pair against "
        "the best single concept and store both rankings in the cache's compositions relation.",
    )
    p.add_argument("db", metavar="DB", help="cache file, or a model name for cache/MODEL.duckdb")
    p.add_argument("--layer", required=True, help="layer to explain")
    p.add_argument(
        "--unit",
        type=int,
        action="append",
        metavar="U",
        help="a neuron of the layer; repeatable (default: every neuron of the layer)",
    )
    p.add_argument(
        "--breadth",
        type=int,
        default=DEFAULT_BREADTH,
        help=f"top concepts per neuron to pair, 2-{MAX_BREADTH}: N·(N-1) pairs each "
        f"(default {DEFAULT_BREADTH})",
    )
    p.add_argument("--run", type=int, help="run id (default: the newest run)")
    p.add_argument(
        "--clip",
        metavar="SPEC",
        help="CLIP to load instead of the run's recorded one (NAME:PATH), e.g. when its weights file moved; "
        "it must be the same text tower",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        help=f"pairs and singles stored per neuron (default {DEFAULT_KEEP})",
    )
    p.add_argument("--no-save", action="store_true", help="print only; leave the cache unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.console import RichProgress, output_console, plain
    from dissect_tui.evaluation_data import open_db
    from dissect_tui.explain import Explainer
    from dissect_tui.store.compositions import UnitComposition, save_compositions
    from dissect_tui.store.reader import CacheReader
    from dissect_tui.text import printable

    if not 2 <= args.breadth <= MAX_BREADTH:
        raise UserError(f"--breadth must be between 2 and {MAX_BREADTH}, got {args.breadth}")
    if args.keep < 1:
        raise UserError(f"--keep must be at least 1, got {args.keep}")
    path, reader = open_db(args.db, save=not args.no_save)
    with reader:
        run_rec = reader.run(args.run)
        rid = int(run_rec["run_id"])
        layers = {info.layer: info for info in reader.layers()}
        if args.layer not in layers:
            names = ", ".join(printable(n) for n in layers)
            raise UserError(f"no layer {printable(args.layer)!r} in this cache; its layers: {names}")
        n_units = layers[args.layer].n_units
        units = sorted(set(args.unit)) if args.unit else list(range(n_units))
        bad = [u for u in units if not 0 <= u < n_units]
        if bad:
            raise UserError(f"{printable(args.layer)} has units 0-{n_units - 1}; no unit {bad[0]}")
        wanted = set(units)
        labels = {
            int(u): str(label)
            for _, u, _, label, _ in reader.neuron_concepts(rid, args.layer, None, limit=1)
            if int(u) in wanted
        }
        explainer = Explainer(lambda: CacheReader(reader.con.cursor(), path), run_rec, clip=args.clip)
        with RichProgress(quiet=args.quiet) as progress:
            started = False

            def on_texts(done: int, total: int) -> None:
                nonlocal started
                if not started:
                    progress.start("pairs", total, "texts")
                    started = True
                progress.update("pairs", done, total)

            found = explainer.compose_many(args.layer, units, args.breadth, on_texts=on_texts)
            if started:
                progress.finish("pairs")
    results = [UnitComposition(args.layer, u, b, pairs, singles) for u, b, pairs, singles in found]
    if not results:
        raise UserError(f"no neuron of {printable(args.layer)} in run {rid} has two stored concepts to pair")
    console = output_console()
    console.print(_table(rid, args.layer, results, labels))
    skipped = len(units) - len(results)
    if skipped:
        console.print(plain(f"note: {skipped} neuron(s) with fewer than two stored concepts left out"))
    if not args.no_save:
        save_compositions(path, rid, results, args.keep)
        console.print(
            plain(
                f"stored {len(results)} compositions in {path} "
                f"(SELECT * FROM compositions WHERE run_id = {rid} AND layer = '{args.layer}')"
            )
        )
    return 0


def _table(rid: int, layer: str, results: list[Any], labels: dict[int, str]) -> Any:
    from rich import box
    from rich.table import Table

    from dissect_tui.console import plain

    better = sum(1 for r in results if (r.gain or 0) > 0)
    table = Table(
        title=plain(
            f"run {rid} · {layer} · pairs of each neuron's top concepts vs its best single "
            f"({better} of {len(results)} explained better by a pair)"
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("unit", justify="right", no_wrap=True)
    table.add_column("label")
    table.add_column("best pair")
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("best single", no_wrap=False)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    for r in results:
        pair, pair_score = r.pairs[0] if r.pairs else ("", float("nan"))
        single, single_score = r.singles[0] if r.singles else ("", float("nan"))
        gain = r.gain
        table.add_row(
            str(r.unit),
            plain(labels.get(r.unit, "")),
            plain(pair),
            f"{pair_score:.3f}",
            plain(single),
            f"{single_score:.3f}",
            "" if gain is None else f"{gain:+.3f}",
        )
    return table
