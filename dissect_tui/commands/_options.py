"""Option parsing shared by index and relabel.

Options default to None: the settings dataclasses (dissect_tui.settings) own every default, and
help texts quote them from there so they cannot drift.
"""

from __future__ import annotations

import argparse
from typing import Any

from dissect_tui.errors import UserError
from dissect_tui.methods import DEFAULT_CUTOFF, DEFAULT_METHOD, METHOD_NAMES, METHODS
from dissect_tui.settings import IndexSettings, default_of


def parse_hyperparameters(pairs: list[str] | None) -> dict[str, Any]:
    """--hp a=10 --hp lam=0.6 -> {"a": 10, "lam": 0.6}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--hp takes KEY=VALUE, got {pair!r}")
        text = value.strip()
        for cast in (int, float):
            try:
                out[key.strip()] = cast(text)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = text
    return out


def split_list(values: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated values -> one list; None when the option was not given,
    [] when it was given but names nothing (``--layers ,``): the settings refuse that."""
    if values is None:
        return None
    return [v.strip() for chunk in values for v in chunk.split(",") if v.strip()]


def _hp_help() -> str:
    ranges = "; ".join(f"{m.name}: {m.describe() or 'none'}" for m in METHODS.values())
    return f"similarity hyperparameter, repeatable, e.g. --hp a=10 --hp lam=1 (defaults and valid ranges: {ranges})"


def add_scoring_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """``defaults``: index (the documented defaults) or relabel (the base run's settings)."""
    base = "the base run's"
    p.add_argument(
        "--similarity",
        choices=METHOD_NAMES,
        help=f"similarity function (default: {DEFAULT_METHOD if defaults else base})",
    )
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help=_hp_help())
    p.add_argument(
        "--cutoff",
        type=float,
        help="interpretability cutoff τ on the score (default: "
        + (f"{DEFAULT_CUTOFF}, the paper's, calibrated for soft_wpmi)" if defaults else f"{base})"),
    )
    p.add_argument(
        "--template",
        help='prompt template for concept texts with one {}, e.g. "a photo of {}" (default: '
        + ("texts as written)" if defaults else f"{base})"),
    )
    p.add_argument(
        "--top-concepts",
        type=int,
        help=f"top concepts stored per neuron (default {default_of(IndexSettings, 'top_concepts')})",
    )
    p.add_argument("--device", help="auto (CUDA, then MPS, else CPU; the default), cpu, cuda, cuda:N, mps")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")


def scoring_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring options the user gave, as settings fields."""
    return {
        "similarity": args.similarity,
        "hyperparameters": parse_hyperparameters(args.hp),
        "cutoff": args.cutoff,
        "template": args.template,
        "top_concepts": args.top_concepts,
        "device": args.device,
    }


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
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--no-save", action="store_true", help="print only; do not store the metrics in the cache")
