"""The CLIP-Dissect pipeline: probe images -> activations + embeddings -> scores -> one DuckDB cache.

Stages (each timed and reported through a ProgressSink, never printed here):
  images    decode every probe image once; target forward with hooks + CLIP image tower
  concepts  CLIP text tower over the concept set (texts already in the cache are reused)
  scoring   similarity per layer without materialising N×M P or Q (dissect_tui.scoring)
  write     everything into a temporary DuckDB file, renamed into place at the end

`relabel` reruns only `concepts` (for new texts), `scoring` and `write` from a cache.
This module imports no UI code.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dissect_tui import scoring
from dissect_tui.concepts import DEFAULT_CONCEPT_SET, ConceptSet, load_concepts
from dissect_tui.errors import CacheError, UserError
from dissect_tui.similarity import SIMILARITIES
from dissect_tui.store import CacheWriter, cache_name, open_cache
from dissect_tui.store.reader import CacheReader
from dissect_tui.store.writer import check_target
from dissect_tui.text_encoding import TextEncoder, check_template, tower_key

DEFAULT_CLIP = "ViT-B-16:openai"
DEFAULT_PROBE = "cifar100"
DEFAULT_CUTOFF = 0.16
IMAGE_CONCEPTS_TOP = 5  # best concepts stored per image (image_concepts), for SQL and the browser


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


@dataclass
class IndexSettings:
    model: str
    weights: str | None = None
    layers: list[str] | None = None
    probe: list[str] = field(default_factory=lambda: [DEFAULT_PROBE])
    concepts: str = DEFAULT_CONCEPT_SET
    clip: str = DEFAULT_CLIP
    template: str | None = None  # e.g. "a photo of {}"; concepts are encoded as written by default
    pool: str = "mean"
    similarity: str = "soft_wpmi"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    cutoff: float = DEFAULT_CUTOFF
    top_images: int = 100
    top_concepts: int = 100
    thumbnail_top: int = 10
    thumbnail_px: int = 96
    db: Path | None = None
    cache_dir: Path = Path("cache")
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    decode: str = "auto"  # auto | cpu | gpu (dissect_tui.fast_decode); "tensor" forces the device path

    def db_path(self) -> Path:
        return Path(self.db) if self.db else Path(self.cache_dir) / f"{cache_name(self.model)}.duckdb"


@dataclass
class LayerSummary:
    layer: str
    n_units: int
    n_interpretable: int
    common_labels: list[tuple[str, int]]


@dataclass
class IndexResult:
    path: Path
    run_id: int
    n_images: int
    n_failed: int
    failed_examples: list[tuple[str, str]]
    layers: list[LayerSummary]
    stage_seconds: dict[str, float]
    images_per_second: float | None = None
    notes: list[str] = field(default_factory=list)
    n_concepts_encoded: int = 0  # texts that went through the text tower (0: all reused)

    def stage_rates(self) -> dict[str, str]:
        """Throughput of each timed stage in its own unit (images, texts), for the summary."""
        ok = self.n_images - self.n_failed
        rates = {}
        for stage, seconds in self.stage_seconds.items():
            if seconds <= 0:
                continue
            if stage == "concepts" and self.n_concepts_encoded:
                rates[stage] = f"{self.n_concepts_encoded / seconds:,.0f} texts/s"
            elif stage == "images" and self.n_images:
                rates[stage] = f"{self.n_images / seconds:,.0f} img/s"
            elif stage in ("scoring", "write") and ok:
                rates[stage] = f"{ok / seconds:,.0f} img/s"
        return rates


# -- small helpers ------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available here; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    return precision


def check_similarity(name: str) -> None:
    if name not in SIMILARITIES:
        raise UserError(f"unknown similarity {name!r}: use one of {', '.join(SIMILARITIES)}")


@contextmanager
def _stage(times: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def encode_concepts(
    texts: list[str],
    cached: dict[str, np.ndarray],
    encoder: TextEncoder,
    progress: ProgressSink,
) -> tuple[np.ndarray, int]:
    """Embeddings [M, D] for texts, encoding only those not in ``cached`` (text -> emb).

    The encoder loads its CLIP only when something must be encoded, so a relabel with known
    concepts works without the CLIP weights. Returns (embeddings, number encoded).
    """
    missing = [t for t in texts if t not in cached]
    if missing:
        _ = encoder.clip  # load before the bar starts: loading is not encoding
        progress.start("concepts", len(missing), "texts")
        emb = encoder.encode(missing, on_batch=lambda n: progress.advance("concepts", n))
        progress.finish("concepts")
        for text, vec in zip(missing, emb.cpu().numpy().astype(np.float32), strict=True):
            cached[text] = vec
    return np.stack([cached[t] for t in texts]), len(missing)


def image_concept_summary(
    image_emb: torch.Tensor,
    concept_emb: torch.Tensor,
    a: float,
    top: int = IMAGE_CONCEPTS_TOP,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: its best concepts by P (cosine) and logsumexp(a·P) over the set, in row chunks."""
    n = image_emb.shape[0]
    top = min(top, concept_emb.shape[0])
    ids = np.empty((n, top), dtype=np.int64)
    sims = np.empty((n, top), dtype=np.float32)
    lse = np.empty(n, dtype=np.float32)
    t = concept_emb.T.contiguous()
    for s in range(0, n, chunk):
        p = image_emb[s : s + chunk] @ t
        v, i = p.topk(top, dim=1)
        ids[s : s + chunk] = i.cpu().numpy()
        sims[s : s + chunk] = v.float().cpu().numpy()
        lse[s : s + chunk] = torch.logsumexp(p * a, dim=1).float().cpu().numpy()
    return ids, sims, lse


