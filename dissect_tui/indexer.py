"""The CLIP-Dissect pipeline: probe images -> activations + embeddings -> scores -> one DuckDB cache.

``run_index`` and ``run_relabel`` read as their stages; each stage is a function with a typed
result, timed by a StageClock and reported through a ProgressSink (never printed here):

  setup     settings checked, concept set, probe, target network, CLIP loaded   -> IndexSetup
  images    every probe image decoded once, target + CLIP image tower           -> ImagePass
  concepts  CLIP text tower over texts without a stored embedding                -> [M, D] array
  scoring   similarity of every neuron and concept, never N×M in memory          -> RunScores
  write     everything into a temporary DuckDB file, renamed into place at the end

`relabel` reruns only `concepts` (for new texts), `scoring` and `write` from a cache.
This module imports no UI code.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from dissect_tui import scoring
from dissect_tui.activation_stats import LayerStats, LayerStatsBuilder
from dissect_tui.concepts import ConceptSet, load_concepts
from dissect_tui.embedding_source import EmbeddingSource, open_embedding_source
from dissect_tui.errors import CacheError, UserError
from dissect_tui.image_pass import ActivationSink, ImagePass, ImageTicks, ThumbnailSpool, record_images
from dissect_tui.methods import get_method
from dissect_tui.progress import NullProgress, ProgressSink, StageClock
from dissect_tui.runtime import device_label, resolve_device, resolve_precision
from dissect_tui.settings import (
    BATCH_SIZE_ACCELERATOR,
    BATCH_SIZE_CPU,
    DEFAULT_CLIP,
    IndexSettings,
    RelabelSettings,
    check_cutoff,
    resolve_cutoff,
    uncalibrated_cutoff_note,
)
from dissect_tui.store import CacheWriter, open_cache
from dissect_tui.store.carry_over import carry_over
from dissect_tui.store.compositions import stored_composition_count
from dissect_tui.store.reader import CacheReader
from dissect_tui.store.writer import check_target
from dissect_tui.text_encoding import TextEncoder, tower_key

__all__ = [
    "IndexResult",
    "IndexSettings",
    "LayerSummary",
    "NullProgress",
    "ProgressSink",
    "RelabelSettings",
    "run_index",
    "run_relabel",
]

IMAGE_CONCEPTS_TOP = 5  # best concepts stored per image (image_concepts), for SQL and the browser


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
    kind: str  # "index" or "relabel" (which reads no image)
    n_images: int
    n_failed: int
    failed_examples: list[tuple[str, str]]
    layers: list[LayerSummary]
    stage_seconds: dict[str, float]
    images_per_second: float | None = None
    notes: list[str] = field(default_factory=list)  # already shown live through ProgressSink.note
    n_concepts_encoded: int = 0  # texts that went through the text tower (0: all reused)

    def stage_rates(self) -> dict[str, str]:
        """Throughput of the stages that have a natural unit: images read, texts encoded."""
        rates = {}
        seconds = self.stage_seconds
        if self.kind == "index" and self.n_images and seconds.get("images", 0) > 0:
            rates["images"] = f"{self.n_images / seconds['images']:,.0f} img/s"
        if self.n_concepts_encoded and seconds.get("concepts", 0) > 0:
            rates["concepts"] = f"{self.n_concepts_encoded / seconds['concepts']:,.0f} texts/s"
        return rates


# -- concepts -------------------------------------------------------------------------------
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


def _replacement_note(path: Path) -> str | None:
    """What an index onto an existing cache will drop, said before any work starts."""
    if not path.exists():
        return None
    try:
        with open_cache(path) as old:
            runs = old.runs()
            n_metrics = int(old.query("SELECT count(*) FROM metrics")[1][0][0])
            n_comps = stored_composition_count(old.con)
    except CacheError:
        return None  # check_target already refused what must not be replaced
    relabels = sum(1 for r in runs if r.get("kind") != "index")
    if not relabels and not n_metrics and not n_comps:
        return None
    kept = []
    if relabels:
        kept.append(f"{relabels} relabel run{'s' if relabels != 1 else ''}")
    if n_metrics:
        kept.append(f"{n_metrics} stored metric{'s' if n_metrics != 1 else ''}")
    if n_comps:
        kept.append(f"{n_comps} stored composition{'s' if n_comps != 1 else ''}")
    return (
        f"{path} will be replaced when this index finishes: its {' and '.join(kept)} are kept only if "
        "this index reproduces the images, embeddings and activations they were computed from (same "
        "model, weights and probe), otherwise dropped (copy the file first, or give another --db)"
    )


def _reuse_concept_embeddings(path: Path, key: str, texts: list[str]) -> dict[str, np.ndarray]:
    """Embeddings of these texts from an existing cache at path (same tower and template), if any."""
    if not path.exists():
        return {}
    try:
        with open_cache(path) as old:
            return old.embeddings_by_text(key, texts)
    except CacheError:
        return {}


# -- scoring --------------------------------------------------------------------------------
@dataclass
class RunScores:
    """Per layer: each neuron's best concepts (indices into the run's texts) and scores, [K, T];
    per image: its best concepts by cosine and its softmax normaliser."""

    layers: dict[str, tuple[np.ndarray, np.ndarray]]
    image_top: np.ndarray  # [N, IMAGE_CONCEPTS_TOP]
    image_sims: np.ndarray  # [N, IMAGE_CONCEPTS_TOP]
    image_lse: np.ndarray  # [N]

    def labels_scores(self) -> np.ndarray:
        """Every neuron's label score (its best concept's), all layers."""
        return np.concatenate([top_s[:, 0] for _, top_s in self.layers.values()])


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


def score_run(
    acts: Mapping[str, torch.Tensor | LayerStats],
    image_emb: torch.Tensor,
    concept_emb: torch.Tensor,
    similarity: str,
    hp: dict[str, Any],
    top_concepts: int,
    progress: ProgressSink,
    image_ids: np.ndarray | None = None,
) -> RunScores:
    """All layers in one call: wpmi/soft_wpmi then share a single pass over the images' P rows,
    which also yields every image's best concepts and softmax normaliser."""
    progress.start("scoring", None, "steps")
    results = scoring.score_layers(
        acts,
        image_emb,
        concept_emb,
        method=similarity,
        top_concepts=min(top_concepts, concept_emb.shape[0]),
        on_progress=lambda done, total: progress.update("scoring", done, total),
        image_top=IMAGE_CONCEPTS_TOP,
        image_ids=image_ids,
        **hp,
    )
    progress.finish("scoring")
    layers = {
        name: (r.top_concepts.cpu().numpy(), r.top_scores.float().cpu().numpy())
        for name, r in results.items()
    }
    first = next(iter(results.values()))
    if (
        first.image_top_concepts is not None
        and first.image_top_sims is not None
        and first.image_lse is not None
    ):
        image = (
            first.image_top_concepts.cpu().numpy(),
            first.image_top_sims.float().cpu().numpy(),
            first.image_lse.float().cpu().numpy(),
        )
    else:  # cos, rank_reorder form no P rows
        a = get_method(similarity).softmax_scale(hp)
        image = image_concept_summary(image_emb, concept_emb, a)
    return RunScores(layers, *image)


