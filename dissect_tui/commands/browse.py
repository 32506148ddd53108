"""`dissect-tui browse [DB | MODEL]`: the terminal explorer over a cache."""

from __future__ import annotations

import argparse
import os
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
    p.add_argument(
        "--clip",
        metavar="NAME:PATH",
        help="where this run's CLIP weights are on this machine, if they moved since indexing (concept "
        "queries, two-concept explanations); must be the same weights",
    )
    p.set_defaults(func=run)


def _choose(caches: list, folder) -> str | None:
    """Which cache to open: a list to choose from on a terminal (None: the user left)."""
    from dissect_tui.errors import UserError

    if len(caches) == 1:
        return str(caches[0])
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(f"several caches in {folder}/: name one, e.g. `dissect-tui browse {caches[0]}`")
    from dissect_tui.tui.picker import CachePicker

    chosen = CachePicker(list(caches), folder).run()
    return None if chosen is None else str(chosen)


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
        chosen = _choose(caches, cache_dir)
        if chosen is None:
            return 0
        path = Path(chosen)
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

        app = BrowserApp(reader, run_id=args.run, graphics=args.graphics, image_cls=image_cls, clip=args.clip)
        app.run()
    finally:
        reader.close()
    code = int(app.return_code or 0)
    if app.session.clip_loaded:
        # Python's teardown of torch and open_clip after a concept query takes ~3 s; the app has
        # ended, the cache is closed and the sidecar commits each change, so nothing is left to do.
        from dissect_tui import filesafety

        filesafety.release_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