def _hyperparameters(similarity: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The paper's defaults of a similarity function merged with user overrides."""
    import inspect

    fn = SIMILARITIES[similarity]
    params = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("acts", "P")
    }
    unknown = set(overrides) - set(params)
    if unknown:
        raise UserError(
            f"unknown hyperparameter(s) {', '.join(sorted(unknown))} for {similarity}: "
            f"valid ones are {', '.join(sorted(params)) or 'none'}"
        )
    for key, value in overrides.items():
        _check_hyperparameter(similarity, key, value, params[key])
    params.update(overrides)
    return {k: v for k, v in params.items() if not callable(v)}


# Hyperparameters with a lower bound (inclusive) and, for fractions, an upper one.
_HP_MIN = {"top_k": 1, "n_perm": 1, "min_prob": 0.0, "p": 0.0, "scale_p": 0.0}
_HP_FRACTION = ("p_start", "p_end", "top_fraction")


def _check_hyperparameter(similarity: str, key: str, value: Any, default: Any) -> None:
    """A value that would crash scoring, or silently give NaN scores, fails as one clear line."""
    where = f"--hp {key}={value} for {similarity}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: the value must be a number")
    if not math.isfinite(value):
        raise UserError(f"{where}: the value must be a finite number")
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
        raise UserError(f"{where}: the value must be a whole number")
    if key in _HP_MIN and value < _HP_MIN[key]:
        raise UserError(f"{where}: the value must be at least {_HP_MIN[key]}")
    if key == "a" and not value > 0:
        raise UserError(f"{where}: the softmax scale must be greater than 0")
    if key in _HP_FRACTION and not 0 < value <= 1:
        raise UserError(f"{where}: the value must be a fraction in (0, 1]")


def check_cutoff(cutoff: float) -> None:
    if not math.isfinite(cutoff):
        raise UserError(f"--cutoff must be a finite number, got {cutoff}")


def check_top_n(option: str, n: int) -> None:
    if n < 1:
        raise UserError(f"{option} must be at least 1, got {n}")


def _softmax_temperature(similarity: str, hp: dict[str, Any]) -> float:
    """The `a` used for per-image logsumexp (free-text queries use SoftWPMI's a=10 otherwise)."""
    return float(hp.get("a", 10.0)) if similarity in ("wpmi", "soft_wpmi") else 10.0


def summarize_layer(layer: str, labels: list[str], scores: np.ndarray, cutoff: float) -> LayerSummary:
    return LayerSummary(
        layer=layer,
        n_units=len(labels),
        n_interpretable=int((scores > cutoff).sum()),
        common_labels=Counter(labels).most_common(3),
    )