def summarize_layer(layer: str, labels: list[str], scores: np.ndarray, cutoff: float) -> LayerSummary:
    return LayerSummary(
        layer=layer,
        n_units=len(labels),
        n_interpretable=int((scores > cutoff).sum()),
        common_labels=Counter(labels).most_common(3),
    )


def write_scores(
    writer: CacheWriter,
    run_id: int,
    scores: RunScores,
    texts: list[str],
    concept_ids: np.ndarray,
    image_ids: np.ndarray,
    cutoff: float,
) -> list[LayerSummary]:
    """neurons, neuron_concepts, image_concepts and image_softmax of one run."""
    summaries = []
    for layer, (top_c, top_s) in scores.layers.items():
        labels = [texts[i] for i in top_c[:, 0]]
        writer.write_neurons(run_id, layer, labels, concept_ids[top_c[:, 0]], top_s[:, 0], cutoff)
        writer.write_neuron_concepts(run_id, layer, concept_ids[top_c], top_s)
        summaries.append(summarize_layer(layer, labels, top_s[:, 0], cutoff))
    writer.write_image_concepts(run_id, image_ids, concept_ids[scores.image_top], scores.image_sims)
    writer.write_image_softmax(run_id, image_ids, scores.image_lse)
    return summaries


# -- index ------------------------------------------------------------------------------
@dataclass
class IndexSetup:
    """The setup stage's result: inputs resolved and models loaded, nothing computed yet."""

    concept_set: ConceptSet
    probe: Any  # probe.ProbeSet
    target: Any  # targets.Target
    layers: list[str]
    clip_model: Any  # clip_backend.ClipModel; None with --embeddings-from (CLIP is not loaded)
    source: EmbeddingSource | None  # --embeddings-from: the cache the embeddings come from
    decode_plan: Any  # fast_decode plan, None for the PIL loader
    device: torch.device
    precision: str
    batch_size: int
    workers: int


