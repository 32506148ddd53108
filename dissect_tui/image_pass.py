"""The images stage: decode every probe image once, feed both the target network and CLIP.

One pass over the probe yields, per decodable image, the pooled activations of every recorded
layer and the CLIP image embedding; per listed image, its size, its decode error and a small
thumbnail. A batch that does not fit the device is split in halves until it does.

Memory does not grow with images × neurons: activations leave for the cache in chunks of about
``CHUNK_BYTES`` as they are produced (``ActivationSink``), and each layer keeps only what scoring
needs (``activation_stats.LayerStatsBuilder``: top images, and for cos two running sums).
Thumbnails wait in an unlinked temporary file until the top images are known. What may grow
with N: the image embeddings (N × D) and the per-image sizes and errors.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch

from dissect_tui.activation_stats import LayerStats, LayerStatsBuilder
from dissect_tui.errors import UserError
from dissect_tui.progress import ProgressSink
from dissect_tui.runtime import autocast, empty_cache, is_out_of_memory

CHUNK_BYTES = 16 << 20  # activations handed to the sink at a time, per layer


class ActivationSink(Protocol):
    def __call__(self, layer: str, image_ids: np.ndarray, acts: np.ndarray) -> None: ...


class ImageTicks:
    """Images already counted on the progress bar as they were decoded (in-process loading), so
    the bar moves image by image instead of once per batch, and no image is counted twice."""

    def __init__(self, progress: ProgressSink) -> None:
        self.progress = progress
        self.pending = 0

    def tick(self) -> None:
        self.pending += 1
        self.progress.advance("images", 1)

    def settle(self, n: int) -> None:
        """A batch of ``n`` images is done: count the ones not counted while decoding."""
        counted = min(self.pending, n)
        self.pending -= counted
        if n > counted:
            self.progress.advance("images", n - counted)


class ThumbnailSpool:
    """Small JPEGs of every decoded image, in an unlinked temporary file (nothing is left behind,
    even after SIGKILL); only those of some neuron's top images are read back at the end."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(dir=folder, prefix=".dissect-tui-thumbs-")
        self._where: dict[int, tuple[int, int]] = {}
        self._end = 0

    def add(self, image_id: int, jpeg: bytes) -> None:
        self._file.seek(self._end)
        self._file.write(jpeg)
        self._where[image_id] = (self._end, len(jpeg))
        self._end += len(jpeg)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def read(self, image_ids: Iterable[int]) -> dict[int, bytes]:
        out = {}
        for i in sorted(set(image_ids)):
            if i in self._where:
                offset, size = self._where[i]
                self._file.seek(offset)
                out[i] = self._file.read(size)
        return out

    def close(self) -> None:
        self._file.close()


@dataclass
class ImagePass:
    """What the images stage produced. Embeddings stay on the device until scoring and writing."""

    n_listed: int
    ok_ids: np.ndarray  # [N] image ids (positions in the probe) that decoded, ascending
    stats: dict[str, LayerStats]  # per layer: what scoring needs (top images, sums)
    n_units: dict[str, int]
    image_emb: torch.Tensor  # [N, D] float32, unit length
    sizes: list[tuple[int, int] | None]  # per listed image
    errors: list[str | None]  # per listed image, None when it decoded
    thumbnails: ThumbnailSpool | None = None
    layer_shapes: dict[str, str] = field(default_factory=dict)  # raw module output shape per layer

    @property
    def n_failed(self) -> int:
        return self.n_listed - len(self.ok_ids)

    def failed(self, paths: list[str]) -> list[tuple[str, str]]:
        return [(paths[i], e or "unknown error") for i, e in enumerate(self.errors) if e is not None]


