"""What the browser's Pilot tests share."""

from __future__ import annotations

import asyncio


async def settle(app, pilot, rounds: int = 3) -> None:
    """Let workers finish and their results reach the screen.

    A worker that fails is not an error here: the app reports it (a toast, or exit 2 for the load),
    and the tests check what the app shows. Waiting through ``wait_for_complete`` would re-raise
    the failure whenever the worker is still registered when the wait starts, which depends on
    the machine's speed (a CI flake).
    """
    for _ in range(rounds):
        await asyncio.gather(*(worker.wait() for worker in list(app.workers)), return_exceptions=True)
        await pilot.pause()