def _score_and_write(
    writer: CacheWriter,
    run_id: int,
    layers: list[str],
    get_acts,
    image_ids: np.ndarray,
    image_emb: torch.Tensor,
    concept_emb: torch.Tensor,
    concept_ids: np.ndarray,
    texts: list[str],
    similarity: str,
    hp: dict[str, Any],
    cutoff: float,
    top_concepts: int,
    progress: ProgressSink,
    times: dict[str, float],
    device: torch.device,
) -> list[LayerSummary]:
    # All layers in one call: wpmi/soft_wpmi then share a single pass over the images' P rows.
    progress.start("scoring", None, "steps")
    with _stage(times, "scoring"):
        acts = {layer: get_acts(layer).to(device) for layer in layers}
        results = scoring.score_layers(
            acts,
            image_emb,
            concept_emb,
            method=similarity,
            top_concepts=min(top_concepts, len(texts)),
            on_progress=lambda done, total: progress.update("scoring", done, total),
            image_top=IMAGE_CONCEPTS_TOP,
            **hp,
        )
        del acts
    progress.finish("scoring")
    summaries = []
    with _stage(times, "write"):
        for layer in layers:
            top_c = results[layer].top_concepts.cpu().numpy()
            top_s = results[layer].top_scores.float().cpu().numpy()
            labels = [texts[i] for i in top_c[:, 0]]
            writer.write_neurons(run_id, layer, labels, concept_ids[top_c[:, 0]], top_s[:, 0], cutoff)
            writer.write_neuron_concepts(run_id, layer, concept_ids[top_c], top_s)
            summaries.append(summarize_layer(layer, labels, top_s[:, 0], cutoff))
    first = results[layers[0]]
    if first.image_top_concepts is not None and first.image_lse is not None:
        # wpmi/soft_wpmi formed every image's P row already: reuse, no second N×M×D product
        img_top = first.image_top_concepts.cpu().numpy()
        img_sims = first.image_top_sims.float().cpu().numpy()
        lse = first.image_lse.float().cpu().numpy()
    else:
        with _stage(times, "scoring"):
            img_top, img_sims, lse = image_concept_summary(
                image_emb, concept_emb, _softmax_temperature(similarity, hp)
            )
    with _stage(times, "write"):
        writer.write_image_concepts(run_id, image_ids, concept_ids[img_top], img_sims)
        writer.write_image_softmax(run_id, image_ids, lse)
    return summaries


def _reuse_concept_embeddings(path: Path, clip_key: str, texts: list[str]) -> dict[str, np.ndarray]:
    """Embeddings of these texts from an existing cache at path (same text tower), if any."""
    if not path.exists():
        return {}
    try:
        with open_cache(path) as old:
            return old.embeddings_by_text(clip_key, texts)
    except CacheError:
        return {}