def prepare_index(s: IndexSettings, clock: StageClock) -> IndexSetup:
    """Cheap checks first (concepts, model name, probe) so a typo fails before minutes of loading."""
    from dissect_tui.clip_backend import load_clip
    from dissect_tui.fast_decode import plan_decode
    from dissect_tui.probe import resolve_probe
    from dissect_tui.targets import check_target_spec, load_target, resolve_layers

    device = resolve_device(s.device)
    precision = resolve_precision(s.precision, device)
    concept_set = load_concepts(s.concepts)
    clock.note(concept_set.describe_dropped())
    check_target_spec(s.model, s.weights)  # before a probe download can fail first
    probe = resolve_probe(s.probe, Path(s.cache_dir))
    for msg in probe.notes:
        clock.note(msg)
    source = open_embedding_source(s.embeddings_from, probe) if s.embeddings_from else None
    target = load_target(s.model, s.weights)
    layers = resolve_layers(target.model, s.layers, target.default_layers)
    clip_model = None
    if source is None:
        clip_model = load_clip(s.clip or DEFAULT_CLIP, device=str(device), precision=precision)
        for msg in clip_model.notes:
            clock.note(msg)
    decode_plan, decode_notes = plan_decode(s.decode, device, _transforms(target, clip_model))
    for msg in decode_notes:
        clock.note(msg)
    accelerated = device.type != "cpu"
    batch_size = s.batch_size or (BATCH_SIZE_ACCELERATOR if accelerated else BATCH_SIZE_CPU)
    workers = s.workers if s.workers is not None else (min(8, os.cpu_count() or 1) if accelerated else 0)
    target.model.to(device).eval()
    if device.type == "cuda":
        # Module.to(memory_format=) is typed only in newer torch stubs (it works since 1.5)
        cast(Any, target.model).to(memory_format=torch.channels_last)
    return IndexSetup(
        concept_set,
        probe,
        target,
        layers,
        clip_model,
        source,
        decode_plan,
        device,
        precision,
        batch_size,
        workers,
    )


def _transforms(target: Any, clip_model: Any) -> list[Any]:
    """Per image: the target's input, and CLIP's when CLIP runs here."""
    return [target.preprocess] if clip_model is None else [target.preprocess, clip_model.preprocess]


def _text_encoder(s: IndexSettings, setup: IndexSetup) -> TextEncoder:
    """The run's concept encoder; with --embeddings-from its CLIP loads only for missing concepts."""
    if setup.source is None:
        return TextEncoder(setup.clip_model, s.template)
    from dissect_tui.clip_backend import load_clip

    source, spec = setup.source, s.clip or setup.source.clip_spec

    def load() -> Any:
        try:
            clip = load_clip(spec, device=str(setup.device), precision=setup.precision)
        except UserError as exc:
            raise UserError(
                f"concepts missing from {source.path} need its CLIP text tower ({spec}): {exc} "
                "(pass --clip NAME:/path/to/checkpoint, or a concept set the other cache has)"
            ) from None
        if clip.key != source.tower:
            raise UserError(f"--clip {spec} is not the CLIP that built {source.path} ({source.tower})")
        return clip

    return TextEncoder(load, s.template, tower=source.tower)


