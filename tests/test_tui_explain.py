"""Pilot tests of the CLIP features: two-concept search and a neuron's two-concept explanation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pilot_helpers import settle
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


async def test_two_concept_search_ranks_all_neurons(clip_cache):
    app = BrowserApp(open_cache(clip_cache))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot, rounds=4)
        await pilot.press("2", *"red", "enter", *"car", "enter")
        await settle(app, pilot, rounds=4)
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
        await settle(app, pilot, rounds=4)
        assert scr.session.model.query is not None and scr.session.model.query.title == "zebra stripes"
    assert app.session.sidecar is not None and "zebra stripes" in app.session.sidecar.recent_queries()


async def test_compose_from_a_neuron_is_saved_for_the_next_session(clip_cache):
    app = BrowserApp(open_cache(clip_cache))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot, rounds=4)
        await pilot.press("enter")
        await settle(app, pilot, rounds=4)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("c")
        await settle(app, pilot, rounds=4)
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
        await settle(app, pilot, rounds=4)
        await pilot.press("enter")
        await settle(app, pilot, rounds=4)
        assert best_pair in str(app.screen.query_one("#composition").render())


async def test_a_moved_clip_is_found_with_the_clip_option(tmp_path):
    """A cache built on a GPU box, browsed on a laptop: the run's CLIP path does not exist here."""
    import shutil

    import duckdb
    from tiny_clip import make_tiny_clip

    from dissect_tui.clip_backend import load_clip

    path, tiny = make_clip_cache(tmp_path / "box")
    key = load_clip(tiny.spec).key  # the run records its CLIP's identity, as a real index does
    con = duckdb.connect(str(path))
    try:
        con.execute("UPDATE runs SET clip_key = ?", [key])
        con.execute("UPDATE concept_embeddings SET clip_key = ?", [key])
    finally:
        con.close()
    here = tmp_path / "laptop"
    here.mkdir()
    config = Path(shutil.move(tiny.config_path, here / tiny.config_path.name))
    weights = Path(shutil.move(tiny.checkpoint_path, here / "renamed.pt"))

    app = BrowserApp(open_cache(path))  # no --clip: one line that says what to do
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(app, pilot, rounds=4)
        await pilot.press("c", *"red car", "enter")
        await settle(app, pilot, rounds=4)
        scr = app.screen
        assert scr.session.model.query is None and scr.mode == "text"
        [warning] = [n.message for n in app._notifications if n.severity == "warning"]
        assert "--clip" in warning and "\n" not in warning

    app = BrowserApp(open_cache(path), clip=f"{config}:{weights}")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot, rounds=4)
        await pilot.press("c", *"red car", "enter")
        await settle(app, pilot, rounds=4)
        q = app.screen.session.model.query
        assert q is not None and q.title == "red car" and np.isfinite(q.scores).all()

    other = make_tiny_clip(tmp_path / "other", seed=1)  # same architecture, other weights
    app = BrowserApp(open_cache(path), clip=other.spec)
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(app, pilot, rounds=4)
        await pilot.press("c", *"red car", "enter")
        await settle(app, pilot, rounds=4)
        assert app.screen.session.model.query is None  # wrong numbers are refused
        [warning] = [n.message for n in app._notifications if n.severity == "warning"]
        assert "is not this run's CLIP" in warning


def test_same_text_tower_compares_model_and_weights_not_paths():
    from dissect_tui.explain import same_text_tower

    a = "tiny@x:clip.pt#1234-abcdef"
    assert same_text_tower(a, a)
    assert same_text_tower("tiny@x:renamed.pt#1234-abcdef", a)  # moved and renamed copy
    assert not same_text_tower("tiny@x:clip.pt#1234-000000", a)  # other weights
    assert not same_text_tower("other@x:clip.pt#1234-abcdef", a)  # other model
    assert not same_text_tower("ViT-B-16:openai", "ViT-B-16:laion2b")
