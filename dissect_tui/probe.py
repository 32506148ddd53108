"""Probe image sets: folders, list files, CIFAR-100, synthetic images; robust decoding; loader.

``--probe`` specs (repeatable; the union is taken in the order given):

- ``path/to/folder``: every image below it (recursive; jpg jpeg jfif png bmp gif tif tiff webp
  ppm pgm pbm pnm, any case), sorted by relative path; hidden files and folders are skipped.
- ``path/to/image.jpg``: that one image.
- ``path/to/list.txt``: one image path per line, relative paths relative to the list file;
  blank and ``#`` lines are ignored. Missing files stay in the set and count as failed images.
- ``cifar100`` (train, 50,000) / ``cifar100-test`` (10,000): torchvision downloads
  ``cifar-100-python.tar.gz`` into the cache dir (or finds it there); ``cifar100:DIR`` /
  ``cifar100-test:DIR`` read an extracted ``cifar-100-python`` folder (or the .tar.gz) instead.
- ``synthetic:N``: N deterministic generated 500x375 / 375x500 pictures (smooth colour fields and
  shapes); image i is the same for every N. For offline smoke runs and benchmarks only.

Image ids are 0..N-1 in that order. The same file named twice (same resolved path, also across
specs) is kept once, at its first position; ``ProbeSet.notes`` says how many were dropped.

Decoding (``ProbeSet.open``) always gives RGB: transparency (RGBA, LA, P with a transparent
colour) is composited on white; 16-bit and 32-bit greyscale are scaled to 8 bits by their bit
depth; CMYK, 1-bit, YCbCr convert as Pillow does; the EXIF orientation is applied; animated files
give their first frame. JPEGs larger than needed are decoded at a reduced scale (``draft``, DCT
scaling, the shorter side stays >= ``DECODE_MIN_SIDE``).

The work per image is bounded from its header, before a pixel is decoded, so a probe folder
cannot exhaust memory: aspect ratios beyond 1:``MAX_ASPECT`` (a resize of the short side would
blow up the long one), JPEG headers that claim more pixels than the file's bytes can hold
(forged or truncated), other formats above ``MAX_PIXELS`` (or Pillow's own
``Image.MAX_IMAGE_PIXELS`` where lower; never changed here) and decodes that do not match their
header are refused as bad images. Only regular files are opened (a FIFO would block, a device
never end). Corrupt, truncated, empty or non-image files raise ``BadImage``; ``iter_batches``
turns those into failed rows.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

from dissect_tui.compat import extract_tar, one_intraop_thread
from dissect_tui.errors import OfflineError, UserError
from dissect_tui.network import can_reach
from dissect_tui.userfiles import FileTooLarge, NotRegularFile, non_regular_kind, open_regular, read_regular

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)
DECODE_MIN_SIDE = 512  # JPEG draft keeps the shorter side at least this long (>= 2x a 224 crop)
MAX_PIXELS = 100_000_000  # decoded pixels above this are refused (~300 MB RGB)
MAX_ASPECT = 64  # long side / short side: beyond this, a short-side resize explodes the long side
# A JPEG needs well over 1 bit per 8x8 block even for a flat colour (Huffman-coded DC and EOB,
# measured at most 255 pixels per byte); 8x that margin still catches forged headers.
JPEG_MAX_PIXELS_PER_BYTE = 2048
JPEG_MAGIC = b"\xff\xd8\xff"
CIFAR_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_FOLDER = "cifar-100-python"
SYNTHETIC_MAX = 10_000_000
MAX_LIST_BYTES = 1 << 30  # a probe list file (10M paths of 100 bytes)
_WHITE = (255, 255, 255)


def _brief(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line: library messages can span paragraphs."""
    text = " ".join(str(exc).split()) or "no details"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class BadImage(UserError):
    """One probe image could not be decoded; the run goes on and counts it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProbeItem:
    image_id: int
    path: str  # absolute file path, "cifar100-train/00042", or "synthetic/000007"
    source: str  # the --probe spec it came from


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive items of one kind, so open() needs no per-item bookkeeping."""

    start: int
    kind: str  # "file" | "cifar" | "synthetic"
    cifar_file: str = ""  # the pickled train/test file
    keys: tuple[int, ...] = ()  # cifar row / synthetic seed per item


