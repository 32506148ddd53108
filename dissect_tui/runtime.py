"""Where and how tensors are computed: device, precision and autocast, decided in one place.

``--device`` and ``--precision`` of every command go through :func:`resolve_device` and
:func:`resolve_precision`; forward passes use :func:`autocast`; what a run records about the
hardware comes from :func:`device_label`. CUDA, Apple's MPS and the CPU are handled alike; any
other accelerator torch knows is accepted when torch reports it available.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dissect_tui.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _available(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    module: Any = getattr(torch, dev.type, None)  # xpu, … expose torch.<type>.is_available()
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA, then MPS, then CPU; an explicit device must exist here."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        for candidate in ("cuda", "mps"):
            if _available(torch.device(candidate)):
                return torch.device(candidate)
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise UserError(f"unknown device {device!r}: use {DEVICE_CHOICES}") from None
    if not _available(dev):
        what = "CUDA device" if dev.type == "cuda" else f"{dev.type.upper()} device"
        raise UserError(f"{what} {device} requested but not available here; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (MPS and CPU autocast are slower or lossy)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes; fp32 is a no-op. Weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def device_label(device: torch.device) -> str:
    """What a run records as its device: the card's name on CUDA, else the device string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator out-of-memory error (``torch.OutOfMemoryError`` appeared in torch 2.5)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