def _forward(
    model: torch.nn.Module,
    recorder: Any,
    clip_model: Any,
    device: torch.device,
    precision: str,
    progress: ProgressSink,
    x_t: torch.Tensor,
    x_c: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Both forwards of one batch (CLIP's only when there is a CLIP); out of memory → the two halves."""
    try:
        with autocast(device, precision):
            model(x_t)
        out = {k: v.float() for k, v in recorder.pop().items()}
        emb = clip_model.encode_images(x_c) if clip_model is not None else x_t.new_empty(x_t.shape[0], 0)
        return out, emb
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        if x_t.shape[0] == 1:
            raise UserError("out of device memory even with batch size 1; use --device cpu") from None
        empty_cache(device)
        half = x_t.shape[0] // 2
        progress.note(f"out of memory on {device}: retrying with batches of {half}")
        args = (model, recorder, clip_model, device, precision, progress)
        a1, e1 = _forward(*args, x_t[:half], x_c[:half])
        a2, e2 = _forward(*args, x_t[half:], x_c[half:])
        return {k: torch.cat([a1[k], a2[k]]) for k in a1}, torch.cat([e1, e2])


class _ChunkedWriter:
    """Collects each layer's activations and hands them to the sink ~CHUNK_BYTES at a time."""

    def __init__(self, sink: ActivationSink | None) -> None:
        self.sink = sink
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.bytes: dict[str, int] = {}

    def add(self, layer: str, ids: np.ndarray, acts: torch.Tensor) -> None:
        if self.sink is None:
            return
        arr = acts.cpu().numpy()
        self.pending.setdefault(layer, []).append((ids, arr))
        self.bytes[layer] = self.bytes.get(layer, 0) + arr.nbytes
        if self.bytes[layer] >= CHUNK_BYTES:
            self.flush(layer)

    def flush(self, layer: str | None = None) -> None:
        for name in [layer] if layer is not None else list(self.pending):
            parts = self.pending.pop(name, [])
            self.bytes[name] = 0
            if parts and self.sink is not None:
                self.sink(name, np.concatenate([i for i, _ in parts]), np.concatenate([a for _, a in parts]))


def record_images(
    probe: Any,
    batches: Iterable[Any],
    model: torch.nn.Module,
    layers: list[str],
    pool: str,
    clip_model: Any,
    device: torch.device,
    precision: str,
    progress: ProgressSink,
    *,
    builder: Callable[[str, int, int], LayerStatsBuilder],
    sink: ActivationSink | None = None,
    thumbnails: ThumbnailSpool | None = None,
    embeddings_of: Callable[[np.ndarray], torch.Tensor] | None = None,
    share: int | None = None,
    minimum: int = 2,
    ticks: ImageTicks | None = None,
) -> ImagePass:
    """Run the target (with hooks on ``layers``) and CLIP's image tower over ``batches``.

    ``batches`` yields probe.Batch objects of ``probe`` whose ``inputs`` are (target input, CLIP input),
    or only the target input when ``clip_model`` is None (embeddings come from elsewhere; the result's
    ``image_emb`` then has no columns, and ``embeddings_of(image_ids)`` supplies the embeddings of
    each batch). ``builder(layer, n_units, embed_dim)`` makes each layer's stats builder once the
    widths are known; ``sink`` receives the activations in chunks, in the order of the batches.
    ``share``: how many images ``batches`` holds when it is not the whole probe (a torchrun rank's
    share); ``minimum``: decoded images required (0 for a share: the whole run checks the total).
    """
    from dissect_tui.recording import LayerRecorder

    n_listed = len(probe)
    builders: dict[str, LayerStatsBuilder] = {}
    chunks = _ChunkedWriter(sink)
    emb_chunks: list[torch.Tensor] = []
    ok_chunks: list[torch.Tensor] = []
    sizes: list[tuple[int, int] | None] = [None] * n_listed
    errors: list[str | None] = [None] * n_listed
    progress.start("images", n_listed if share is None else share, "img")
    with LayerRecorder(model, layers, pool=pool) as recorder, torch.inference_mode():
        for batch in batches:
            ids = batch.indices
            for j, i in enumerate(ids.tolist()):
                sizes[i] = batch.sizes[j]
                errors[i] = batch.errors[j]
                if thumbnails is not None and batch.thumbnails[j] is not None:
                    thumbnails.add(i, batch.thumbnails[j])
            ok = batch.ok
            if bool(ok.any()):
                x_t, x_c = batch.inputs[0], batch.inputs[-1]
                if not bool(ok.all()):
                    keep = ok.nonzero().squeeze(1)
                    x_t, x_c = x_t[keep], x_c[keep]
                x_t = x_t.to(device, non_blocking=True)  # no-op for the device decode path
                x_c = x_c.to(device, non_blocking=True)
                if device.type == "cuda":
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                acts, emb = _forward(model, recorder, clip_model, device, precision, progress, x_t, x_c)
                ok_ids = ids[ok].numpy()
                emb = emb.float() if embeddings_of is None else embeddings_of(ok_ids).to(device)
                for layer in layers:
                    a = acts[layer]
                    if layer not in builders:
                        builders[layer] = builder(layer, a.shape[1], emb.shape[1])
                    builders[layer].add(ok_ids, a, emb if builders[layer].cross is not None else None)
                    chunks.add(layer, ok_ids, a)
                emb_chunks.append(emb)
                ok_chunks.append(ids[ok])
            if ticks is not None:
                ticks.settle(len(ids))
            else:
                progress.advance("images", len(ids))
        chunks.flush()
        shapes = dict(recorder.output_shapes)
    progress.finish("images")
    ok_all = torch.cat(ok_chunks).numpy() if ok_chunks else np.empty(0, dtype=np.int64)
    check_decoded(probe, len(ok_all), errors, minimum)
    stats = {layer: b.finish() for layer, b in builders.items()}
    n_units = {layer: st.n_units for layer, st in stats.items()}
    emb = torch.cat(emb_chunks) if emb_chunks else torch.empty(0, 0)
    result = ImagePass(n_listed, ok_all, stats, n_units, emb, sizes, errors, thumbnails)
    for layer in stats:
        raw = shapes.get(layer)
        result.layer_shapes[layer] = str(list(raw if raw is not None else [n_units[layer]]))
    return result


def check_decoded(probe: Any, n_ok: int, errors: list[str | None], minimum: int = 2) -> None:
    """One clear line when too few probe images decoded to label anything."""
    if minimum <= 0:
        return
    if n_ok == 0:
        failed = [(probe[i].path, e) for i, e in enumerate(errors) if e] or [("-", "no image listed")]
        raise UserError(
            f"none of the {len(probe)} probe images could be decoded (first: {failed[0][0]}: {failed[0][1]})"
        )
    if n_ok < minimum:
        raise UserError(f"at least {minimum} decodable probe images are needed")