def _image_batches(
    setup: IndexSetup,
    s: IndexSettings,
    stats: Any,
    clock: StageClock,
    order: list[int] | None = None,
    ticks: ImageTicks | None = None,
) -> Iterator[Any]:
    """Batches of decoded probe images: PIL in loader workers, or JPEGs decoded on the device."""
    from dissect_tui.fast_decode import iter_device_batches
    from dissect_tui.probe import iter_batches

    transforms = _transforms(setup.target, setup.clip_model)
    if setup.decode_plan is None:
        return iter_batches(
            setup.probe,
            transforms,
            setup.batch_size,
            setup.workers,
            s.thumbnail_px,
            order=order,
            on_image=None if ticks is None else ticks.tick,
        )
    # --decode auto: if the device path fails, the rest of the run decodes with PIL (one note)
    return iter_device_batches(
        setup.probe,
        transforms,
        setup.decode_plan,
        setup.batch_size,
        setup.workers,
        s.thumbnail_px,
        stats,
        note=clock.note,
        order=order,
    )


def stats_builder(
    similarity: str, hp: Mapping[str, Any], n_images: int, device: torch.device, keep: int = 1
) -> Callable[[str, int, int], LayerStatsBuilder]:
    """How much of each layer is kept instead of its activations: ``keep`` top images (what the
    cache stores), what the method reads (wpmi/soft_wpmi: top_k; rank_reorder: top_fraction of
    the images), and Σa·I and Σa² for cos. ``n_images``: an upper bound of the images scored."""
    n_keep = keep
    if get_method(similarity).uses_softmax:
        n_keep = max(n_keep, min(int(hp["top_k"]), n_images))
    elif similarity == "rank_reorder":
        n_keep = max(n_keep, max(2, int(n_images * float(hp["top_fraction"]))))
    n_keep = min(n_keep, max(1, n_images))
    cross = similarity == "cos"

    def make(layer: str, n_units: int, embed_dim: int) -> LayerStatsBuilder:
        return LayerStatsBuilder(n_units, n_keep, embed_dim=embed_dim if cross else None, device=device)

    return make


LARGE_CACHE_BYTES = 256 << 20  # from this size on the expected size is announced


def expected_activation_bytes(n_images: int, n_neurons: int) -> int:
    """Activations dominate a cache: 4 bytes per image and neuron, plus DuckDB's ~4 % of overhead
    (measured by bench/bench_scale.py)."""
    return int(n_images * n_neurons * 4 * 1.04)


def check_space(folder: Path, n_images: int, n_neurons: int, clock: StageClock) -> None:
    """Announce a large cache and refuse one that cannot fit on the disk, before it is written."""
    import shutil

    need = expected_activation_bytes(n_images, n_neurons)
    if need < LARGE_CACHE_BYTES:
        return
    clock.note(
        f"the cache will hold about {need / 2**30:,.1f} GiB of activations "
        f"({n_images:,} images × {n_neurons:,} neurons), written as the images are read"
    )
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise UserError(
            f"{folder} has {free / 2**30:,.1f} GiB free but the cache needs about {need / 2**30:,.1f} GiB: "
            "free some space, choose another --db, or record fewer layers (--layers)"
        )


