"""Option parsing shared by index and relabel."""

from __future__ import annotations

import argparse
from typing import Any

from dissect_tui.errors import UserError


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
    """Repeated and/or comma-separated values -> one list (None when not given)."""
    if not values:
        return None
    return [v.strip() for chunk in values for v in chunk.split(",") if v.strip()]


def add_scoring_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    from dissect_tui.similarity_names import SIMILARITY_NAMES

    p.add_argument(
        "--similarity",
        choices=SIMILARITY_NAMES,
        default="soft_wpmi" if defaults else None,
        help="similarity function (default: soft_wpmi%s)" % ("" if defaults else ", or the base run's"),
    )
    p.add_argument(
        "--hp",
        action="append",
        metavar="KEY=VALUE",
        help="similarity hyperparameter, e.g. --hp a=10 --hp lam=1 (paper defaults otherwise)",
    )
    p.add_argument(
        "--cutoff",
        type=float,
        default=0.16 if defaults else None,
        help="interpretability cutoff τ on the score (default 0.16, the paper's)",
    )
    p.add_argument(
        "--template", help='prompt template for concept texts, e.g. "a photo of {}" (default: as written)'
    )
    p.add_argument(
        "--top-concepts", type=int, default=100, help="top concepts stored per neuron (default 100)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
