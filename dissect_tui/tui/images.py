"""Thumbnails drawn with textual-image (half-cell blocks by default), or a text placeholder.

textual-image probes the terminal (Sixel / Kitty support, cell size) when it is first
imported, and that only works before Textual owns the terminal: ``prepare_graphics`` is
called by the `browse` command before the app starts; ``graphics="none"`` never imports it.
"""

from __future__ import annotations

import io
from typing import Any

from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

GRAPHICS = ("auto", "halfcell", "sixel", "kitty", "none")


def prepare_graphics(graphics: str) -> Any:
    """The textual-image widget class for a --graphics choice (None for 'none')."""
    if graphics == "none":
        return None
    import textual_image.widget as tiw  # probes the terminal once, before the app starts

    return {
        "auto": tiw.Image,
        "halfcell": tiw.HalfcellImage,
        "sixel": tiw.SixelImage,
        "kitty": tiw.TGPImage,
    }[graphics]


class Thumb(Vertical):
    """One image: the picture (or a placeholder) above a caption."""

    # Pictures at their natural size (the stored thumbnail's pixels over the terminal's cell size,
    # set per picture in _picture), never stretched to the column; the caption sets the minimum width.
    DEFAULT_CSS = """
    Thumb { height: auto; width: auto; min-width: 16; padding: 0 1 0 0; }
    Thumb > .thumb-missing { height: 5; width: 15; content-align: center middle; background: $panel; color: $text-muted; }
    Thumb > .thumb-caption { height: 2; width: 15; color: $text-muted; }
    """

    def __init__(self, jpeg: bytes | None, caption: str, image_cls: Any) -> None:
        super().__init__()
        self._jpeg = jpeg
        self._caption = caption  # shown as plain text; the caller made cache strings printable
        self._image_cls = image_cls

    def compose(self):
        yield self._picture()
        yield Static(self._caption, classes="thumb-caption", markup=False)

    def _picture(self) -> Widget:
        if self._jpeg is None:
            return Static("no thumbnail", classes="thumb-missing")
        if self._image_cls is None:
            return Static("▒ image ▒", classes="thumb-missing")
        try:
            from PIL import Image as PILImage

            pic = PILImage.open(io.BytesIO(self._jpeg))
            pic.load()
        except Exception:  # a corrupt blob must not take the screen down
            return Static("bad thumbnail", classes="thumb-missing")
        widget = self._image_cls(pic, classes="thumb-image")
        width, height = natural_cells(pic.width, pic.height)
        widget.styles.width, widget.styles.height = width, height
        return widget


MAX_CELLS = (24, 10)  # a larger stored thumbnail is shown scaled down to this many cells


def natural_cells(px_width: int, px_height: int) -> tuple[int, int]:
    """Terminal cells that show an image at its own pixel size (textual-image's cell size estimate),
    scaled down only when it would exceed MAX_CELLS."""
    try:
        from textual_image._terminal import get_cell_size

        cell = get_cell_size()
        cw, ch = cell.width or 10, cell.height or 20
    except Exception:  # no terminal to ask: the usual 10×20-pixel cell
        cw, ch = 10, 20
    w, h = px_width / cw, px_height / ch
    scale = min(1.0, MAX_CELLS[0] / w if w else 1.0, MAX_CELLS[1] / h if h else 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))