def run_images(
    setup: IndexSetup,
    s: IndexSettings,
    hp: Mapping[str, Any],
    sink: ActivationSink,
    folder: Path,
    clock: StageClock,
    order: list[int] | None = None,
) -> tuple[ImagePass, str]:
    """The images stage, and how images were decoded ("cpu", "gpu", "gpu, then cpu" …).
    Activations go to ``sink`` as they are produced; thumbnails wait in a spool in ``folder``.
    ``order``: a torchrun rank's share of the probe (then fewer than 2 images is no error here)."""
    from dissect_tui.fast_decode import DecodeStats

    stats = DecodeStats()
    ticks = ImageTicks(clock.progress)  # in-process decoding moves the bar image by image
    batches = _image_batches(setup, s, stats, clock, order, ticks)
    make = stats_builder(
        s.similarity, hp, len(setup.probe), setup.device, keep=max(s.top_images, s.thumbnail_top)
    )
    widths: dict[str, int] = {}

    def builder(layer: str, n_units: int, embed_dim: int) -> LayerStatsBuilder:
        widths[layer] = n_units
        if len(widths) == len(setup.layers):  # every width known after the first batch
            check_space(folder, len(setup.probe), sum(widths.values()), clock)
        return make(layer, n_units, embed_dim)

    source = setup.source
    images = record_images(
        setup.probe,
        batches,
        setup.target.model,
        setup.layers,
        s.pool,
        setup.clip_model,
        setup.device,
        setup.precision,
        clock.progress,
        builder=builder,
        sink=sink,
        thumbnails=ThumbnailSpool(folder),
        embeddings_of=None if source is None else lambda ids: torch.from_numpy(source.images(ids)),
        share=None if order is None else len(order),
        minimum=2 if order is None else 0,
        ticks=ticks,
    )
    decode_used = "cpu"
    if setup.decode_plan is not None:
        clock.note(f"decode: {setup.decode_plan.label}; {stats.summary()}")
        decode_used = setup.decode_plan.mode + (", then cpu" if stats.fallback else "")
    return images, decode_used


def index_run_record(
    s: IndexSettings,
    setup: IndexSetup,
    images: ImagePass,
    encoder: TextEncoder,
    hp: dict[str, Any],
    cutoff: float,
    decode_used: str,
) -> dict[str, Any]:
    """The runs row of an index run (stage_seconds are added at the end)."""
    from dissect_tui.cpu_kernel import active_path

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    settings["decode_used"] = decode_used
    settings["scoring_path"] = active_path(setup.device)  # the C kernel or eager torch: same numbers
    if setup.source is not None:  # where the image and concept embeddings came from
        settings["embeddings_source"] = {
            "path": str(setup.source.path.resolve()),
            "run_id": setup.source.run["run_id"],
            "clip_key": setup.source.tower,
        }
    return {
        "kind": "index",
        "target": s.model,
        "target_weights": setup.target.weights,
        "clip_model": setup.clip_model.name if setup.source is None else setup.source.run["clip_model"],
        "clip_pretrained": (
            setup.clip_model.pretrained if setup.source is None else setup.source.run["clip_pretrained"]
        ),
        "clip_key": encoder.key,
        "template": encoder.template,
        "probe": list(s.probe),
        "n_images": images.n_listed,
        "n_failed_images": images.n_failed,
        "concept_set": setup.concept_set.name,
        "n_concepts": len(setup.concept_set.texts),
        "layers": setup.layers,
        "pool": s.pool,
        "similarity": s.similarity,
        "hyperparameters": hp,
        "cutoff": cutoff,
        "device": device_label(setup.device),
        "precision": setup.precision,
        "batch_size": setup.batch_size,
        "settings": settings,
    }


def write_probe_data(
    writer: CacheWriter,
    run_id: int,
    setup: IndexSetup,
    images: ImagePass,
    encoder: TextEncoder,
    concept_emb: np.ndarray,
    pool: str,
) -> np.ndarray:
    """layers, images, concepts and embeddings of an index run; returns the run's concept ids."""
    model = setup.target.model
    writer.write_layers(
        [
            {
                "layer": layer,
                "n_units": images.n_units[layer],
                "module_type": type(model.get_submodule(layer)).__name__,
                "output_shape": images.layer_shapes[layer],
                "pool": pool,
            }
            for layer in setup.layers
        ]
    )
    writer.write_images(
        [it.path for it in setup.probe], [it.source for it in setup.probe], images.sizes, images.errors
    )
    concept_ids = writer.concept_ids(setup.concept_set.texts)
    writer.write_run_concepts(run_id, concept_ids)
    writer.write_concept_embeddings(encoder.key, concept_ids, concept_emb)
    writer.write_image_embeddings(images.ok_ids, images.image_emb.cpu().numpy())
    return concept_ids


