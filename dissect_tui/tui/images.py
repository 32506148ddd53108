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

    DEFAULT_CSS = """
    Thumb { height: auto; width: 1fr; padding: 0 1 0 0; }
    Thumb > .thumb-image { height: 6; width: 100%; }
    Thumb > .thumb-missing { height: 6; width: 100%; content-align: center middle; background: $panel; color: $text-muted; }
    Thumb > .thumb-caption { height: 2; width: 100%; color: $text-muted; }
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
        return self._image_cls(pic, classes="thumb-image")
