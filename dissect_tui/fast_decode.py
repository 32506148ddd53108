"""Device-side JPEG decoding and preprocessing for the index's images stage (``--decode gpu``).

Loader workers only read file bytes (plus a cheap reduced-scale PIL decode for the thumbnail,
which also validates the file); the main process decodes each batch's JPEGs with
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA) and applies every preprocessing
as tensor ops on the device: resize with antialias, center crop, scale to [0, 1], normalize.

The tensor ops come from configuration (``map_transform``): the resize/crop/normalize parameters
that dissect-tui attaches to the transforms it builds (``with_tensor_ops``: targets'
``imagenet_preprocess``, open_clip's preprocessing config in clip_backend), torchvision's
classification presets (``weights.transforms()``, read through ``dissect_tui.compat``), and as a
last resort a ``T.Compose`` of Resize / CenterCrop / [convert RGB] / ToTensor / Normalize built
by a custom factory. Each mapping is checked against the PIL transform on test pictures.

Whatever the tensor path cannot do goes through the ordinary PIL path of ``dissect_tui.probe``
for that image or that transform, so no image is dropped and ok/error flags match
``--decode cpu``: unmappable transforms (custom callables), non-JPEG files, CIFAR / synthetic
items, JPEGs with an EXIF rotation (nvJPEG ignores EXIF), CMYK JPEGs on CUDA, huge JPEGs (the
PIL path decodes those at reduced scale), files that are not regular files, and any file the
device decoder rejects or decodes to another size than its header says. Headers are checked with
the PIL path's bounds (``probe.check_image_header``) before any device decode, and each batch is
decoded in pieces of at most ``DEVICE_DECODE_PIXELS`` pixels.

``--decode auto`` uses this path on CUDA, which has not yet run on a GPU in this project's
tests: there any error of the device path switches the rest of the run to the PIL loader with one
note (``iter_device_batches`` with ``plan.fallback``); ``--decode gpu`` fails with one line.

The same code runs with a CPU device (``decode_jpeg`` decodes CPU tensors too): the tests
compare that path against the PIL path; ``--decode gpu`` itself requires CUDA.
"""

from __future__ import annotations

import functools
import io
import os
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from PIL import Image, JpegImagePlugin

from dissect_tui import compat
from dissect_tui.errors import UserError
from dissect_tui.probe import (
    JPEG_MAGIC,
    MAX_PIXELS,
    BadImage,
    Batch,
    ProbeDataset,
    ProbeSet,
    check_image_header,
    iter_batches,
    make_thumbnail,
    to_rgb,
    transform_output_shape,
)
from dissect_tui.userfiles import open_regular

DECODE_MODES = ("auto", "cpu", "gpu")
TENSOR_MODE = "tensor"  # internal: the device path on any device (tests, bench --quick)
MAX_DEVICE_PIXELS = MAX_PIXELS // 4  # larger JPEGs take the PIL path (reduced-scale draft decode)
MAX_DEVICE_FILE_BYTES = 64 << 20  # larger files take the PIL path (never read whole into a worker)
DEVICE_DECODE_PIXELS = 64_000_000  # pixels decoded at once on the device (~190 MB uint8)
CHECK_TOLERANCE = 0.08  # max |tensor path - PIL path| accepted by the self-check (normalized units)
TENSOR_OPS_ATTR = "tensor_ops"  # attribute carrying a transform's resize/crop/normalize parameters
_DIRECT_MODES = frozenset({"RGB", "L"})  # JPEG colour modes decode_jpeg(mode=RGB) matches PIL on


# ---------------------------------------------------------------- transform mapping


@dataclass(frozen=True)
class TensorPreprocess:
    """A PIL eval transform replayed on uint8 [B,3,H,W] tensors: resize, crop, scale, normalize."""

    size: tuple[int, ...] | None  # as T.Resize takes it: (s,) shorter side, (h, w) exact; None: no resize
    interpolation: str  # "bilinear" | "bicubic"
    max_size: int | None
    crop: tuple[int, int] | None  # (h, w); None: no crop
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] (all one size) -> float32 [B,3,h,w] on the same device."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        x = images
        if self.size is not None:
            # uint8 in, uint8 out (rounded), as PIL resizes 8-bit images; antialias as PIL does
            x = F.resize(
                x, list(self.size), InterpolationMode(self.interpolation), self.max_size, antialias=True
            )
        if self.crop is not None:
            x = F.center_crop(x, list(self.crop))
        x = x.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            mean, std = _constants(self.mean, self.std, x.device)
            x = x.sub_(mean).div_(std)
        return x


