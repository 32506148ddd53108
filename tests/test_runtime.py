"""dissect_tui.runtime: device, precision and autocast decided in one place, any accelerator."""

from __future__ import annotations

import pytest
import torch

from dissect_tui import runtime
from dissect_tui.errors import UserError


def _no_cuda(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("CUDA API called for a non-CUDA device")

    monkeypatch.setattr(torch.cuda, "get_device_name", boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_label_never_asks_cuda_about_other_devices(monkeypatch):
    _no_cuda(monkeypatch)
    assert runtime.device_label(torch.device("mps")) == "mps"
    assert runtime.device_label(torch.device("cpu")) == "cpu"
    assert runtime.device_label(torch.device("xpu:1")) == "xpu:1"


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["mps", "cuda", "cuda:3", "xpu"])
def test_unavailable_devices_are_one_clear_error(monkeypatch, spec):
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="not available here; use --device cpu"):
        runtime.resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", ""])
def test_unknown_device_names(spec):
    with pytest.raises(UserError, match="unknown device"):
        runtime.resolve_device(spec)


def test_precision_auto_is_bf16_only_on_cuda():
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert runtime.resolve_precision("fp16", torch.device("cpu")) == "fp16"
    with pytest.raises(UserError, match="unknown precision"):
        runtime.resolve_precision("int8", torch.device("cpu"))


def test_autocast_fp32_is_a_no_op_and_bf16_casts_on_cpu():
    x = torch.randn(4, 4)
    with runtime.autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with runtime.autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_out_of_memory_is_recognised_by_type_and_message():
    assert runtime.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert runtime.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated …)"))
    assert not runtime.is_out_of_memory(RuntimeError("shape mismatch"))
