"""Text charts for the detail screen: a bar chart of concept scores and an activation histogram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.text import Text

from dissect_tui.text import printable

BLOCKS = " ▁▂▃▄▅▆▇█"


def bar_chart(items: Sequence[tuple[str, float]], width: int = 40, highlight: str | None = None) -> Text:
    """One line per (text, score): name, a bar scaled between min(0, lowest) and the best, value."""
    out = Text()
    if not items:
        return Text("no concepts stored", style="dim")
    scores = np.array([s for _, s in items], dtype=np.float64)
    lo, hi = min(0.0, float(scores.min())), float(scores.max())
    span = hi - lo or 1.0
    names = [printable(t) for t, _ in items]  # concept texts come from the cache: shown inert
    name_w = min(max(len(t) for t in names), max(8, width // 2))
    bar_w = max(4, width - name_w - 10)
    for i, (text, score) in enumerate(items):
        shown = names[i]
        name = shown if len(shown) <= name_w else shown[: name_w - 1] + "…"
        n = (score - lo) / span * bar_w
        full = int(n)
        bar = "█" * full + (BLOCKS[int((n - full) * 8)] if full < bar_w else "")
        style = (
            "bold" if (highlight is not None and text == highlight) or (highlight is None and i == 0) else ""
        )
        out.append(f"{name:<{name_w}} ", style=style)
        out.append(f"{bar:<{bar_w}}", style="cyan")
        out.append(f" {score:>7.3f}\n")
    out.rstrip()
    return out


def histogram(values: np.ndarray, width: int = 48, height: int = 6) -> Text:
    """Vertical-bar histogram (log-scaled counts) with min/max and the top-1% threshold marked."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Text("no activations stored", style="dim")
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        hi = lo + 1.0
    counts, _ = np.histogram(values, bins=width, range=(lo, hi))
    scaled = np.log1p(counts) / np.log1p(counts.max()) * height
    out = Text()
    for level in range(height, 0, -1):
        row = "".join(
            BLOCKS[8] if s >= level else (BLOCKS[int((s - level + 1) * 8)] if s > level - 1 else " ")
            for s in scaled
        )
        out.append(row + "\n", style="magenta")
    p99 = float(np.quantile(values, 0.99))
    mark = int((p99 - lo) / (hi - lo) * (width - 1))
    label = "top 1% ^" if mark > width - 9 else "^ top 1%"
    out.append(" " * (mark - 7 if mark > width - 9 else mark) + label + "\n", style="dim")
    left, right = f"{lo:.3g}", f"{hi:.3g}"
    out.append(left + " " * max(1, width - len(left) - len(right)) + right + "\n")
    out.append(f"{len(values):,} images · mean {values.mean():.3g} · p99 {p99:.3g} (log count)", style="dim")
    return out