class ProbeSet(Sequence[ProbeItem]):
    """The union of the probe specs, in order; ``open(i)`` decodes image i to RGB."""

    def __init__(
        self, specs: Sequence[str], items: list[ProbeItem], segments: list[_Segment], notes: list[str]
    ):
        self.specs = list(specs)
        self.items = items
        self.notes = notes  # human-readable lines for the CLI (duplicates dropped, missing files)
        self._segments = segments
        self._starts = [s.start for s in segments]
        self._cifar: dict[str, np.ndarray] = {}  # loaded lazily, per process

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cifar"] = {}  # each DataLoader worker reloads; never ship 150 MB through a pipe
        return state

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> ProbeItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[ProbeItem]: ...
    def __getitem__(self, index: int | slice) -> ProbeItem | list[ProbeItem]:
        return self.items[index]

    def segment(self, index: int) -> tuple[_Segment, int]:
        seg = self._segments[bisect.bisect_right(self._starts, index) - 1]
        return seg, index - seg.start

    def open(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image; raises BadImage(reason)."""
        return self.open_with_size(index)[0]

    def open_with_size(self, index: int) -> tuple[Image.Image, tuple[int, int]]:
        """(RGB image, original (width, height)); reduced-scale decodes report the file's size."""
        item = self.items[index]
        seg, offset = self.segment(index)
        if seg.kind == "synthetic":
            img = synthetic_image(seg.keys[offset])
            return img, img.size
        if seg.kind == "cifar":
            rows = self._cifar.get(seg.cifar_file)
            if rows is None:
                rows = self._cifar[seg.cifar_file] = _load_cifar_rows(seg.cifar_file)
            img = Image.fromarray(rows[seg.keys[offset]])
            return img, img.size
        return decode_file(item.path)


# ---------------------------------------------------------------- decoding


def decode_file(
    path: str, min_side: int = DECODE_MIN_SIDE, max_pixels: int = MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one file robustly to RGB: (image, original (width, height)); raises BadImage.

    The work per file is bounded before any pixel is decoded (see ``check_image_header``): JPEGs
    are opened without Pillow's global decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` is
    never changed) and decoded at reduced scale; other formats keep Pillow's limit and ours.
    """
    try:
        fh = open_regular(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except NotRegularFile as exc:
        raise BadImage(f"not a regular file: {exc.kind}") from None
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or _brief(exc)}") from None
    with fh:
        size_bytes = os.fstat(fh.fileno()).st_size
        if size_bytes == 0:
            raise BadImage("empty file (0 bytes)")
        try:
            is_jpeg = fh.read(len(JPEG_MAGIC)) == JPEG_MAGIC
            fh.seek(0)
            # JpegImageFile directly: Image.open would apply Pillow's process-wide bomb limit,
            # which refuses huge JPEGs before draft() could shrink them.
            im = JpegImagePlugin.JpegImageFile(fh) if is_jpeg else Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise BadImage(f"image too large to decode safely: {_brief(exc)}") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image, or a format Pillow cannot read") from None
        except MemoryError:
            raise BadImage("out of memory while decoding") from None
        except Exception as exc:  # broken headers
            raise BadImage(f"corrupt or truncated image: {_brief(exc)}") from None
        with im:
            width, height = im.size
            check_image_header(width, height, im.format or "?", size_bytes, max_pixels=max_pixels)
            try:
                if im.format == "JPEG" and min(width, height) >= 2 * min_side:
                    im.draft("RGB" if im.mode == "RGB" else im.mode, (min_side, min_side))
                expected = im.size
                if expected[0] * expected[1] > max_pixels:  # JPEGs: after the reduced-scale draft
                    raise BadImage(
                        f"image too large to decode safely: {width}x{height} {im.format} "
                        f"({expected[0] * expected[1] / 1e6:.0f} MP decoded > {max_pixels / 1e6:.0f} MP)"
                    )
                im.load()
                if im.size != expected:
                    raise BadImage(f"decoded size {im.size[0]}x{im.size[1]} differs from the header's")
                rgb = to_rgb(im)
            except BadImage:
                raise
            except MemoryError:
                raise BadImage("out of memory while decoding") from None
            except Exception as exc:  # truncated data, decoder errors
                raise BadImage(f"corrupt or truncated image: {_brief(exc)}") from None
            keeps_axes = _orientation_keeps_axes(rgb, im)
    return rgb, (width, height) if keeps_axes else (height, width)


def pixel_limit(max_pixels: int = MAX_PIXELS) -> int:
    """Our limit, or Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` where that is lower."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, int(pillow)) if pillow else max_pixels


def check_image_header(
    width: int, height: int, fmt: str, size_bytes: int, *, max_pixels: int = MAX_PIXELS
) -> None:
    """Refuse (BadImage) an image whose header promises more work than a probe image may cost.

    - an aspect ratio beyond 1:MAX_ASPECT: resizing the short side to a model's input size
      would blow the long side up (a 20000x1 PNG is 100 bytes and 6 GB after Resize(256));
    - a JPEG whose header claims far more pixels than its bytes can hold (a forged 60000x60000
      header on a 3 kB file decodes as a grey 7500x7500 image, 170 MB);
    - other formats above ``pixel_limit(max_pixels)`` pixels (JPEGs are decoded at reduced scale
      and must stay under ``max_pixels`` after that; ``decode_file`` checks it).
    """
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise BadImage(
            f"extreme aspect ratio {width}x{height} (more than 1:{MAX_ASPECT}); resizing it would "
            "cost far more memory than the image holds"
        )
    pixels = width * height
    if fmt == "JPEG":
        if pixels > size_bytes * JPEG_MAX_PIXELS_PER_BYTE:
            raise BadImage(
                f"JPEG header claims {width}x{height} pixels but the file has only {size_bytes:,} bytes "
                "(forged or truncated header)"
            )
    elif pixels > pixel_limit(max_pixels):
        limit = pixel_limit(max_pixels)
        raise BadImage(
            f"image too large to decode safely: {width}x{height} {fmt} "
            f"({pixels / 1e6:.0f} MP > {limit / 1e6:.0f} MP)"
        )


def _orientation_keeps_axes(rgb: Image.Image, decoded: Image.Image) -> bool:
    return (rgb.width >= rgb.height) == (decoded.width >= decoded.height)


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        if im.getexif().get(0x0112, 1) in (1, None):  # no rotation: skip exif_transpose's copy
            return im
        return ImageOps.exif_transpose(im) or im
    except Exception:  # malformed EXIF must not cost the image
        return im


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """I;16*, I and F greyscale -> L, scaled by bit depth (Pillow's convert would clip)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = arr.astype(np.float32) / 257.0
    elif im.mode == "F":
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        out = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    else:  # "I": 32-bit ints, usually 16-bit data
        hi = int(arr.max()) if arr.size else 0
        lo = int(arr.min()) if arr.size else 0
        if lo >= 0 and hi <= 255:
            out = arr.astype(np.float32)
        elif lo >= 0 and hi <= 65535:
            out = arr.astype(np.float32) / 257.0
        else:
            out = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    im = _exif_transpose(im)
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(im).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...
    except (ValueError, OSError) as exc:
        raise BadImage(f"unsupported colour mode {mode}: {_brief(exc)}") from None


def make_thumbnail(img: Image.Image, px: int) -> bytes:
    """A small JPEG (longest side px) from an already decoded RGB image."""
    thumb = img.copy()
    thumb.thumbnail((px, px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ---------------------------------------------------------------- synthetic images


def synthetic_image(seed: int) -> Image.Image:
    """Deterministic picture for seed: a smooth random colour field with a few shapes."""
    rng = np.random.default_rng(seed)
    size = (500, 375) if rng.random() < 0.7 else (375, 500)
    coarse = rng.integers(0, 256, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 6))):
        x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    return img


# ---------------------------------------------------------------- CIFAR-100


def _load_cifar_rows(path: str) -> np.ndarray:
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    return np.ascontiguousarray(
        np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )


def _cifar_folder_from(path: Path, cache_dir: Path) -> Path:
    """A user-given cifar location: the cifar-100-python folder, its parent, or the .tar.gz."""
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        target = cache_dir / CIFAR_FOLDER
        if not (target / "meta").exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            try:
                with tarfile.open(path, "r:gz") as tar:
                    extract_tar(tar, cache_dir)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise UserError(f"cannot extract {path}: {_brief(exc)}") from exc
        path = target
    if (path / CIFAR_FOLDER).is_dir():
        path = path / CIFAR_FOLDER
    if not path.is_dir():
        raise UserError(f"CIFAR-100 folder not found: {path} (expected an extracted {CIFAR_FOLDER} folder)")
    return path


def _ensure_cifar(cache_dir: Path) -> Path:
    """cache_dir/cifar-100-python, downloaded by torchvision when absent; offline -> OfflineError."""
    folder = cache_dir / CIFAR_FOLDER
    if all((folder / name).is_file() for name in ("train", "test", "meta")):
        return folder
    from torchvision.datasets import CIFAR100

    archive = cache_dir / CIFAR_ARCHIVE

    def offline(reason: object) -> OfflineError:
        state = " (the copy there is incomplete or corrupt)" if archive.exists() else ""
        return OfflineError(
            f"could not download {CIFAR_ARCHIVE} from {CIFAR_URL}: {reason}. "
            f"Put {CIFAR_ARCHIVE} in {cache_dir}{state}, or pass --probe cifar100:/path/to/{CIFAR_FOLDER}"
        )

    host = urllib.parse.urlparse(CIFAR_URL).hostname
    if host and not archive.exists() and not can_reach(host):
        raise offline(f"{host} cannot be reached")  # before torchvision prints "Downloading ..."
    try:
        # torchvision reuses cache_dir/cifar-100-python.tar.gz when it is there and intact
        CIFAR100(root=str(cache_dir), train=False, download=True)
    except (OSError, RuntimeError) as exc:  # URLError, socket errors; "not found or corrupted"
        raise offline(getattr(exc, "reason", None) or exc) from exc
    return folder


# ---------------------------------------------------------------- resolving specs


def _scan_folder(root: Path) -> list[str]:
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort()
    return [full for _, full in found]


def _read_list_file(path: Path) -> tuple[list[str], int]:
    try:
        data = read_regular(path, MAX_LIST_BYTES)
    except NotRegularFile as exc:
        raise UserError(f"probe {path} is {exc.kind}: give a folder, an image or a list file") from None
    except FileTooLarge as exc:
        raise UserError(f"probe list {exc}: split it, or give the folder instead") from None
    except OSError as exc:
        raise UserError(f"cannot read probe list {path}: {_brief(exc)}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(
            f"probe {path} is neither a folder, an image, nor a text file listing images"
        ) from None
    base = path.parent
    paths, missing = [], 0
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            raise UserError(f"probe list {path} line {number} holds a NUL byte: not a list of image paths")
        entry = Path(line).expanduser()
        full = entry if entry.is_absolute() else base / entry
        if not full.is_file():
            missing += 1
        paths.append(os.path.abspath(full))
    if not paths:
        raise UserError(f"probe list {path} names no images")
    return paths, missing


def _parse_synthetic(spec: str) -> int:
    count = spec.split(":", 1)[1].strip().replace("_", "")
    if not count.isdigit() or not 0 < int(count) <= SYNTHETIC_MAX:
        raise UserError(f"probe '{spec}': write synthetic:N with N between 1 and {SYNTHETIC_MAX:,}")
    return int(count)


def resolve_probe(specs: Sequence[str], cache_dir: Path) -> ProbeSet:
    """Resolve the --probe specs into one ordered, de-duplicated ProbeSet."""
    if not specs:
        raise UserError("no probe images: pass --probe with a folder, a list file, cifar100 or synthetic:N")
    cache_dir = Path(cache_dir).expanduser()
    items: list[ProbeItem] = []
    segments: list[_Segment] = []
    notes: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    cifar_rows: dict[str, np.ndarray] = {}  # read once here, reused by open() in this process

    def add(kind: str, spec: str, paths: list[str], keys: list[str], **seg: Any) -> None:
        nonlocal duplicates
        kept_paths, kept_keys = [], []
        for path, key in zip(paths, keys, strict=True):
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept_paths.append(path)
            kept_keys.append(key)
        if not kept_paths:
            return
        start = len(items)
        items.extend(ProbeItem(start + i, p, spec) for i, p in enumerate(kept_paths))
        if kind == "file":
            if not segments or segments[-1].kind != "file":
                segments.append(_Segment(start, "file"))
        else:
            rows = tuple(int(k.rsplit("/", 1)[1]) for k in kept_keys)
            segments.append(_Segment(start, kind, keys=rows, **seg))

    for raw in specs:
        spec = raw.strip()
        lower = spec.lower()
        head, _, tail = spec.partition(":")
        if head.lower() in ("cifar100", "cifar100-train", "cifar100-test"):
            split = "test" if head.lower().endswith("test") else "train"
            folder = (
                _cifar_folder_from(Path(tail).expanduser(), cache_dir) if tail else _ensure_cifar(cache_dir)
            )
            data_file = (folder / split).resolve()
            if not data_file.is_file():
                raise UserError(f"CIFAR-100 {split} file missing: {data_file}")
            if str(data_file) not in cifar_rows:
                try:
                    cifar_rows[str(data_file)] = _load_cifar_rows(str(data_file))
                except Exception as exc:
                    raise UserError(f"cannot read CIFAR-100 file {data_file}: {_brief(exc)}") from exc
            count = len(cifar_rows[str(data_file)])
            names = [f"cifar100-{split}/{i:05d}" for i in range(count)]
            keys = [f"cifar:{data_file}/{i}" for i in range(count)]
            add("cifar", spec, names, keys, cifar_file=str(data_file))
            continue
        if lower.startswith("synthetic:"):
            n = _parse_synthetic(spec)
            names = [f"synthetic/{i:06d}" for i in range(n)]
            add("synthetic", spec, names, [f"synthetic/{i}" for i in range(n)])
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            paths = _scan_folder(path)
            if not paths:
                exts = " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
                raise UserError(f"probe folder {spec} holds no images (looked for {exts}, recursively)")
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            paths = [str(path)]
        elif path.is_file():
            paths, missing = _read_list_file(path)
            if missing:
                notes.append(
                    f"probe list {spec}: {missing} listed file(s) do not exist; counted as failed images"
                )
        elif (kind := non_regular_kind(path)) is not None:
            raise UserError(f"probe '{spec}' is {kind}: give a folder, an image or a list file")
        else:
            raise UserError(
                f"probe '{spec}' not found: give a folder, an image, a list file, "
                "cifar100[-test][:DIR] or synthetic:N"
            )
        absolute = [os.path.abspath(p) for p in paths]
        add("file", spec, absolute, [os.path.realpath(p) for p in absolute])
    if duplicates:
        notes.append(f"{duplicates} duplicate probe image(s) (same file named twice) were kept once")
    if not items:
        raise UserError("the probe specs resolve to zero images")
    probe = ProbeSet(specs, items, segments, notes)
    probe._cifar.update(cifar_rows)
    return probe


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    indices: torch.Tensor  # [B] long, image ids (= positions in the ProbeSet)
    ok: torch.Tensor  # [B] bool; failed images carry zero tensors
    inputs: list[torch.Tensor]  # one [B,3,H,W] per transform, in the order given
    thumbnails: list[bytes | None] = field(default_factory=list)  # small JPEGs from the same decode
    sizes: list[tuple[int, int] | None] = field(default_factory=list)  # original (width, height)
    errors: list[str | None] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return Batch(
            self.indices.pin_memory(),
            self.ok.pin_memory(),
            [x.pin_memory() for x in self.inputs],
            self.thumbnails,
            self.sizes,
            self.errors,
        )


def transform_output_shape(
    transform: Callable[[Image.Image], torch.Tensor], position: int
) -> tuple[int, ...]:
    """The fixed output shape of a transform, probed on two dummy images of different aspect."""
    shapes = []
    for size in ((320, 240), (240, 320)):
        try:
            out = transform(Image.new("RGB", size, (128, 128, 128)))
        except Exception as exc:
            raise UserError(f"image transform #{position} failed on a dummy image: {_brief(exc)}") from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            raise UserError(f"image transform #{position} must return a [C,H,W] tensor")
        shapes.append(tuple(out.shape))
    if shapes[0] != shapes[1]:
        raise UserError(
            f"image transform #{position} gives different sizes for different images ({shapes[0]} vs "
            f"{shapes[1]}); it must crop or resize to a fixed size"
        )
    return shapes[0]


class ProbeDataset(torch.utils.data.Dataset):
    """Decode each image once; run every transform on that decode; make the thumbnail."""

    def __init__(
        self,
        probe: ProbeSet,
        transforms: Sequence[Callable],
        shapes: list[tuple[int, ...]],
        thumb_px: int,
        on_image: Callable[[], None] | None = None,
    ):
        self.probe = probe
        self.transforms = list(transforms)
        self.shapes = shapes
        self.thumb_px = thumb_px
        self.on_image = on_image  # in-process only: a callback does not cross to loader workers

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, index: int) -> ProbeRow:
        try:
            return self._decode(index)
        finally:
            if self.on_image is not None:
                self.on_image()

    def _decode(self, index: int) -> ProbeRow:
        size = None
        try:
            img, size = self.probe.open_with_size(index)
            tensors = [t(img) for t in self.transforms]
            for tensor, shape in zip(tensors, self.shapes, strict=True):
                if tuple(tensor.shape) != shape:
                    raise BadImage(f"transform gave {tuple(tensor.shape)}, expected {shape}")
            thumb = make_thumbnail(img, self.thumb_px) if self.thumb_px else None
            return ProbeRow(index, True, tensors, thumb, size, None)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, BadImage) else f"{_brief(exc)}"
            zeros = [torch.zeros(shape) for shape in self.shapes]
            return ProbeRow(index, False, zeros, None, size, reason)


class ProbeRow(NamedTuple):
    """One decoded image as ``ProbeDataset`` gives it (failed images: zero tensors and a reason)."""

    image_index: int  # (a field named index would hide tuple.index)
    ok: bool
    tensors: list[torch.Tensor]  # one per transform
    thumbnail: bytes | None
    size: tuple[int, int] | None  # original (width, height)
    error: str | None


def _collate(rows: list[ProbeRow]) -> Batch:
    return Batch(
        indices=torch.tensor([r.image_index for r in rows], dtype=torch.long),
        ok=torch.tensor([r.ok for r in rows], dtype=torch.bool),
        inputs=[torch.stack([r.tensors[t] for r in rows]) for t in range(len(rows[0].tensors))],
        thumbnails=[r.thumbnail for r in rows],
        sizes=[r.size for r in rows],  # (width, height) tuples already
        errors=[r.error for r in rows],
    )


def iter_batches(
    probe: ProbeSet,
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
    batch_size: int,
    workers: int,
    thumbnail_px: int = 96,
    start: int = 0,
    order: Sequence[int] | None = None,
    on_image: Callable[[], None] | None = None,
) -> Iterator[Batch]:
    """Batches of the images ``order`` (default: every image, in probe order) from position
    ``start`` on; workers=0 decodes in-process. Failed images give ok=False rows. A torchrun rank
    passes the images of its own batches as ``order`` (dissect_tui.distributed). ``on_image`` is
    called after each image decoded in-process (workers=0), so progress can move image by image."""
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    if workers < 0:
        raise UserError("workers must be 0 or more")
    shapes = [transform_output_shape(t, i) for i, t in enumerate(transforms)]
    dataset: torch.utils.data.Dataset = ProbeDataset(
        probe, transforms, shapes, thumbnail_px, on_image if workers == 0 else None
    )
    if start or order is not None:
        items = range(len(probe)) if order is None else order
        dataset = torch.utils.data.Subset(dataset, list(items)[start:])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
    )
    if workers > 0:
        yield from loader
        return
    # In-process: per-image tensor ops are too small for intra-op threads, which only contend
    # (several times slower on a busy machine). This thread alone runs on one thread while it
    # decodes; the caller's forward gets its threads back, and no other thread is touched.
    batches = iter(loader)
    while True:
        with one_intraop_thread():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