def write_top_images(writer: CacheWriter, images: ImagePass, layers: list[str], s: IndexSettings) -> set[int]:
    """Each neuron's top images (the activations went to the cache during the images stage);
    returns the image ids whose thumbnails are worth keeping (some neuron's top ``thumbnail_top``)."""
    thumb_ids: set[int] = set()
    n = min(s.top_images, len(images.ok_ids))
    for layer in layers:
        st = images.stats[layer]
        ids = st.top_ids[:, :n].cpu().numpy()
        writer.write_top_images(layer, ids, st.top_vals[:, :n].float().cpu().numpy())
        thumb_ids.update(ids[:, : s.thumbnail_top].reshape(-1).tolist())
    return thumb_ids


def _note_scoring_path(device: torch.device, clock: StageClock) -> None:
    """Say so when a CPU run cannot use the compiled kernel (it is then several times slower)."""
    if device.type == "cpu":
        from dissect_tui.cpu_kernel import kernel_note

        clock.note(kernel_note())


def write_classifier(writer: CacheWriter, target: Any, layers: list[str]) -> None:
    """The final linear layer's weights, when it is recorded (for `analyze`)."""
    from dissect_tui.targets import final_linear

    linear = final_linear(target)
    if linear is None or target.final_layer not in layers:
        return
    w, b = linear
    input_layer = target.final_layer_input if target.final_layer_input in layers else None
    writer.write_linear_weights(
        target.final_layer,
        input_layer,
        w.detach().float().cpu().numpy(),
        None if b is None else b.detach().float().cpu().numpy(),
    )


@dataclass
class IndexPlan:
    """What every stage after setup needs to know about the run."""

    settings: IndexSettings
    hp: dict[str, Any]
    cutoff: float
    calibrated: bool  # cutoff chosen for this method's scale
    final_path: Path


def plan_index(s: IndexSettings, clock: StageClock) -> IndexPlan:
    """Every check that needs no model; takes the cache's write lock (check_target)."""
    hp = s.validate()
    cutoff, calibrated = resolve_cutoff(s.similarity, s.cutoff)
    final_path = s.db_path()
    check_target(final_path)
    clock.note(_replacement_note(final_path))
    return IndexPlan(s, dict(hp), cutoff, calibrated, final_path)


def finish_index(
    plan: IndexPlan,
    setup: IndexSetup,
    images: ImagePass,
    decode_used: str,
    writer: CacheWriter,
    clock: StageClock,
    thumbnails_of: Callable[[set[int]], dict[int, bytes]],
) -> IndexResult:
    """Everything after the images stage: concepts, scoring, the cache's other tables, commit.

    ``images`` holds the whole probe's results (a torchrun run merged them); ``thumbnails_of``
    returns the JPEGs of the chosen image ids, wherever they were decoded."""
    s, hp = plan.settings, plan.hp
    writer.end_stream()  # every activation is in the cache
    texts = setup.concept_set.texts
    encoder = _text_encoder(s, setup)
    with clock("concepts"):
        cached = _reuse_concept_embeddings(plan.final_path, encoder.key, texts)
        if setup.source is not None:
            cached.update(setup.source.concepts(encoder.template, texts))
        concept_emb, n_encoded = encode_concepts(texts, cached, encoder, clock.progress)
    if n_encoded < len(texts):
        origin = setup.source.path if setup.source is not None else plan.final_path
        clock.note(f"reused {len(texts) - n_encoded} concept embeddings from {origin}")
    with clock("write"):
        record = index_run_record(s, setup, images, encoder, hp, plan.cutoff, decode_used)
        run_id = writer.add_run(**record)
        _note_scoring_path(setup.device, clock)
        concept_ids = write_probe_data(writer, run_id, setup, images, encoder, concept_emb, s.pool)
        thumb_ids = write_top_images(writer, images, setup.layers, s)
    with clock("scoring"):
        concept_t = torch.from_numpy(concept_emb).to(setup.device)
        image_emb = images.image_emb.to(setup.device)
        scores = score_run(
            images.stats,
            image_emb,
            concept_t,
            s.similarity,
            hp,
            s.top_concepts,
            clock.progress,
            images.ok_ids,
        )
    with clock("write"):
        summaries = write_scores(writer, run_id, scores, texts, concept_ids, images.ok_ids, plan.cutoff)
        if not plan.calibrated:
            clock.note(uncalibrated_cutoff_note(s.similarity, plan.cutoff, scores.labels_scores()))
        writer.write_thumbnails(thumbnails_of(thumb_ids))
        write_classifier(writer, setup.target, setup.layers)
        clock.note(carry_over(writer.con, plan.final_path, run_id).note(plan.final_path))
        writer.update_run(run_id, stage_seconds=clock.rounded())
        writer.commit()
    seconds = clock.rounded()
    return IndexResult(
        path=plan.final_path,
        run_id=run_id,
        kind="index",
        n_images=images.n_listed,
        n_failed=images.n_failed,
        failed_examples=images.failed([it.path for it in setup.probe])[:5],
        layers=summaries,
        stage_seconds=seconds,
        images_per_second=images.n_listed / seconds["images"] if seconds.get("images") else None,
        notes=clock.notes,
        n_concepts_encoded=n_encoded,
    )


