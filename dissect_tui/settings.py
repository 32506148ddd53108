"""Settings of the long-running commands: each default is written here once, and checked here.

The CLI passes only the options the user gave (``from_options``), so a default never lives in
argparse; library callers construct the dataclasses directly. ``validate()`` does every check that
needs no model, no image and no network, so a typo fails in milliseconds, before minutes of work.
Torch-free: the CLI imports this module to build its help texts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from dissect_tui.concepts import DEFAULT_CONCEPT_SET
from dissect_tui.errors import UserError
from dissect_tui.methods import DEFAULT_CUTOFF, DEFAULT_METHOD, get_method
from dissect_tui.text_encoding import check_template

DEFAULT_CLIP = "ViT-B-16:openai"
DEFAULT_PROBE = "cifar100"
DEFAULT_CACHE_DIR = Path("cache")
POOLS = ("mean", "max")
DECODES = ("auto", "cpu", "gpu")  # "tensor" (device path on a CPU) exists for tests
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCH_SIZE_ACCELERATOR = 256
BATCH_SIZE_CPU = 32


def check_cutoff(cutoff: float) -> None:
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or not math.isfinite(cutoff):
        raise UserError(f"--cutoff must be a finite number, got {cutoff}")


def check_at_least_one(option: str, n: int | None) -> None:
    if n is not None and n < 1:
        raise UserError(f"{option} must be at least 1, got {n}")


def resolve_cutoff(method: str, given: float | None, inherited: float | None = None) -> tuple[float, bool]:
    """(τ to use, whether it is calibrated for ``method``): the given one, else the inherited one
    (relabel with the same method), else the method's own, else the paper's 0.16 (uncalibrated)."""
    if given is not None:
        return float(given), True
    if inherited is not None:
        return float(inherited), True
    calibrated = get_method(method).cutoff
    return (calibrated, True) if calibrated is not None else (DEFAULT_CUTOFF, False)


def uncalibrated_cutoff_note(method: str, cutoff: float, scores: Any) -> str:
    """What to say when τ was not chosen for this method's scale: how many neurons pass, and a τ
    that would keep the top 10 % (the scores' 90th percentile)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    share = 100.0 * float(np.mean(scores > cutoff)) if scores.size else 0.0
    lo, med, p90, hi = np.quantile(scores, [0.0, 0.5, 0.9, 1.0]) if scores.size else (0, 0, 0, 0)
    return (
        f"τ = {cutoff:g} is calibrated for {DEFAULT_METHOD} scores, not {method}: {share:.0f}% of neurons pass it; "
        f"{method} scores here range {lo:.3g} … {hi:.3g} (median {med:.3g}); choose one with --cutoff, "
        f"e.g. --cutoff {p90:.3g} keeps the top 10% (see `dissect-tui analyze interpretability`)"
    )


def _given(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that were given (not None) and that ``cls`` has a field for."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in options.items() if k in names and v is not None}


@dataclass
class IndexSettings:
    """Everything `dissect-tui index` needs; the defaults are the documented ones."""

    model: str
    weights: str | None = None  # None: the model's default torchvision weights
    layers: list[str] | None = None  # None: the model family's defaults
    probe: list[str] = field(default_factory=lambda: [DEFAULT_PROBE])
    concepts: str = DEFAULT_CONCEPT_SET
    clip: str | None = None  # None: DEFAULT_CLIP, or with embeddings_from that cache's CLIP
    template: str | None = None  # e.g. "a photo of {}"; concepts are encoded as written by default
    embeddings_from: Path | None = None  # a cache on the same probe: its image/concept embeddings
    pool: str = "mean"
    similarity: str = DEFAULT_METHOD
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    cutoff: float | None = None  # None: the method's calibrated cutoff (methods.Method.cutoff)
    top_images: int = 100
    top_concepts: int = 100
    thumbnail_top: int = 10
    thumbnail_px: int = 96
    db: Path | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: BATCH_SIZE_ACCELERATOR on an accelerator, else BATCH_SIZE_CPU
    workers: int | None = None  # None: min(8, cores) on an accelerator, else 0
    decode: str = "auto"  # auto | cpu | gpu (dissect_tui.fast_decode); "tensor" forces the device path

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> IndexSettings:
        return cls(**_given(cls, options))

    def db_path(self) -> Path:
        from dissect_tui.store.reader import cache_name

        return Path(self.db) if self.db else Path(self.cache_dir) / f"{cache_name(self.model)}.duckdb"

    def validate(self) -> dict[str, float | int]:
        """Every check that needs no model or file; returns the complete hyperparameters."""
        if self.pool not in POOLS:
            raise UserError(f"unknown pooling {self.pool!r}: use {' or '.join(POOLS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.layers is not None and not self.layers:
            raise UserError("--layers names no layer: give layer names, e.g. --layers layer3,layer4")
        hp = get_method(self.similarity).validate(self.hyperparameters)
        if self.cutoff is not None:
            check_cutoff(self.cutoff)
        check_at_least_one("--top-images", self.top_images)
        check_at_least_one("--top-concepts", self.top_concepts)
        check_at_least_one("--batch-size", self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        check_template(self.template)
        if not self.probe:
            raise UserError("no --probe given")
        return hp


@dataclass
class RelabelSettings:
    """`dissect-tui relabel`: a new run from stored activations; None means "as the base run"."""

    db: Path
    similarity: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    cutoff: float | None = None
    concepts: str | None = None
    clip: str | None = None  # where the run's CLIP text weights are on this machine
    template: str | None = None
    top_concepts: int = 100
    device: str = "auto"
    run: int | None = None  # base run; default the latest

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RelabelSettings:
        return cls(**_given(cls, options))

    def validate(self) -> None:
        if self.similarity is not None:
            get_method(self.similarity)
        if self.cutoff is not None:
            check_cutoff(self.cutoff)
        check_at_least_one("--top-concepts", self.top_concepts)
        check_template(self.template)


def default_of(cls: type, name: str) -> Any:
    """A field's default, for help texts (``default_of(IndexSettings, "clip")``)."""
    for f in fields(cls):
        if f.name == name:
            return f.default_factory() if f.default_factory is not MISSING else f.default
    raise KeyError(name)
