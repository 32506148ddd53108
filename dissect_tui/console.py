"""Terminal output for the long-running commands: rich progress bars and summaries on stderr.

Implements indexer.ProgressSink; stdout stays free for what scripts consume (the cache path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from dissect_tui.text import printable

if TYPE_CHECKING:
    from dissect_tui.indexer import IndexResult

stderr = Console(stderr=True)


def output_console(stderr: bool = False) -> Console:
    """A console for results: the terminal's width on a terminal; redirected, lines as long as they
    need, so no number or name is cut or wrapped mid-word in a file or a pipe."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=100_000, soft_wrap=True)


def plain(value: object) -> Text:
    """Untrusted text (paths, labels, layer names) as a Text: never markup, no control characters."""
    return Text(printable(value))


class _Rate(TextColumn):
    """items/s of a task, with its unit."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "items")
        return Text(f"{speed:,.0f} {unit}/s" if speed else "")


class RichProgress:
    """One bar per stage; `quiet` keeps only warnings."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=stderr,
            disable=quiet,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._live = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._progress.stop()

    def start(self, stage: str, total: int | None, unit: str = "items") -> None:
        # The live display starts with the first stage: started earlier, a run that fails during
        # validation would print an empty display (a blank line) before its one-line error.
        if not self._live:
            self._progress.start()
            self._live = True
        self._tasks[stage] = self._progress.add_task(stage, total=total, unit=unit)

    def advance(self, stage: str, n: int = 1) -> None:
        if stage in self._tasks:
            self._progress.advance(self._tasks[stage], n)

    def update(self, stage: str, done: int, total: int | None) -> None:
        if stage in self._tasks:
            self._progress.update(self._tasks[stage], completed=done, total=total)

    def finish(self, stage: str) -> None:
        if stage in self._tasks:
            task = self._tasks[stage]
            total = self._progress.tasks[task].total
            if total is not None:
                self._progress.update(task, completed=total)
            self._progress.stop_task(task)

    def note(self, message: str) -> None:
        if not self.quiet:
            self._progress.console.print(Text("note: ", style="yellow") + plain(message), soft_wrap=True)


def print_summary(result: IndexResult, quiet: bool = False) -> None:
    """The run's table of layers, time per stage and (for index) the image counts, on stderr.

    Notes are not repeated: they were shown as they happened."""
    if quiet:
        return
    out = output_console(stderr=True)
    table = Table(title=plain(f"run {result.run_id}: {result.path}"), title_justify="left")
    table.add_column("layer")
    table.add_column("neurons", justify="right")
    table.add_column("interpretable", justify="right")
    table.add_column("most common labels")
    for s in result.layers:
        share = 100.0 * s.n_interpretable / s.n_units if s.n_units else 0.0
        labels = ", ".join(f"{label} ({count})" for label, count in s.common_labels)
        table.add_row(
            plain(s.layer), f"{s.n_units:,}", f"{s.n_interpretable:,} ({share:.0f}%)", plain(labels)
        )
    out.print(table)
    rates = result.stage_rates()
    stages = ", ".join(
        f"{k} {v:.1f}s" + (f" ({rates[k]})" if k in rates else "") for k, v in result.stage_seconds.items()
    )
    total = sum(result.stage_seconds.values())
    out.print(Text(f"time per stage: {stages}; total {total:.1f}s"), highlight=False, soft_wrap=True)
    if result.kind != "index":
        return
    ok = result.n_images - result.n_failed
    out.print(Text(f"images: {ok:,} decoded, {result.n_failed:,} skipped"), soft_wrap=True)
    for path, error in result.failed_examples:
        out.print(Text("  skipped ") + plain(path) + Text(": ") + plain(error), soft_wrap=True)
    if result.n_failed > len(result.failed_examples):
        out.print(Text("  (all skipped images: SELECT path, error FROM images WHERE NOT ok)"), soft_wrap=True)