def run_index(settings: IndexSettings, progress: ProgressSink | None = None) -> IndexResult | None:
    """Index a model: the whole pipeline, ending in one cache file at ``settings.db_path()``.

    Under torchrun (WORLD_SIZE > 1) the ranks share the work (dissect_tui.index_ranks); only
    rank 0 returns a result, the others None."""
    from dissect_tui import distributed

    ranks = distributed.from_env()
    if ranks.active:
        from dissect_tui.index_ranks import run_index_ranks

        return run_index_ranks(settings, progress, ranks)
    clock = StageClock(progress or NullProgress())
    plan = plan_index(settings, clock)
    with clock("setup"):
        setup = prepare_index(settings, clock)
    with CacheWriter(plan.final_path, stream=True) as writer:
        folder = writer.tmp_path.parent
        with clock("images"):
            images, decode_used = run_images(
                setup, settings, plan.hp, writer.append_activations, folder, clock
            )
        spool = images.thumbnails
        try:
            return finish_index(
                plan, setup, images, decode_used, writer, clock, lambda ids: spool.read(ids) if spool else {}
            )
        finally:
            if spool is not None:
                spool.close()


# -- relabel ------------------------------------------------------------------------------
def _relabel_inputs(
    s: RelabelSettings, base: dict[str, Any]
) -> tuple[str, dict[str, float | int], tuple[float, bool], ConceptSet | None]:
    """Method, complete hyperparameters, (cutoff, calibrated) and the new concept set, if any.

    The base run's cutoff is kept only for the same method: another method scores on another
    scale."""
    similarity = s.similarity or base["similarity"]
    method = get_method(similarity)
    stored = base.get("hyperparameters")
    kept = stored if similarity == base["similarity"] and isinstance(stored, dict) else {}
    hp = method.validate({**kept, **s.hyperparameters})
    inherited = base.get("cutoff") if similarity == base["similarity"] else None
    cutoff, calibrated = resolve_cutoff(similarity, s.cutoff, inherited)
    check_cutoff(cutoff)
    concept_set = load_concepts(s.concepts) if s.concepts is not None else None
    return similarity, hp, (cutoff, calibrated), concept_set


def stored_stats(
    reader: CacheReader,
    layers: list[str],
    image_ids: np.ndarray,
    image_emb: torch.Tensor,
    make: Callable[[str, int, int], LayerStatsBuilder],
) -> dict[str, LayerStats]:
    """What scoring needs of each stored layer, read chunk by chunk (never a whole layer at once)."""
    out = {}
    for layer in layers:
        builder = make(layer, reader.n_units(layer), image_emb.shape[1])
        seen = 0
        for ids, acts in reader.iter_layer_activations(layer):
            end = seen + len(ids)
            if end > len(image_ids) or not np.array_equal(ids, image_ids[seen:end]):
                seen = -1
                break
            builder.add(
                ids, torch.from_numpy(acts), image_emb[seen:end] if builder.cross is not None else None
            )
            seen = end
        if seen != len(image_ids):
            raise CacheError(
                f"activations of {layer} and image embeddings disagree on images; rebuild the cache"
            )
        out[layer] = builder.finish()
    return out


