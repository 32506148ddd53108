"""The `dissect-tui` command line: a thin dispatcher over dissect_tui.commands.

Each subcommand lives in its own module exposing ``register(subparsers)``; modules import
their heavy dependencies (torch, textual) inside ``run`` so `--help` and `browse` start fast.

Every way a command can end is one line at most: a UserError, a full disk, a damaged file, a
DuckDB failure, an OS error or running out of memory (host or GPU) print ``error: …`` and exit
2; Ctrl-C exits 130, SIGTERM 143, SIGHUP 129 (128 + the signal), after the same cleanup (see
dissect_tui.signals). Cache write locks still held when a command ends are released here.

A command line argparse cannot parse (an unknown option, a missing argument, a bad value or
choice) is the same: one ``error: …`` line and one hint naming the command's ``--help``, exit 2,
never argparse's usage block. ``--help`` prints the full help; ``dissect-tui`` without a command
prints the top-level help (the list of commands) on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from dissect_tui import __version__, filesafety, signals
from dissect_tui.errors import UserError
from dissect_tui.text import printable

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("index", "relabel", "browse", "sql", "export", "evaluate", "analyze", "compose")


class UsageError(Exception):
    """A command line that does not parse; ``prog`` is the (sub)command whose --help to suggest."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error()`` raises UsageError instead of printing the usage
    block and exiting, so :func:`main` reports it like every other failure. Subparsers inherit it
    (``add_subparsers`` builds them with the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dissect-tui",
        description="Label every neuron of a vision network with CLIP-Dissect, store the results in "
        "DuckDB, and explore them in the terminal.",
    )
    parser.add_argument("--version", action="version", version=f"dissect-tui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dissect_tui.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except UsageError as exc:
        _say(f"error: {exc}")
        _say(f"see '{exc.prog} --help'")
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return _run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C again while the first ending was being reported
        return signals.exit_code(exc)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but unrecognized arguments are reported by the (sub)command they
    were given to, so the hint names that command's --help rather than the top level's."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subparser that parsed the command line (``analyze weights``: the weights parser)."""
    while True:
        chosen = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None) or "")
        if chosen is None:
            return parser
        parser = chosen


@contextlib.contextmanager
def _output_never_fails_on_text() -> Iterator[None]:
    """On a stdout that cannot encode every character (PYTHONIOENCODING=ascii, a Latin-1
    terminal), a label or SQL value outside it is written as a backslash escape, as stderr does,
    instead of ending the command in a UnicodeEncodeError. Restored afterwards."""
    out = sys.stdout
    errors = getattr(out, "errors", None)
    if errors != "strict" or not hasattr(out, "reconfigure"):
        yield
        return
    out.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a closed stdout keeps what it had
            out.reconfigure(errors=errors)


def _run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_output_never_fails_on_text())
        if args.command != "browse":  # the browser's event loop keeps the default signal handling
            stack.enter_context(signals.command_signals())
        stack.enter_context(filesafety.notes_to(_print_note))
        try:
            return int(args.func(args) or 0)
        except BaseException as exc:  # noqa: BLE001 - every ending becomes one line (a bug: a traceback)
            signals.settle()
            code = _report(exc)
            if code is None:
                raise
            return code
        finally:
            signals.settle()
            filesafety.release_all()


def _report(exc: BaseException) -> int | None:
    """Print one line for how a command ended; the exit code, or None to re-raise (a bug, an exit)."""
    if signals.is_interrupt(exc) or signals.received_signal() is not None:
        # (after SIGTERM/SIGHUP, whatever error follows is its consequence: DuckDB reports it its own way)
        code = signals.exit_code(exc)
        _say("interrupted" if code == 130 else f"interrupted ({signals.signal_name(code)})")
        return code
    if isinstance(exc, UserError):
        _say(f"error: {exc}")
        return 2
    if isinstance(exc, BrokenPipeError):
        return 0  # `dissect-tui sql … | head`
    if isinstance(exc, MemoryError) or _accelerator_oom(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say(f"error: out of memory{': ' + first if first else ''}")
        return 2
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(exc, duckdb.Error):  # a damaged file, a full disk
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _say(f"error: database error: {text}")
        return 2
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"error: {where}{exc.strerror or exc}")
        return 2
    return None


def _accelerator_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (a RuntimeError; CUDA's says "CUDA out of memory. Tried to …"),
    recognised without importing torch here."""
    return isinstance(exc, RuntimeError) and any(
        cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch") for cls in type(exc).__mro__
    )


def _say(line: str) -> None:
    """One line on stderr, control characters made visible; a vanished terminal is no error."""
    try:
        print(printable(line), file=sys.stderr)
    except (OSError, ValueError):
        pass


def _print_note(message: str) -> None:
    _say(f"note: {message}")


if __name__ == "__main__":
    raise SystemExit(main())