@functools.cache
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as [1,3,1,1] on device, made once: a per-batch torch.tensor(..., device=cuda)
    would be a blocking host-to-device copy, i.e. a host sync per batch."""
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
        torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1),
    )


def _interp_name(mode: Any) -> str | None:
    from torchvision.transforms import InterpolationMode

    try:
        mode = InterpolationMode(mode) if not isinstance(mode, int) else None
    except ValueError:
        return None
    if mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        return mode.value
    return None


def _size_tuple(size: Any) -> tuple[int, ...] | None:
    if isinstance(size, int):
        return (size,)
    if isinstance(size, (list, tuple)) and len(size) in (1, 2) and all(isinstance(v, int) for v in size):
        return tuple(size)
    return None


def _crop_tuple(size: Any) -> tuple[int, int] | None:
    t = _size_tuple(size)
    if t is None:
        return None
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _triple(values: Any) -> tuple[float, float, float] | None:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == 3 else None


def _map_preset(t: Any) -> TensorPreprocess | None:
    """torchvision's classification preset (weights.transforms()): its configuration attributes."""
    size, crop = _size_tuple(t.resize_size), _crop_tuple(t.crop_size)
    interp = _interp_name(t.interpolation)
    mean, std = _triple(t.mean), _triple(t.std)
    if None in (size, crop, interp, mean, std) or getattr(t, "antialias", True) is False:
        return None
    return TensorPreprocess(size, interp, None, crop, mean, std)  # type: ignore[arg-type]


