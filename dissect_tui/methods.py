"""The similarity methods: one registry for names, defaults, valid ranges and implementations.

Every part of dissect-tui that needs to know about a similarity function reads it from here:
the CLI's choices, the indexer and relabel, the streamed scorer (``scoring.score_layers``), the
dense reference functions (``similarity.py``), evaluate's rescoring and the browser's concept
queries. In the style of torchvision's model registry: a small frozen record per method, looked up
by name, with one ``validate()`` that turns user overrides into complete, checked settings.

Torch-free (argparse and the browser import it); implementations are resolved on first use.
Formulas and where the defaults come from: docs/METHOD.md.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dissect_tui.errors import UserError

DEFAULT_METHOD = "soft_wpmi"
# The paper's interpretability cutoff τ (Appendix A.8), calibrated on SoftWPMI's scale.
DEFAULT_CUTOFF = 0.16


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its default and the closed/open interval a value must lie in."""

    name: str
    default: float | int
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    doc: str = ""

    def interval(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"{lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"

    def check(self, method: str, value: Any) -> float | int:
        where = f"--hp {self.name}={value} for {method}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: the value must be a number")
        if not math.isfinite(value):
            raise UserError(f"{where}: the value must be a finite number")
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            raise UserError(f"{where}: the value must be a whole number")
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            raise UserError(f"{where}: the value must lie in {self.interval()} ({self.doc})")
        return int(value) if self.integer else float(value)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Method:
    """A similarity function: ``dense(acts [N, K], P [N, M], **hp) -> [K, M]`` scores, and the
    pipeline's streamed scorer for the same numbers without building P."""

    name: str
    summary: str
    params: tuple[Param, ...]
    dense_ref: str  # "module:function" of the dense reference implementation
    # Whether the method forms softmax(a·P) rows (wpmi, soft_wpmi): their pass also yields each
    # image's softmax normaliser and best concepts for free.
    uses_softmax: bool = False
    cutoff: float | None = None  # the calibrated interpretability cutoff on this method's scale

    def defaults(self) -> dict[str, float | int]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def validate(self, overrides: Mapping[str, Any] | None = None) -> dict[str, float | int]:
        """Defaults merged with ``overrides``, every value checked; UserError names the problem."""
        overrides = dict(overrides or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for {self.name}: "
                f"valid ones are {', '.join(sorted(known)) or 'none'}"
            )
        out = self.defaults()
        for p in self.params:
            if p.name in overrides:
                out[p.name] = p.check(self.name, overrides[p.name])
        if "p_start" in out and out["p_end"] > out["p_start"]:
            raise UserError(
                f"{self.name}: p_end ({out['p_end']}) must not exceed p_start ({out['p_start']}): "
                "weights fall with rank"
            )
        return out

    @property
    def dense(self) -> Callable[..., Any]:
        module, fn = self.dense_ref.split(":")
        return getattr(importlib.import_module(module), fn)

    def softmax_scale(self, hp: Mapping[str, Any]) -> float:
        """``a`` of the per-image softmax stored with a run (free-text queries score with it)."""
        return float(hp.get("a", SOFT_WPMI_A)) if self.uses_softmax else SOFT_WPMI_A

    def describe(self) -> str:
        """One line per parameter, for --help and docs."""
        return "; ".join(f"{p.name}={p.default:g} in {p.interval()}" for p in self.params)


SOFT_WPMI_A = 10.0

_A_DOC = "softmax scale of the cosines; CLIP's own logit scale is 100"
_LAM_DOC = "weight of the concept prior; 0 = no prior"
_TOPK_DOC = "images per neuron"
_MINPROB_DOC = "probability floor inside the log"

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "soft_wpmi",
            "SoftWPMI (the paper's default): soft membership of each neuron's top images",
            (
                Param("a", SOFT_WPMI_A, 0.0, 100.0, low_open=True, doc=_A_DOC),
                Param("lam", 1.0, 0.0, 10.0, doc=_LAM_DOC),
                Param("top_k", 100, 1, 100_000, integer=True, doc=_TOPK_DOC),
                Param("p_start", 0.998, 0.0, 1.0, low_open=True, doc="membership of the top image"),
                Param("p_end", 0.97, 0.0, 1.0, low_open=True, doc="membership at rank top_k"),
                Param("min_prob", 1e-7, 0.0, 0.1, low_open=True, doc=_MINPROB_DOC),
            ),
            "dissect_tui.similarity:soft_wpmi",
            uses_softmax=True,
            cutoff=DEFAULT_CUTOFF,
        ),
        Method(
            "wpmi",
            "WPMI: pointwise mutual information over each neuron's top images",
            (
                Param("a", 2.0, 0.0, 100.0, low_open=True, doc=_A_DOC),
                Param("lam", 0.6, 0.0, 10.0, doc=_LAM_DOC),
                Param("top_k", 28, 1, 100_000, integer=True, doc=_TOPK_DOC),
                Param("min_prob", 1e-7, 0.0, 0.1, low_open=True, doc=_MINPROB_DOC),
            ),
            "dissect_tui.similarity:wpmi",
            uses_softmax=True,
        ),
        Method(
            "rank_reorder",
            "rank reorder: how well a concept orders each neuron's top images",
            (
                Param("p", 3.0, 0.0, 10.0, low_open=True, doc="exponent of the reordering error"),
                Param("top_fraction", 0.05, 0.0, 1.0, low_open=True, doc="share of images per neuron"),
                Param("scale_p", 0.0, 0.0, 2.0, doc="exponent of the reference's mean(P) division"),
                Param("seed", 0, 0, 2**31 - 1, integer=True, doc="seed of the random baseline"),
                Param("n_perm", 5, 1, 1000, integer=True, doc="random permutations in the baseline"),
            ),
            "dissect_tui.similarity:rank_reorder",
        ),
        Method("cos", "cosine of activations and P (no centering)", (), "dissect_tui.similarity:cos"),
    )
}

# CLI order: the default first.
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method, or UserError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown similarity {name!r}: use one of {', '.join(METHOD_NAMES)}") from None


def validate(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, float | int]:
    """Shorthand for ``get_method(name).validate(overrides)``."""
    return get_method(name).validate(overrides)
