"""How the pipeline reports: a small progress protocol and a per-stage clock. No UI here.

``console.RichProgress`` implements :class:`ProgressSink` for the terminal; library callers pass
nothing and get :class:`NullProgress`. Notes are shown live, once, and also kept in the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressSink(Protocol):
    def start(self, stage: str, total: int | None, unit: str = "items") -> None: ...
    def advance(self, stage: str, n: int = 1) -> None: ...
    def update(self, stage: str, done: int, total: int | None) -> None: ...
    def finish(self, stage: str) -> None: ...
    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, stage: str, total: int | None, unit: str = "items") -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        pass

    def update(self, stage: str, done: int, total: int | None) -> None:
        pass

    def finish(self, stage: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class StageClock:
    """Seconds per stage (a stage may be entered several times) and the run's notes."""

    def __init__(self, progress: ProgressSink) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.notes: list[str] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def note(self, message: str | None) -> None:
        """Show a note now and keep it for the result (None: nothing to say)."""
        if message:
            self.progress.note(message)
            self.notes.append(message)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
