"""Small, fast fixtures other tests import: a tiny CNN (also as a factory file) and image trees.

Import as ``from tiny_models import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import inspect
import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T


class TinyCNN(nn.Module):
    """conv1 -> layer1 -> layer2 -> pool -> fc; a few thousand parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layer2(self.layer1(self.conv1(x))))))


def tiny_preprocess(size: int = 32) -> T.Compose:
    """Picklable preprocess giving [3, size, size]."""
    return T.Compose([T.Resize(size + 8), T.CenterCrop(size), T.ToTensor()])


def tiny_cnn(num_classes: int = 10, seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(num_classes).eval()


_FACTORY_TEMPLATE = '''\
"""Written by tests/tiny_models.py: a tiny CNN factory for dissect-tui tests."""
import torch
from torch import nn
from torchvision import transforms as T


{cls}

def build():
    return TinyCNN()


def build_with_preprocess():
    preprocess = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor()])
    return TinyCNN(), preprocess


def build_raises():
    raise ValueError("factory exploded")


def build_wrong_type():
    return {{"not": "a model"}}


NOT_CALLABLE = 3
'''


def write_tiny_cnn_factory(tmp_path: Path, name: str = "tiny_cnn.py", factory: str = "build") -> str:
    """Write a factory file into tmp_path; returns the spec "path/file.py:factory".

    The file also defines build_with_preprocess (returns (model, preprocess)), build_raises,
    build_wrong_type and NOT_CALLABLE for error tests.
    """
    source = _FACTORY_TEMPLATE.format(cls=textwrap.dedent(inspect.getsource(TinyCNN)))
    path = Path(tmp_path) / name
    path.write_text(source, encoding="utf-8")
    return f"{path}:{factory}"


# Broken files make_image_tree adds under broken/ (relative paths); all count as failed images.
BROKEN_FILES = ("broken/corrupt.jpg", "broken/empty.png", "broken/notes.jpg", "broken/truncated.jpg")


def _picture(i: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic, visibly different RGB picture for each i."""
    rng = np.random.default_rng(1000 + i)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    arr = np.stack([(xx * (c + 1) * 3 + yy * (i % 7 + 1) + base[c]) % 256 for c in range(3)], axis=-1)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, size=3)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _save_variant(img: Image.Image, i: int, path_no_ext: Path) -> Path:
    """Cycle through formats and colour modes."""
    kind = i % 10
    if kind == 0:
        out, im, fmt = path_no_ext.with_suffix(".jpg"), img, "JPEG"
    elif kind == 1:
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        out, im, fmt = path_no_ext.with_suffix(".png"), rgba, "PNG"
    elif kind == 2:
        out, im, fmt = path_no_ext.with_suffix(".png"), img.convert("L"), "PNG"
    elif kind == 3:
        out, im, fmt = path_no_ext.with_suffix(".bmp"), img, "BMP"
    elif kind == 4:
        out, im, fmt = path_no_ext.with_suffix(".gif"), img.convert("P"), "GIF"
    elif kind == 5:
        out, im, fmt = path_no_ext.with_suffix(".webp"), img, "WEBP"
    elif kind == 6:
        out, im, fmt = path_no_ext.with_suffix(".tif"), img.convert("CMYK"), "TIFF"
    elif kind == 7:
        out, im, fmt = path_no_ext.with_suffix(".JPG"), img, "JPEG"  # upper-case extension
    elif kind == 8:
        arr16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        out, im, fmt = path_no_ext.with_suffix(".png"), Image.fromarray(arr16), "PNG"
    else:
        out, im, fmt = path_no_ext.with_suffix(".ppm"), img, "PPM"
    im.save(out, format=fmt)
    return out


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image_tree(tmp_path: Path, n: int, broken: bool = True) -> Path:
    """n small valid images (24-120 px, varied formats/modes) in nested folders under
    tmp_path/images, plus (broken=True) the files in BROKEN_FILES and a non-image readme.txt.
    Returns the root folder. Sorted relative paths give a stable order.
    """
    root = Path(tmp_path) / "images"
    folders = [root, root / "a", root / "a" / "b", root / "c"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (24 + (i * 37) % 97, 24 + (i * 53) % 89)
        _save_variant(_picture(i, size), i, folders[i % len(folders)] / f"img_{i:04d}")
    (root / "readme.txt").write_text("not an image and not an image extension\n")
    if broken:
        (root / "broken").mkdir(exist_ok=True)
        rng = np.random.default_rng(7)
        (root / "broken" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(600))
        (root / "broken" / "empty.png").write_bytes(b"")
        (root / "broken" / "notes.jpg").write_text("this is a text file with a .jpg name\n")
        data = jpeg_bytes(_picture(999, (160, 120)))
        (root / "broken" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return root