# -- index ------------------------------------------------------------------------------
def run_index(settings: IndexSettings, progress: ProgressSink | None = None) -> IndexResult:
    from dissect_tui.clip_backend import load_clip
    from dissect_tui.fast_decode import DecodeStats, iter_device_batches, plan_decode
    from dissect_tui.probe import iter_batches, resolve_probe
    from dissect_tui.targets import (
        LayerRecorder,
        check_target_spec,
        final_linear,
        load_target,
        resolve_layers,
    )

    progress = progress or NullProgress()
    times: dict[str, float] = {}
    notes: list[str] = []
    s = settings
    if s.pool not in ("mean", "max"):
        raise UserError(f"unknown pooling {s.pool!r}: use mean or max")
    check_similarity(s.similarity)
    hp = _hyperparameters(s.similarity, s.hyperparameters)
    check_cutoff(s.cutoff)
    check_top_n("--top-images", s.top_images)
    check_top_n("--top-concepts", s.top_concepts)
    check_template(s.template)
    if s.batch_size is not None:
        check_top_n("--batch-size", s.batch_size)
    device = resolve_device(s.device)
    precision = resolve_precision(s.precision, device)
    final_path = s.db_path()
    check_target(final_path)

    # Cheap validation first, so a typo fails before minutes of model loading.
    with _stage(times, "setup"):
        concept_set: ConceptSet = load_concepts(s.concepts)
        if (msg := concept_set.describe_dropped()) is not None:
            progress.note(msg)
            notes.append(msg)
        check_target_spec(s.model, s.weights)  # before a probe download can fail first
        probe = resolve_probe(s.probe, Path(s.cache_dir))
        for msg in probe.notes:
            progress.note(msg)
            notes.append(msg)
        target = load_target(s.model, s.weights)
        layers = resolve_layers(target.model, s.layers, target.default_layers)
        clip_model = load_clip(s.clip, device=str(device), precision=precision)
        for msg in clip_model.notes:
            progress.note(msg)
            notes.append(msg)
        transforms = [target.preprocess, clip_model.preprocess]
        decode_plan, decode_notes = plan_decode(s.decode, device, transforms)
        for msg in decode_notes:
            progress.note(msg)
            notes.append(msg)
    decode_used = "cpu" if decode_plan is None else decode_plan.mode
    decode_stats = DecodeStats()

    batch_size = s.batch_size or (256 if device.type == "cuda" else 32)
    workers = (
        s.workers if s.workers is not None else min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    )
    model = target.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # -- images: one decode, both forwards ---------------------------------------------
    n = len(probe)
    acts_chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    emb_chunks: list[torch.Tensor] = []
    ok_chunks: list[torch.Tensor] = []
    thumbs: dict[int, bytes] = {}
    sizes: list[tuple[int, int] | None] = [None] * n
    errors: list[str | None] = [None] * n
    layer_shapes: dict[str, str] = {}
    progress.start("images", n, "img")
    with (
        _stage(times, "images"),
        LayerRecorder(model, layers, pool=s.pool) as recorder,
        torch.inference_mode(),
    ):

        def forward(x_t: torch.Tensor, x_c: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            try:
                with _autocast(device, precision):
                    model(x_t)
                out = {k: v.float() for k, v in recorder.pop().items()}
                return out, clip_model.encode_images(x_c)
            except torch.OutOfMemoryError:
                if x_t.shape[0] == 1:
                    raise UserError("out of GPU memory even with batch size 1; use --device cpu") from None
                torch.cuda.empty_cache()
                half = x_t.shape[0] // 2
                progress.note(f"CUDA out of memory: retrying with batches of {half}")
                a1, e1 = forward(x_t[:half], x_c[:half])
                a2, e2 = forward(x_t[half:], x_c[half:])
                return {k: torch.cat([a1[k], a2[k]]) for k in a1}, torch.cat([e1, e2])

        if decode_plan is None:
            batches = iter_batches(
                probe, transforms, batch_size=batch_size, workers=workers, thumbnail_px=s.thumbnail_px
            )
        else:  # JPEGs decoded and preprocessed on the device; workers only read files
            # --decode auto: if the device path fails, the rest of the run decodes with PIL
            batches = iter_device_batches(
                probe,
                transforms,
                decode_plan,
                batch_size,
                workers,
                s.thumbnail_px,
                decode_stats,
                note=lambda msg: (progress.note(msg), notes.append(msg)),
            )
        for batch in batches:
            ids = batch.indices
            for j, i in enumerate(ids.tolist()):
                sizes[i] = batch.sizes[j]
                errors[i] = batch.errors[j]
                if batch.thumbnails[j] is not None:
                    thumbs[i] = batch.thumbnails[j]
            ok = batch.ok
            if bool(ok.any()):
                x_t, x_c = batch.inputs
                if not bool(ok.all()):
                    keep = ok.nonzero().squeeze(1)
                    x_t, x_c = x_t[keep], x_c[keep]
                x_t = x_t.to(device, non_blocking=True)  # no-op for the device decode path
                x_c = x_c.to(device, non_blocking=True)
                if device.type == "cuda":
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                acts, emb = forward(x_t, x_c)
                for layer in layers:
                    acts_chunks[layer].append(acts[layer])
                emb_chunks.append(emb.float())
                ok_chunks.append(ids[ok])
            progress.advance("images", len(ids))
    progress.finish("images")
    if decode_plan is not None:
        msg = f"decode: {decode_plan.label}; {decode_stats.summary()}"
        progress.note(msg)
        notes.append(msg)

    ok_ids = torch.cat(ok_chunks).numpy() if ok_chunks else np.empty(0, dtype=np.int64)
    n_failed = n - len(ok_ids)
    failed = [(probe[i].path, errors[i] or "unknown error") for i in range(n) if errors[i] is not None]
    if len(ok_ids) == 0:
        raise UserError(
            f"none of the {n} probe images could be decoded (first: {failed[0][0]}: {failed[0][1]})"
        )
    if len(ok_ids) < 2:
        raise UserError("at least 2 decodable probe images are needed")
    acts_all = {layer: torch.cat(acts_chunks[layer]) for layer in layers}
    del acts_chunks
    for layer in layers:
        raw = recorder.output_shapes.get(layer)
        layer_shapes[layer] = str(list(raw if raw is not None else acts_all[layer].shape[1:]))
    image_emb = torch.cat(emb_chunks)
    del emb_chunks

    # -- concepts -------------------------------------------------------------------------
    texts = concept_set.texts
    encoder = TextEncoder(clip_model, s.template)
    clip_key = encoder.key
    with _stage(times, "concepts"):
        cached = _reuse_concept_embeddings(final_path, clip_key, texts)
        concept_emb_np, n_encoded = encode_concepts(texts, cached, encoder, progress)
    if n_encoded < len(texts):
        notes.append(f"reused {len(texts) - n_encoded} concept embeddings from {final_path}")
    concept_emb = torch.from_numpy(concept_emb_np).to(device)

    # -- scoring + write ------------------------------------------------------------------
    with CacheWriter(final_path) as writer:
        with _stage(times, "write"):
            run_id = writer.add_run(
                kind="index",
                target=s.model,
                target_weights=target.weights,
                clip_model=clip_model.name,
                clip_pretrained=clip_model.pretrained,
                clip_key=clip_key,
                template=encoder.template,
                probe=list(s.probe),
                n_images=n,
                n_failed_images=n_failed,
                concept_set=concept_set.name,
                n_concepts=len(texts),
                layers=layers,
                pool=s.pool,
                similarity=s.similarity,
                hyperparameters=hp,
                cutoff=s.cutoff,
                device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                precision=precision,
                batch_size=batch_size,
                settings={
                    **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                    "decode_used": decode_used,
                },
            )
            writer.write_layers(
                [
                    {
                        "layer": layer,
                        "n_units": acts_all[layer].shape[1],
                        "module_type": type(target.model.get_submodule(layer)).__name__,
                        "output_shape": layer_shapes[layer],
                        "pool": s.pool,
                    }
                    for layer in layers
                ]
            )
            writer.write_images([it.path for it in probe], [it.source for it in probe], sizes, errors)
            concept_ids = writer.concept_ids(texts)
            writer.write_run_concepts(run_id, concept_ids)
            writer.write_concept_embeddings(clip_key, concept_ids, concept_emb_np)
            writer.write_image_embeddings(ok_ids, image_emb.cpu().numpy())

        thumb_ids: set[int] = set()
        progress.start("top images", len(layers), "layers")
        for layer in layers:
            with _stage(times, "scoring"):
                idx, vals = scoring.top_images(acts_all[layer], n=min(s.top_images, len(ok_ids)))
                idx_np = ok_ids[idx.cpu().numpy()]
            with _stage(times, "write"):
                writer.write_activations(layer, ok_ids, acts_all[layer].cpu().numpy())
                writer.write_top_images(layer, idx_np, vals.cpu().numpy())
            thumb_ids.update(idx_np[:, : s.thumbnail_top].reshape(-1).tolist())
            progress.advance("top images", 1)
        progress.finish("top images")

        summaries = _score_and_write(
            writer,
            run_id,
            layers,
            lambda layer: acts_all[layer],
            ok_ids,
            image_emb,
            concept_emb,
            concept_ids,
            texts,
            s.similarity,
            hp,
            s.cutoff,
            s.top_concepts,
            progress,
            times,
            device,
        )
        with _stage(times, "write"):
            writer.write_thumbnails({i: thumbs[i] for i in sorted(thumb_ids) if i in thumbs})
            linear = final_linear(target)
            if linear is not None and target.final_layer in layers:
                w, b = linear
                input_layer = target.final_layer_input if target.final_layer_input in layers else None
                writer.write_linear_weights(
                    target.final_layer,
                    input_layer,
                    w.detach().float().cpu().numpy(),
                    None if b is None else b.detach().float().cpu().numpy(),
                )
            stage_seconds = {k: round(v, 3) for k, v in times.items()}
            writer.update_run(run_id, stage_seconds=stage_seconds)
            writer.commit()
    ips = n / times["images"] if times.get("images") else None
    return IndexResult(
        path=final_path,
        run_id=run_id,
        n_images=n,
        n_failed=n_failed,
        failed_examples=failed[:5],
        layers=summaries,
        stage_seconds={k: round(v, 3) for k, v in times.items()},
        images_per_second=ips,
        notes=notes,
        n_concepts_encoded=n_encoded,
    )


# -- relabel ------------------------------------------------------------------------------
@dataclass
class RelabelSettings:
    db: Path
    similarity: str | None = None  # default: the previous run's
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    cutoff: float | None = None
    concepts: str | None = None  # default: the previous run's concept set
    clip: str | None = None  # where the run's CLIP text weights are on this machine
    template: str | None = None
    top_concepts: int = 100
    device: str = "auto"
    run: int | None = None  # base run; default the latest


def run_relabel(settings: RelabelSettings, progress: ProgressSink | None = None) -> IndexResult:
    """A new run from stored activations and embeddings; no image is read again."""
    from dissect_tui.clip_backend import load_clip

    progress = progress or NullProgress()
    times: dict[str, float] = {}
    notes: list[str] = []
    s = settings
    device = resolve_device(s.device)
    with open_cache(s.db) as check:  # validates the file with clear errors before copying it
        base = check.run(s.run)
    similarity = s.similarity or base["similarity"]
    check_similarity(similarity)
    same_method = similarity == base["similarity"]
    hp = _hyperparameters(
        similarity, {**(base["hyperparameters"] if same_method else {}), **s.hyperparameters}
    )
    cutoff = base["cutoff"] if s.cutoff is None else s.cutoff
    check_cutoff(cutoff)
    check_top_n("--top-concepts", s.top_concepts)
    check_template(s.template)
    concept_spec = s.concepts
    if concept_spec is not None:
        concept_set = load_concepts(concept_spec)
    else:
        concept_set = None
    if concept_set is not None and (msg := concept_set.describe_dropped()):
        progress.note(msg)
        notes.append(msg)

    with CacheWriter(s.db, base=s.db) as writer:
        reader = CacheReader(writer.con, s.db)
        index_run = reader.index_run(base["run_id"])
        if concept_set is None:
            _, texts = reader.run_concepts(base["run_id"])
            set_name = base["concept_set"]
        else:
            texts, set_name = concept_set.texts, concept_set.name
        template = s.template if s.template is not None else base.get("template")
        tower = tower_key(index_run["clip_key"], index_run.get("template"))

        def load_text_tower():
            spec = s.clip or f"{index_run['clip_model']}:{index_run['clip_pretrained']}"
            try:
                return load_clip(spec, device=str(device), precision="fp32")
            except UserError as exc:
                raise UserError(
                    f"{len(texts)} concepts need the CLIP text tower ({spec}): {exc} "
                    "(pass --clip NAME:/path/to/checkpoint for a local copy)"
                ) from None

        encoder = TextEncoder(load_text_tower, template, tower=tower)
        clip_key = encoder.key
        with _stage(times, "concepts"):
            cached = reader.embeddings_by_text(clip_key, texts)
            stored = set(cached)  # encode_concepts adds the new texts to cached
            concept_emb_np, n_encoded = encode_concepts(texts, cached, encoder, progress)
        if n_encoded:
            notes.append(f"encoded {n_encoded} new concept texts")
        with _stage(times, "write"):
            image_ids, image_emb_np = reader.image_embeddings()
            layers = [info.layer for info in reader.layers()]
            run_id = writer.add_run(
                kind="relabel",
                parent_run_id=base["run_id"],
                **{
                    k: index_run[k]
                    for k in (
                        "target",
                        "target_weights",
                        "clip_model",
                        "clip_pretrained",
                        "probe",
                        "n_images",
                        "n_failed_images",
                        "pool",
                        "precision",
                    )
                },
                clip_key=clip_key,
                template=encoder.template,
                concept_set=set_name,
                n_concepts=len(texts),
                layers=layers,
                similarity=similarity,
                hyperparameters=hp,
                cutoff=cutoff,
                device=str(device),
                settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            )
            concept_ids = writer.concept_ids(texts)
            writer.write_run_concepts(run_id, concept_ids)
            if n_encoded:
                new = np.array([t not in stored for t in texts], dtype=bool)
                writer.write_concept_embeddings(clip_key, concept_ids[new], concept_emb_np[new])
        image_emb = torch.from_numpy(image_emb_np).to(device)
        concept_emb = torch.from_numpy(concept_emb_np).to(device)

        def get_acts(layer: str) -> torch.Tensor:
            ids, acts = reader.layer_activations(layer)
            if not np.array_equal(ids, image_ids):
                raise CacheError(
                    f"activations of {layer} and image embeddings disagree on images; rebuild the cache"
                )
            return torch.from_numpy(acts)

        summaries = _score_and_write(
            writer,
            run_id,
            layers,
            get_acts,
            image_ids,
            image_emb,
            concept_emb,
            concept_ids,
            texts,
            similarity,
            hp,
            cutoff,
            s.top_concepts,
            progress,
            times,
            device,
        )
        with _stage(times, "write"):
            writer.update_run(run_id, stage_seconds={k: round(v, 3) for k, v in times.items()})
            writer.commit()
    return IndexResult(
        path=Path(s.db),
        run_id=run_id,
        n_images=int(index_run["n_images"] or 0),
        n_failed=int(index_run["n_failed_images"] or 0),
        failed_examples=[],
        layers=summaries,
        stage_seconds={k: round(v, 3) for k, v in times.items()},
        notes=notes,
        n_concepts_encoded=n_encoded,
    )
