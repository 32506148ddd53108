"""Snapshot tests (pytest-textual-snapshot) of the main and detail screens at 80×24 and 120×40.

Deterministic: a seeded synthetic cache, the sidecar in a fresh folder, thumbnails drawn as
half-cell blocks from the cache's fixed JPEG bytes. Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import pytest
from cache_factory import make_cache

from dissect_tui.store.reader import open_cache
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.images import prepare_graphics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("snap") / "tiny.duckdb")


def _app(cache, graphics: str) -> BrowserApp:
    # The colour system is fixed: detected from $TERM it would pick the 16-colour theme on TERM=xterm.
    return BrowserApp(
        open_cache(cache), graphics=graphics, image_cls=prepare_graphics(graphics), color_system="truecolor"
    )


async def _loaded(pilot) -> None:
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def _detail(pilot) -> None:
    await _loaded(pilot)
    await pilot.press("down", "enter")
    await _loaded(pilot)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_main_screen(snap_compare, cache, size):
    assert snap_compare(_app(cache, "none"), terminal_size=size, run_before=_loaded)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_detail_screen(snap_compare, cache, size):
    assert snap_compare(_app(cache, "halfcell"), terminal_size=size, run_before=_detail)
