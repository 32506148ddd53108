"""`dissect-tui relabel DB`: new labels from stored activations and embeddings, as a new run."""

from __future__ import annotations

import argparse

from dissect_tui.commands._options import add_scoring_options, scoring_options
from dissect_tui.concepts import SHIPPED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relabel",
        help="recompute labels with another similarity, cutoff or concept set (no image is read)",
        description="Score the stored activations again and record a new run in the same cache. Only "
        "concept texts that the cache has no embedding for are encoded (needs the run's CLIP weights).",
    )
    p.add_argument("db", help="cache file or model name (cache/NAME.duckdb)")
    p.add_argument(
        "--concepts", help=f"concept set: {', '.join(SHIPPED)} or a text file (default: the base run's)"
    )
    p.add_argument(
        "--clip",
        metavar="NAME[:PRETRAINED]",
        help="where the run's CLIP weights are here, if they must be loaded",
    )
    p.add_argument("--run", type=int, help="base run (default: the latest)")
    add_scoring_options(p, defaults=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.console import RichProgress, print_summary
    from dissect_tui.indexer import run_relabel
    from dissect_tui.settings import RelabelSettings
    from dissect_tui.store import resolve_cache

    settings = RelabelSettings.from_options(
        {
            "db": resolve_cache(args.db),
            "concepts": args.concepts,
            "clip": args.clip,
            "run": args.run,
            **scoring_options(args),
        }
    )
    with RichProgress(quiet=args.quiet) as progress:
        result = run_relabel(settings, progress)
    print_summary(result, quiet=args.quiet)
    print(result.path)
    return 0
