"""The images stage: decode every probe image once, feed both the target network and CLIP.

One pass over the probe yields, per decodable image, the pooled activations of every recorded
layer and the CLIP image embedding; per listed image, its size, its decode error and a small
thumbnail. A batch that does not fit the device is split in halves until it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dissect_tui.errors import UserError
from dissect_tui.progress import ProgressSink
from dissect_tui.runtime import autocast, empty_cache, is_out_of_memory


@dataclass
class ImagePass:
    """What the images stage produced. Tensors stay on the device until scoring and writing."""

    n_listed: int
    ok_ids: np.ndarray  # [N] image ids (positions in the probe) that decoded, ascending
    acts: dict[str, torch.Tensor]  # layer -> [N, K] float32
    image_emb: torch.Tensor  # [N, D] float32, unit length
    sizes: list[tuple[int, int] | None]  # per listed image
    errors: list[str | None]  # per listed image, None when it decoded
    thumbnails: dict[int, bytes] = field(default_factory=dict)
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
        return out, clip_model.encode_images(x_c) if clip_model is not None else x_t.new_empty(
            x_t.shape[0], 0
        )
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


def record_images(
    probe: Any,
    batches: Any,
    model: torch.nn.Module,
    layers: list[str],
    pool: str,
    clip_model: Any,
    device: torch.device,
    precision: str,
    progress: ProgressSink,
) -> ImagePass:
    """Run the target (with hooks on ``layers``) and CLIP's image tower over ``batches``.

    ``batches`` yields probe.Batch objects of ``probe`` whose ``inputs`` are (target input, CLIP input),
    or only the target input when ``clip_model`` is None (embeddings come from elsewhere; the result's
    ``image_emb`` then has no columns).
    """
    n_listed = len(probe)
    from dissect_tui.targets import LayerRecorder

    acts_chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    emb_chunks: list[torch.Tensor] = []
    ok_chunks: list[torch.Tensor] = []
    result = ImagePass(
        n_listed, np.empty(0, np.int64), {}, torch.empty(0), [None] * n_listed, [None] * n_listed
    )
    progress.start("images", n_listed, "img")
    with LayerRecorder(model, layers, pool=pool) as recorder, torch.inference_mode():
        for batch in batches:
            ids = batch.indices
            for j, i in enumerate(ids.tolist()):
                result.sizes[i] = batch.sizes[j]
                result.errors[i] = batch.errors[j]
                if batch.thumbnails[j] is not None:
                    result.thumbnails[i] = batch.thumbnails[j]
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
                for layer in layers:
                    acts_chunks[layer].append(acts[layer])
                emb_chunks.append(emb.float())
                ok_chunks.append(ids[ok])
            progress.advance("images", len(ids))
        shapes = dict(recorder.output_shapes)
    progress.finish("images")
    if ok_chunks:
        result.ok_ids = torch.cat(ok_chunks).numpy()
    n_ok = len(result.ok_ids)
    if n_ok == 0:
        (path, error), *_ = result.failed([it.path for it in probe]) or [("-", "no image listed")]
        raise UserError(f"none of the {n_listed} probe images could be decoded (first: {path}: {error})")
    if n_ok < 2:
        raise UserError("at least 2 decodable probe images are needed")
    result.acts = {layer: torch.cat(acts_chunks.pop(layer)) for layer in layers}
    result.image_emb = torch.cat(emb_chunks)
    for layer in layers:
        raw = shapes.get(layer)
        result.layer_shapes[layer] = str(list(raw if raw is not None else result.acts[layer].shape[1:]))
    return result