def run_relabel(settings: RelabelSettings, progress: ProgressSink | None = None) -> IndexResult:
    """A new run from stored activations and embeddings; no image is read again."""
    from dissect_tui.clip_backend import load_clip
    from dissect_tui.cpu_kernel import active_path

    s = settings
    clock = StageClock(progress or NullProgress())
    s.validate()
    device = resolve_device(s.device)
    with open_cache(s.db) as check:  # validates the file with clear errors before copying it
        base = check.run(s.run)
    similarity, hp, (cutoff, calibrated), concept_set = _relabel_inputs(s, base)
    if concept_set is not None:
        clock.note(concept_set.describe_dropped())

    with CacheWriter(s.db, base=s.db) as writer:
        reader = CacheReader(writer.con, s.db)
        index_run = reader.index_run(base["run_id"])
        if concept_set is None:
            texts, set_name = reader.run_concepts(base["run_id"])[1], base["concept_set"]
        else:
            texts, set_name = concept_set.texts, concept_set.name
        spec = s.clip or f"{index_run['clip_model']}:{index_run['clip_pretrained']}"

        def load_text_tower() -> Any:
            try:
                return load_clip(spec, device=str(device), precision="fp32")
            except UserError as exc:
                raise UserError(
                    f"{len(texts)} concepts need the CLIP text tower ({spec}): {exc} "
                    "(pass --clip NAME:/path/to/checkpoint for a local copy)"
                ) from None

        template = s.template if s.template is not None else base.get("template")
        tower = tower_key(index_run["clip_key"], index_run.get("template"))
        encoder = TextEncoder(load_text_tower, template, tower=tower)
        with clock("concepts"):
            cached = reader.embeddings_by_text(encoder.key, texts)
            stored = set(cached)  # encode_concepts adds the new texts to cached
            concept_emb, n_encoded = encode_concepts(texts, cached, encoder, clock.progress)
        if n_encoded:
            clock.note(f"encoded {n_encoded} new concept texts")
        with clock("write"):
            image_ids, image_emb = reader.image_embeddings()
            layers = [info.layer for info in reader.layers()]
            inherited = ("target", "target_weights", "clip_model", "clip_pretrained", "probe", "n_images")
            run_id = writer.add_run(
                kind="relabel",
                parent_run_id=base["run_id"],
                **{k: index_run[k] for k in (*inherited, "n_failed_images", "pool", "precision")},
                clip_key=encoder.key,
                template=encoder.template,
                concept_set=set_name,
                n_concepts=len(texts),
                layers=layers,
                similarity=similarity,
                hyperparameters=hp,
                cutoff=cutoff,
                device=device_label(device),
                settings={
                    **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                    "scoring_path": active_path(device),
                },
            )
            _note_scoring_path(device, clock)
            concept_ids = writer.concept_ids(texts)
            writer.write_run_concepts(run_id, concept_ids)
            new = np.array([t not in stored for t in texts], dtype=bool)
            writer.write_concept_embeddings(encoder.key, concept_ids[new], concept_emb[new])
        with clock("scoring"):
            emb = torch.from_numpy(image_emb).to(device)
            make = stats_builder(similarity, hp, len(image_ids), device)
            stats = stored_stats(reader, layers, image_ids, emb, make)
            scores = score_run(
                stats,
                emb,
                torch.from_numpy(concept_emb).to(device),
                similarity,
                hp,
                s.top_concepts,
                clock.progress,
                image_ids=image_ids,
            )
        with clock("write"):
            summaries = write_scores(writer, run_id, scores, texts, concept_ids, image_ids, cutoff)
            if not calibrated:
                clock.note(uncalibrated_cutoff_note(similarity, cutoff, scores.labels_scores()))
            writer.update_run(run_id, stage_seconds=clock.rounded())
            writer.commit()
    return IndexResult(
        path=Path(s.db),
        run_id=run_id,
        kind="relabel",
        n_images=int(index_run["n_images"] or 0),
        n_failed=int(index_run["n_failed_images"] or 0),
        failed_examples=[],
        layers=summaries,
        stage_seconds=clock.rounded(),
        notes=clock.notes,
        n_concepts_encoded=n_encoded,
    )
