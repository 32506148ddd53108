"""Pilot tests of the CLIP features: two-concept search and a neuron's two-concept explanation."""

from __future__ import annotations

import numpy as np
import pytest
from test_explain import make_clip_cache

from dissect_tui.store.reader import open_cache
from dissect_tui.tui.app import BrowserApp
from dissect_tui.tui.compose import ComposeScreen
from dissect_tui.tui.detail import DetailScreen
from dissect_tui.tui.main import MainScreen
from dissect_tui.tui.neuron_table import NeuronTable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    return make_clip_cache(tmp_path_factory.mktemp("tui-explain"))[0]


async def settle(app, pilot, rounds: int = 4) -> None:
    for _ in range(rounds):
        await app.workers.wait_for_complete()
        await pilot.pause()


async def test_two_concept_search_ranks_all_neurons(clip_cache):
    app = BrowserApp(open_cache(clip_cache))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("2", *"red", "enter", *"car", "enter")
        await settle(app, pilot)
        scr = app.screen
        assert isinstance(scr, MainScreen)
        q = scr.session.model.query
        assert q is not None and q.title == "red car" and list(q.extra) == ["red", "car"]
        # Same numbers as asking the explainer directly, and the table is ranked by them.
        want = app.session.explainer().query_scores(["red car", "red", "car"], scr.session.model.table)
        np.testing.assert_allclose(q.scores, want[:, 0])
        np.testing.assert_allclose(q.extra["car"], want[:, 2])
        rows = scr.query_one(NeuronTable).rows
        assert list(q.scores[rows]) == sorted(q.scores, reverse=True)
        assert "ranked by “red car”" in str(scr.query_one("#status").render())
        # Esc drops the ranking.
        await pilot.press("escape")
        assert scr.session.model.query is None and scr.session.sort == "layer"
        # The concept-query mode ranks by one free text.
        await pilot.press("c", *"zebra stripes", "enter")
        await settle(app, pilot)
        assert scr.session.model.query is not None and scr.session.model.query.title == "zebra stripes"
    assert app.session.sidecar is not None and "zebra stripes" in app.session.sidecar.recent_queries()


async def test_compose_from_a_neuron_is_saved_for_the_next_session(clip_cache):
    app = BrowserApp(open_cache(clip_cache))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("c")
        await settle(app, pilot)
        comp = app.screen
        assert isinstance(comp, ComposeScreen)
        assert comp.result is not None and comp.result[0] == 10 and len(comp.result[1]) == 90
        best_pair = comp.result[1][0][0]
        assert best_pair in str(comp.query_one("#c-pairs").render())
        await pilot.press("escape")
        await pilot.pause()
        det = app.screen
        assert isinstance(det, DetailScreen)
        assert best_pair in str(det.query_one("#composition").render())
    app = BrowserApp(open_cache(clip_cache))  # next session: the result comes from the sidecar
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        assert best_pair in str(app.screen.query_one("#composition").render())
