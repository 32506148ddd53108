"""`dissect-tui browse [DB | MODEL]`: the terminal explorer over a cache."""

from __future__ import annotations

import argparse
import sys

GRAPHICS = ("auto", "halfcell", "sixel", "kitty", "none")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "browse",
        help="explore a cache in the terminal",
        description="Browse a dissect-tui cache: layers, neurons, labels, top images, concept queries. "
        "Opens the file read-only, so several browsers can share it. Press ? inside for every key.",
    )
    p.add_argument("cache", nargs="?", metavar="DB | MODEL", help="a cache file, or a model name resolved in cache/ "
                   "(default: choose among the caches in cache/)")  # fmt: skip
    p.add_argument("--run", type=int, default=None, help="run id to show (default: the latest)")
    p.add_argument("--graphics", choices=GRAPHICS, default="halfcell",
                   help="how to draw thumbnails: half-cell blocks work over any SSH (default); auto detects "
                   "Sixel/Kitty; none shows placeholders")  # fmt: skip
    p.add_argument("--cache-dir", default="cache", help="where model names are looked up (default: cache/)")
    p.set_defaults(func=run)


def _choose(caches: list) -> str:
    """Ask on the terminal which cache to open (before the app starts)."""
    from dissect_tui.errors import UserError

    if len(caches) == 1:
        return str(caches[0])
    print("caches:", file=sys.stderr)
    for i, path in enumerate(caches, 1):
        print(f"  {i}. {path}", file=sys.stderr)
    if not sys.stdin.isatty():
        raise UserError("several caches found: name one, e.g. `dissect-tui browse " + str(caches[0]) + "`")
    answer = input(f"open which? [1-{len(caches)}] ").strip() or "1"
    if not answer.isdigit() or not 1 <= int(answer) <= len(caches):
        raise UserError(f"no cache number {answer!r}")
    return str(caches[int(answer) - 1])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dissect_tui.errors import UserError
    from dissect_tui.store.lockdown import lock_down
    from dissect_tui.store.reader import find_caches, open_cache, resolve_cache

    cache_dir = Path(args.cache_dir)
    path = resolve_cache(args.cache, cache_dir)
    if path is None:
        caches = find_caches(cache_dir)
        if not caches:
            raise UserError(
                f"no caches in {cache_dir}/: build one with `dissect-tui index MODEL`, or name a file"
            )
        path = Path(_choose(caches))
    reader = open_cache(path)  # CacheError: missing, not DuckDB, wrong schema, empty, locked
    try:
        # The one connection every cursor of the app shares: its SQL screen reads the cache and
        # nothing else (no files, network, extensions or settings), whatever the statement.
        lock_down(reader.con)
        if args.run is not None:
            reader.run(args.run)  # a clear error before the screen opens
        from dissect_tui.tui.images import prepare_graphics

        image_cls = prepare_graphics(args.graphics)  # terminal probing must precede the app
        from dissect_tui.tui.app import BrowserApp

        app = BrowserApp(reader, run_id=args.run, graphics=args.graphics, image_cls=image_cls)
        app.run()
    finally:
        reader.close()
    if app.return_code not in (None, 0):
        return int(app.return_code)
    return 0