def with_tensor_ops(
    transform: Callable,
    *,
    resize: int | Sequence[int] | None,
    interpolation: str,
    crop: int | Sequence[int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Callable:
    """Attach the resize/crop/normalize parameters a PIL eval transform applies, so the device
    path builds its tensor ops from them (still checked against the transform before use)."""
    setattr(
        transform,
        TENSOR_OPS_ATTR,
        {
            "resize": [resize] if isinstance(resize, int) else None if resize is None else list(resize),
            "interpolation": interpolation,
            "crop": [crop, crop] if isinstance(crop, int) else None if crop is None else list(crop),
            "mean": None if mean is None else list(mean),
            "std": None if std is None else list(std),
        },
    )
    return transform


def open_clip_tensor_ops(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``with_tensor_ops`` keywords for an open_clip eval transform built from its preprocessing
    config (``model.visual.preprocess_cfg``), or None where it is not resize + crop + normalize."""
    size = cfg.get("size")
    interpolation = cfg.get("interpolation") or "bicubic"
    mode = cfg.get("resize_mode") or "shortest"
    if interpolation not in ("bicubic", "bilinear") or cfg.get("mode", "RGB") != "RGB":
        return None
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return None
    common = {"interpolation": interpolation, "mean": cfg.get("mean"), "std": cfg.get("std")}
    if mode == "shortest" and size[0] == size[1]:
        return {"resize": size[0], "crop": list(size), **common}
    if mode == "squash":
        return {"resize": list(size), "crop": None, **common}
    return None  # 'longest' (pad to square) and non-square 'shortest' keep-ratio resizes


def _from_config(config: Any) -> TensorPreprocess | None:
    if not isinstance(config, dict):
        return None
    size = _size_tuple(config.get("resize"))
    crop = _crop_tuple(config.get("crop")) if config.get("crop") is not None else None
    interp = config.get("interpolation")
    if config.get("resize") is not None and size is None:
        return None
    if interp not in ("bilinear", "bicubic") or (crop is None and (size is None or len(size) != 2)):
        return None
    mean = _triple(config["mean"]) if config.get("mean") is not None else None
    std = _triple(config["std"]) if config.get("std") is not None else None
    if (mean is None) != (std is None):
        return None
    return TensorPreprocess(size, interp, None, crop, mean, std)


def _map_compose(steps: Sequence[Any]) -> TensorPreprocess | None:
    """Resize? CenterCrop? [convert to RGB] ToTensor Normalize?, in that order, nothing else
    (a custom factory's own T.Compose; the transforms dissect-tui builds carry their config)."""
    import torchvision.transforms as T
    import torchvision.transforms.v2 as T2

    rgb_steps = compat.open_clip_rgb_steps()
    extra = compat.open_clip_transform_types()
    to_tensor: tuple[type, ...] = (T.ToTensor, *[c for n, c in extra.items() if n == "MaybeToTensor"])
    maybe_convert = extra.get("MaybeConvertMode")

    size = interp = max_size = crop = mean = std = None
    i, steps = 0, list(steps)
    if i < len(steps) and type(steps[i]) in (T.Resize, T2.Resize):
        r = steps[i]
        size, interp, max_size = _size_tuple(r.size), _interp_name(r.interpolation), r.max_size
        if size is None or interp is None:
            return None
        i += 1
    if i < len(steps) and type(steps[i]) in (T.CenterCrop, T2.CenterCrop):
        crop = _crop_tuple(steps[i].size)
        if crop is None:
            return None
        i += 1
    while i < len(steps) and (
        any(steps[i] is step for step in rgb_steps)
        or (maybe_convert is not None and type(steps[i]) is maybe_convert and steps[i].mode == "RGB")
    ):
        i += 1  # our decodes are RGB already
    if i < len(steps) and type(steps[i]) in to_tensor:
        i += 1
    elif (
        i + 1 < len(steps)
        and type(steps[i]) is T2.ToImage
        and type(steps[i + 1]) is T2.ToDtype
        and steps[i + 1].dtype in (torch.float32, {torch.Tensor: torch.float32})
        and steps[i + 1].scale
    ):
        i += 2
    else:
        return None
    if i < len(steps) and type(steps[i]) in (T.Normalize, T2.Normalize):
        mean, std = _triple(steps[i].mean), _triple(steps[i].std)
        if mean is None or std is None:
            return None
        i += 1
    if i != len(steps):
        return None
    if crop is None and (size is None or len(size) != 2):
        return None  # output size would vary with the image
    return TensorPreprocess(size, interp or "bilinear", max_size, crop, mean, std)


def _test_picture(width: int, height: int) -> Image.Image:
    """A smooth gradient with some detail: resize implementations agree closely on it."""
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    rgb = torch.stack([x, y, 0.5 + 0.4 * torch.sin(12 * x) * torch.cos(9 * y)], dim=2)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")


def _agrees(transform: Callable, spec: TensorPreprocess) -> bool:
    """The mapped ops reproduce the PIL transform on two test pictures (guards odd subclasses)."""
    for w, h in ((333, 250), (250, 333)):
        pic = _test_picture(w, h)
        try:
            ref = transform(pic)
            ours = spec(torch.from_numpy(_pil_array(pic)).permute(2, 0, 1).unsqueeze(0))[0]
        except Exception:
            return False
        if not isinstance(ref, torch.Tensor) or ref.shape != ours.shape:
            return False
        if float((ref.float() - ours).abs().max()) > CHECK_TOLERANCE:
            return False
    return True


def _pil_array(img: Image.Image):
    import numpy as np

    return np.array(img, dtype=np.uint8, copy=True)


def map_transform(transform: Callable) -> TensorPreprocess | None:
    """The tensor-op equivalent of a PIL eval transform, or None when it cannot be mapped.

    From the transform's attached configuration (``with_tensor_ops``), a torchvision
    classification preset's attributes, or a plain ``Compose`` chain; always checked against
    the transform itself on two test pictures.
    """
    import torchvision.transforms as T
    import torchvision.transforms.v2 as T2

    spec: TensorPreprocess | None = None
    preset = compat.classification_preset_type()
    config = getattr(transform, TENSOR_OPS_ATTR, None)
    if config is not None:
        spec = _from_config(config)
    elif preset is not None and type(transform) is preset:
        spec = _map_preset(transform)
    elif type(transform) in (T.Compose, T2.Compose):
        spec = _map_compose(cast(Any, transform).transforms)
    if spec is None or not _agrees(transform, spec):
        return None
    return spec


# ---------------------------------------------------------------- plan


@dataclass
class DecodePlan:
    mode: str  # "gpu" on CUDA, "tensor" when forced on another device
    device: torch.device
    specs: list[TensorPreprocess | None]  # per transform; None: that transform runs on the PIL path
    # --decode auto: an error of the device path switches the rest of the run to the PIL loader
    fallback: bool = False

    @property
    def label(self) -> str:
        on = "nvJPEG" if self.device.type == "cuda" else "decode_jpeg"
        mapped = sum(s is not None for s in self.specs)
        return f"{'gpu' if self.mode == 'gpu' else 'tensor'} ({on} on {self.device}, {mapped}/{len(self.specs)} transforms on the device)"


def _device_decode_works(device: torch.device) -> str | None:
    """None if decode_jpeg works on device, else a one-line reason."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        _test_picture(32, 24).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        if tuple(out[0].shape) != (3, 24, 32):
            return f"decode_jpeg gave shape {tuple(out[0].shape)} for a 32x24 test JPEG"
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def plan_decode(
    mode: str, device: torch.device, transforms: Sequence[Callable]
) -> tuple[DecodePlan | None, list[str]]:
    """How the images stage decodes, and notes for the run: plan None = the PIL path (``cpu``).

    auto: the device path when the device is CUDA and every transform maps, else cpu.
    gpu: needs CUDA; transforms that do not map run on the PIL path (noted).
    tensor (internal): the device path on whatever device, for tests and quick benchmarks.
    """
    if mode not in (*DECODE_MODES, TENSOR_MODE):
        raise UserError(f"unknown decode mode {mode!r}: use {', '.join(DECODE_MODES)}")
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None, []
    if mode == "gpu" and device.type != "cuda":
        raise UserError(
            f"--decode gpu needs a CUDA device (the device is {device}); use --decode cpu or --device cuda"
        )
    specs = [map_transform(t) for t in transforms]
    unmapped = [i for i, s in enumerate(specs) if s is None]
    if unmapped and mode == "auto":
        return None, ["decode: a custom image preprocess cannot run on the GPU; decoding with PIL"]
    if len(unmapped) == len(specs):
        return None, ["decode: no image transform maps to tensor ops; decoding with PIL instead"]
    broken = _device_decode_works(device)
    if broken is not None:
        if mode == "auto":
            return None, [
                f"decode: JPEG decoding on {device} failed a self-test ({broken}); decoding with PIL"
            ]
        raise UserError(
            f"--decode gpu: JPEG decoding on {device} does not work here ({broken}); use --decode cpu"
        )
    notes = [
        f"decode: image transform #{i} is not a plain resize/crop/normalize chain; it runs with PIL"
        for i in unmapped
    ]
    plan = DecodePlan(TENSOR_MODE if mode == TENSOR_MODE else "gpu", device, specs, fallback=mode == "auto")
    return plan, notes


# ---------------------------------------------------------------- loader (workers: bytes only)

_DEVICE, _PIL, _FAILED = 0, 1, 2  # row kinds


@dataclass
class DecodeStats:
    """How each image of a run was decoded: on the device or on the PIL path, and why."""

    counts: Counter = field(default_factory=Counter)
    fallback: str | None = None  # set when --decode auto gave up on the device path mid-run

    def summary(self) -> str:
        device = self.counts.get("device", 0)
        rest = ", ".join(f"{n} {why}" for why, n in self.counts.most_common() if why != "device")
        return f"{device} images decoded on the device" + (f"; PIL path: {rest}" if rest else "")


class _Row(NamedTuple):
    """One image as a loader worker hands it over."""

    image_index: int  # (a field named index would hide tuple.index)
    kind: int  # _DEVICE: ``data`` is decoded on the device; _PIL / _FAILED: done on the PIL path
    data: bytes | None  # the JPEG file
    cpu: list[torch.Tensor | None]  # per transform: the PIL path's tensor, where it ran there
    thumbnail: bytes | None
    size: tuple[int, int] | None  # (width, height) from the header
    error: str | None
    tag: str  # why this path (DecodeStats)


@dataclass
class _RawBatch:
    indices: torch.Tensor
    kinds: list[int]
    buffer: torch.Tensor  # uint8, the JPEG files of the batch back to back
    offsets: list[int]  # file k is buffer[offsets[k]:offsets[k+1]]
    jpeg_pos: list[int]  # batch position of file k
    cpu: list[list[tuple[list[int], torch.Tensor]]]  # per transform: (positions, stacked PIL-path tensors)
    thumbnails: list[bytes | None]
    sizes: list[tuple[int, int] | None]
    errors: list[str | None]
    tags: list[str]


class _BytesDataset(torch.utils.data.Dataset):
    """Per image: the JPEG bytes for the device, or the finished PIL-path row when it must fall back."""

    def __init__(
        self,
        probe: ProbeSet,
        transforms: Sequence[Callable],
        shapes: list[tuple[int, ...]],
        specs: Sequence[TensorPreprocess | None],
        thumb_px: int,
        device_type: str,
    ) -> None:
        self.probe = probe
        self.n_transforms = len(transforms)
        self.full = ProbeDataset(probe, transforms, shapes, thumb_px)
        self.unmapped = [i for i, s in enumerate(specs) if s is None]
        self.partial = (
            ProbeDataset(probe, [transforms[i] for i in self.unmapped], [shapes[i] for i in self.unmapped], 0)
            if self.unmapped
            else None
        )
        self.thumb_px = thumb_px
        # nvJPEG's CMYK/YCCK handling is unverified; libjpeg (CPU) matches PIL exactly
        self.modes = _DIRECT_MODES if device_type == "cuda" else _DIRECT_MODES | {"CMYK"}

    def __len__(self) -> int:
        return len(self.probe)

    def pil_row(self, index: int, tag: str) -> _Row:
        row = self.full[index]
        cpu: list[torch.Tensor | None] = list(row.tensors) if row.ok else [None] * self.n_transforms
        return _Row(
            index,
            _PIL if row.ok else _FAILED,
            None,
            cpu,
            row.thumbnail,
            row.size,
            row.error,
            tag if row.ok else "failed",
        )

    def _read(self, path: str) -> bytes | str:
        """The file's bytes, or why the PIL path should take it (it words any error)."""
        try:
            with open_regular(path) as fh:
                if os.fstat(fh.fileno()).st_size > MAX_DEVICE_FILE_BYTES:
                    return "large file"
                head = fh.read(len(JPEG_MAGIC))
                if head != JPEG_MAGIC:
                    return "not JPEG"
                return head + fh.read(MAX_DEVICE_FILE_BYTES)
        except OSError:
            return "unreadable"  # missing, not a regular file, no permission

    def __getitem__(self, index: int) -> _Row:
        seg, _ = self.probe.segment(index)  # file items only; CIFAR/synthetic are PIL
        if seg.kind != "file":
            return self.pil_row(index, f"{seg.kind} images")
        data = self._read(self.probe[index].path)
        if isinstance(data, str):
            return self.pil_row(index, data)
        try:
            # JpegImageFile directly: no process-wide bomb check; our own bounds apply below.
            with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:
                width, height = im.size
                check_image_header(width, height, "JPEG", len(data))
                if width * height > MAX_DEVICE_PIXELS:
                    return self.pil_row(index, "very large JPEG")
                if im.mode not in self.modes:
                    return self.pil_row(index, f"{im.mode} JPEG")
                if im.getexif().get(0x0112, 1) not in (1, None):
                    return self.pil_row(index, "EXIF rotation")  # decode_jpeg on CUDA ignores EXIF
                thumb = None
                if self.thumb_px:
                    # a reduced-scale (DCT) decode: cheap, and it validates the file like the PIL path
                    im.draft(im.mode, (2 * self.thumb_px, 2 * self.thumb_px))
                    im.load()
                    thumb = make_thumbnail(to_rgb(im), self.thumb_px)
        except BadImage:
            return self.pil_row(index, "refused by the header checks")  # the PIL path words it
        except Exception:
            return self.pil_row(index, "PIL check failed")  # the PIL path decides and words it
        cpu: list[torch.Tensor | None] = [None] * self.n_transforms
        if self.partial is not None:
            part = self.partial[index]
            if not part.ok:
                return _Row(index, _FAILED, None, cpu, None, (width, height), part.error, "failed")
            for k, t in enumerate(self.unmapped):
                cpu[t] = part.tensors[k]
        return _Row(index, _DEVICE, data, cpu, thumb, (width, height), None, "device")


def _collate_raw(rows: list[_Row]) -> _RawBatch:
    datas = cast(list[bytes], [r.data for r in rows if r.kind == _DEVICE])  # device rows carry their file
    offsets = [0]
    for d in datas:
        offsets.append(offsets[-1] + len(d))
    buffer = (
        torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8)
        if datas
        else torch.empty(0, dtype=torch.uint8)
    )
    cpu: list[list[tuple[list[int], torch.Tensor]]] = []
    for t in range(len(rows[0].cpu)):
        tensors = [r.cpu[t] for r in rows]
        pos = [j for j, x in enumerate(tensors) if x is not None]
        cpu.append([(pos, torch.stack([x for x in tensors if x is not None]))] if pos else [])
    return _RawBatch(
        indices=torch.tensor([r.image_index for r in rows], dtype=torch.long),
        kinds=[r.kind for r in rows],
        buffer=buffer,
        offsets=offsets,
        jpeg_pos=[j for j, r in enumerate(rows) if r.kind == _DEVICE],
        cpu=cpu,
        thumbnails=[r.thumbnail for r in rows],
        sizes=[r.size for r in rows],  # (width, height) tuples already
        errors=[r.error for r in rows],
        tags=[r.tag for r in rows],
    )


# ---------------------------------------------------------------- main process: decode + preprocess


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3,H,W] per JPEG file on device (grey and CMYK as RGB); None where decoding fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not files:
        return []
    try:
        out: list[torch.Tensor | None] = list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batched call: retry one by one
        out = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
    return [x if x is not None and x.ndim == 3 and x.shape[0] == 3 else None for x in out]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # no host sync
    return t.to(device)


def _pieces_by_pixels(
    positions: list[int], sizes: list[tuple[int, int] | None], budget: int
) -> list[list[int]]:
    """Consecutive runs of ``positions`` whose header pixels sum to at most ``budget`` each."""
    pieces: list[list[int]] = [[]]
    total = 0
    for k, pos in enumerate(positions):
        w, h = sizes[pos] or (0, 0)
        if pieces[-1] and total + w * h > budget:
            pieces.append([])
            total = 0
        pieces[-1].append(k)
        total += w * h
    return [p for p in pieces if p]


def _finish(
    raw: _RawBatch,
    plan: DecodePlan,
    dataset: _BytesDataset,
    shapes: list[tuple[int, ...]],
    stats: DecodeStats,
) -> Batch:
    device = plan.device
    n = len(raw.kinds)
    kinds, errors, thumbs, tags = list(raw.kinds), list(raw.errors), list(raw.thumbnails), list(raw.tags)
    cpu = [list(pieces) for pieces in raw.cpu]
    files = [raw.buffer[a:b] for a, b in zip(raw.offsets[:-1], raw.offsets[1:], strict=True)]
    device_pieces: list[list[tuple[list[int], torch.Tensor]]] = [[] for _ in shapes]
    # Decoded images are the large tensors: decode, preprocess and drop them piece by piece.
    for piece in _pieces_by_pixels(raw.jpeg_pos, raw.sizes, DEVICE_DECODE_PIXELS):
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        decoded = decode_jpegs([files[k] for k in piece], device)
        for k, img in zip(piece, decoded, strict=True):
            pos = raw.jpeg_pos[k]
            w, h = raw.sizes[pos] or (0, 0)
            if img is not None and tuple(img.shape[1:]) == (h, w):
                groups.setdefault((h, w), []).append((pos, img))
                continue
            # the device decoder refused it, or decoded another size than the header says:
            # the PIL path decides (and words any error)
            row = dataset.pil_row(int(raw.indices[pos]), "device decode failed")
            kinds[pos], errors[pos], tags[pos] = row.kind, row.error, row.tag
            thumbs[pos] = row.thumbnail
            for t in range(len(shapes)):
                cpu[t] = [(p, x) for p, x in cpu[t] if pos not in p] + _drop_pos(cpu[t], pos)
                if (tensor := row.cpu[t]) is not None:
                    cpu[t].append(([pos], tensor.unsqueeze(0)))
        del decoded
        for t, spec in enumerate(plan.specs):
            if spec is not None:
                for members in groups.values():
                    batch = torch.stack([img for _, img in members])
                    device_pieces[t].append(([p for p, _ in members], spec(batch)))
        del groups
    stats.counts.update(tags)

    inputs = []
    for t, shape in enumerate(shapes):
        pieces = device_pieces[t] + [(p, _to_device(x, device)) for p, x in cpu[t]]
        if len(pieces) == 1 and pieces[0][0] == list(range(n)):
            inputs.append(pieces[0][1])  # the common case: one size, nothing failed
            continue
        out = torch.zeros((n, *shape), device=device)  # failed rows stay zero, as on the PIL path
        for positions, x in pieces:
            out.index_copy_(0, _to_device(torch.tensor(positions, dtype=torch.long), device), x)
        inputs.append(out)
    return Batch(
        indices=raw.indices,
        ok=torch.tensor([k != _FAILED for k in kinds], dtype=torch.bool),
        inputs=inputs,
        thumbnails=thumbs,
        sizes=raw.sizes,
        errors=errors,
    )


def _drop_pos(pieces: list[tuple[list[int], torch.Tensor]], pos: int) -> list[tuple[list[int], torch.Tensor]]:
    """The rows of pieces that contain pos, without pos."""
    out = []
    for p, x in pieces:
        if pos in p:
            keep = [k for k, q in enumerate(p) if q != pos]
            if keep:
                out.append(([p[k] for k in keep], x[keep]))
    return out


def _device_batches(
    probe: ProbeSet,
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
    plan: DecodePlan,
    batch_size: int,
    workers: int,
    thumbnail_px: int,
    stats: DecodeStats,
    order: Sequence[int] | None = None,
) -> Generator[Batch, None, None]:
    shapes = [transform_output_shape(t, i) for i, t in enumerate(transforms)]
    for t, spec in enumerate(plan.specs):
        if spec is not None and spec.crop is not None and (3, *spec.crop) != shapes[t]:
            raise UserError(
                f"image transform #{t}: mapped crop {spec.crop} disagrees with its output {shapes[t]}"
            )
    dataset = _BytesDataset(probe, transforms, shapes, plan.specs, thumbnail_px, plan.device.type)
    items: torch.utils.data.Dataset = (
        dataset if order is None else torch.utils.data.Subset(dataset, list(order))
    )
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_raw,
        prefetch_factor=4 if workers > 0 else None,
    )
    for raw in loader:
        yield _finish(raw, plan, dataset, shapes, stats)


def iter_device_batches(
    probe: ProbeSet,
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
    plan: DecodePlan,
    batch_size: int,
    workers: int,
    thumbnail_px: int = 96,
    stats: DecodeStats | None = None,
    note: Callable[[str], None] | None = None,
    order: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Like ``probe.iter_batches``, but inputs are decoded and preprocessed on ``plan.device``.

    Batches come in probe order; ``inputs`` are already on the device; failed images give
    ok=False rows with zero tensors and the PIL path's error text. An error of the device path
    itself (the decoder, the device, the loader) is, with ``plan.fallback`` (``--decode auto``),
    one ``note(...)`` and ``probe.iter_batches`` for the images not yet yielded; without it
    (``--decode gpu``) one UserError line.
    """
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    if workers < 0:
        raise UserError("workers must be 0 or more")
    stats = stats if stats is not None else DecodeStats()
    done = 0  # images yielded so far: batches come in probe order
    device = _device_batches(probe, transforms, plan, batch_size, workers, thumbnail_px, stats, order)
    try:
        while True:
            try:
                batch = next(device)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the device path
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                if not plan.fallback:
                    raise UserError(
                        f"--decode {plan.mode}: decoding on {plan.device} failed after {done} images "
                        f"({reason}); use --decode cpu"
                    ) from None
                break
            done += len(batch.indices)
            yield batch
    finally:
        device.close()
    stats.fallback = (
        f"decode: the device path failed after {done} images ({reason}); the remaining "
        f"{(len(probe) if order is None else len(order)) - done} are decoded with PIL"
    )
    if note is not None:
        note(stats.fallback)
    for batch in iter_batches(probe, transforms, batch_size, workers, thumbnail_px, start=done, order=order):
        stats.counts["after the device path failed"] += len(batch.indices)
        yield batch
