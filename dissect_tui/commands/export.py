"""`dissect-tui export DB OUT.csv|OUT.parquet`: neuron labels of one run as a file.

The CSV begins with CLIP-Dissect's own result columns (layer,unit,description,similarity);
the filters are the browser's: layers, cutoff, interpretable only, text match, neurons.
"""

from __future__ import annotations

import argparse
from typing import Any

from dissect_tui.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write neuron labels to CSV or Parquet",
        description="Write one run's neuron labels to a CSV or Parquet file (chosen by the suffix). "
        "Columns: layer, unit, description, similarity (as CLIP-Dissect writes them), then "
        "interpretable, concept_id, top_concepts (best 5, '; '-separated), run_id, and cutoff when "
        "--cutoff is given.",
    )
    p.add_argument("db", metavar="DB", help="cache file, or a model name resolved to cache/NAME.duckdb")
    p.add_argument("out", metavar="OUT", help="output file: NAME.csv or NAME.parquet")
    p.add_argument("--run", type=int, default=None, metavar="N", help="run id (default: the latest run)")
    p.add_argument(
        "--layer",
        action="extend",
        nargs="+",
        default=None,
        metavar="L",
        help="only these layers (repeatable)",
    )
    p.add_argument(
        "--neuron",
        action="append",
        default=None,
        metavar="LAYER:UNIT",
        help="only these neurons, e.g. layer4:12 (repeatable)",
    )
    p.add_argument(
        "--cutoff",
        type=float,
        default=None,
        metavar="T",
        help="interpretability cutoff for the interpretable column, also written as a cutoff column "
        "(default: the run's)",
    )
    p.add_argument(
        "--interpretable-only", action="store_true", help="only neurons whose similarity is above the cutoff"
    )
    p.add_argument(
        "--match",
        default=None,
        metavar="TEXT",
        help="only neurons whose label or top-5 concepts contain TEXT (case-insensitive)",
    )
    p.add_argument("--format", choices=("csv", "parquet"), default=None, help="override the suffix")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite OUT if it is an existing file (a symbolic link's target; never a folder, device or FIFO)",
    )
    p.set_defaults(func=run)


def parse_neuron(spec: str) -> tuple[str, int]:
    layer, sep, unit = spec.rpartition(":")
    if not sep or not layer or not unit.strip().isdigit():
        raise UserError(f"--neuron {spec!r}: expected LAYER:UNIT, e.g. layer4:12")
    return layer, int(unit)


def check_neurons(reader: Any, keys: list[tuple[str, int]]) -> None:
    """--neuron names a real neuron; one past the end would otherwise export nothing, silently."""
    units = {info.layer: int(info.n_units) for info in reader.layers()}
    for layer, unit in keys:
        if layer not in units:
            raise UserError(
                f"--neuron {layer}:{unit}: no layer {layer!r} in this cache; layers: {', '.join(units)}"
            )
        if unit >= units[layer]:
            raise UserError(
                f"--neuron {layer}:{unit}: no unit {unit} in layer {layer!r}, it has units 0-{units[layer] - 1}"
            )


def run(args: argparse.Namespace) -> int:
    from dissect_tui.store import open_cache, resolve_cache
    from dissect_tui.store.export import export_format, export_neurons

    export_format(args.out, args.format)  # a bad suffix fails before the cache is opened
    keys = [parse_neuron(s) for s in args.neuron] if args.neuron else None
    with open_cache(resolve_cache(args.db)) as reader:
        run_id = args.run if args.run is not None else reader.latest_run_id()
        check_neurons(reader, keys or [])
        n = export_neurons(
            reader,
            run_id,
            args.out,
            keys=keys,
            fmt=args.format,
            cutoff=args.cutoff,
            layers=args.layer,
            interpretable_only=args.interpretable_only,
            text=args.match,
            overwrite=args.force,
        )
    print(f"wrote {n} neuron{'s' if n != 1 else ''} to {args.out}")
    return 0
