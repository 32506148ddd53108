"""The `dissect-tui` command line: a thin dispatcher over dissect_tui.commands.

Each subcommand lives in its own module exposing ``register(subparsers)``; modules import
their heavy dependencies (torch, textual) inside ``run`` so `--help` and `browse` start fast.
Every UserError becomes one line on stderr; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dissect_tui import __version__
from dissect_tui.errors import UserError

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("index", "relabel", "browse", "sql", "export", "evaluate", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dissect-tui",
        description="Label every neuron of a vision network with CLIP-Dissect, store the results in "
        "DuckDB, and explore them in the terminal.",
    )
    parser.add_argument("--version", action="version", version=f"dissect-tui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dissect_tui.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dissect_tui.commands.{name}":
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # `dissect-tui sql … | head`


if __name__ == "__main__":
    raise SystemExit(main())
