"""The device decode path: the PIL path's bounds, regular files only, pieces of bounded size,
--decode auto falling back to PIL, transforms from configuration (issue 9 §7/§8, issue 10 §5)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from forged_images import forged_jpeg
from PIL import Image
from tiny_clip import make_tiny_clip

import dissect_tui.fast_decode as fd
from dissect_tui import compat
from dissect_tui.errors import UserError
from dissect_tui.fast_decode import DecodeStats, iter_device_batches, map_transform, plan_decode
from dissect_tui.probe import iter_batches, resolve_probe, synthetic_image
from dissect_tui.targets import imagenet_preprocess

CPU = torch.device("cpu")


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i, size in enumerate([(300, 200), (200, 300), (640, 480), (97, 61), (300, 300), (250, 240)]):
        synthetic_image(i).resize(size).save(root / f"{i:02d}.jpg", quality=90)
    return root


def run(folder: Path, transforms, plan=None, thumbnail_px: int = 96, batch_size: int = 4, **kw):
    probe = resolve_probe([str(folder)], folder.parent)
    plan = plan or plan_decode("tensor", CPU, transforms)[0]
    stats = DecodeStats()
    dev = list(iter_device_batches(probe, transforms, plan, batch_size, 0, thumbnail_px, stats, **kw))
    pil = list(iter_batches(probe, transforms, batch_size, 0, thumbnail_px))
    return probe, pil, dev, stats


def rows(batches):
    return [
        (i, ok, err)
        for b in batches
        for i, ok, err in zip(b.indices.tolist(), b.ok.tolist(), b.errors, strict=True)
    ]


def assert_same_inputs(pil, dev, tol: float = 0.05) -> None:
    for a, b in zip(pil, dev, strict=True):
        assert a.indices.tolist() == b.indices.tolist() and a.ok.tolist() == b.ok.tolist()
        assert float((a.inputs[0] - b.inputs[0]).abs().max()) < tol


# ---------------------------------------------------------------- bounds


def test_a_forged_header_is_refused_before_the_device_decodes_it(folder):
    forged_jpeg(folder / "zz_forged.jpg", 4000, 4000)  # 3 kB claiming 16 MP
    Image.new("RGB", (3000, 20), "blue").save(folder / "zz_strip.jpg")  # 1:150
    calls = []
    real = fd.decode_jpegs
    fd_decode = lambda files, device: calls.append(len(files)) or real(files, device)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fd, "decode_jpegs", fd_decode)
        probe, pil, dev, stats = run(folder, [imagenet_preprocess()], thumbnail_px=0)
    assert rows(dev) == rows(pil)
    errors = {Path(probe[i].path).name: err for i, ok, err in rows(dev) if not ok}
    assert set(errors) == {"zz_forged.jpg", "zz_strip.jpg"}
    assert "forged or truncated header" in errors["zz_forged.jpg"]
    assert "aspect ratio" in errors["zz_strip.jpg"]
    assert sum(calls) == 6  # only the six real images reached the device decoder


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_a_failed_image_not_a_hang(folder):
    os.mkfifo(folder / "zz_pipe.jpg")  # open() for reading would block: nobody writes
    probe, pil, dev, _ = run(folder, [imagenet_preprocess()])
    assert rows(dev) == rows(pil)
    assert rows(dev)[-1][1:] == (False, "not a regular file: a FIFO (named pipe)")


def test_a_decode_of_another_size_than_the_header_goes_to_pil(folder, monkeypatch):
    real = fd.decode_jpegs

    def wrong_size(files, device):
        return [x[:, :-1] if k == 0 else x for k, x in enumerate(real(files, device))]

    monkeypatch.setattr(fd, "decode_jpegs", wrong_size)
    probe, pil, dev, stats = run(folder, [imagenet_preprocess()])
    assert stats.counts["device decode failed"] == 2  # the first file of each batch of 4
    assert_same_inputs(pil, dev)


def test_a_batch_is_decoded_in_pieces_of_bounded_pixels(folder, monkeypatch):
    seen = []
    real = fd.decode_jpegs

    def spy(files, device):
        out = real(files, device)
        seen.append(sum(x.shape[1] * x.shape[2] for x in out))
        return out

    monkeypatch.setattr(fd, "decode_jpegs", spy)
    monkeypatch.setattr(fd, "DEVICE_DECODE_PIXELS", 320_000)
    probe, pil, dev, stats = run(folder, [imagenet_preprocess()], batch_size=6)
    assert (
        len(seen) >= 3
        and all(p <= 320_000 for p in seen)
        and sum(seen) == sum(w * h for b in dev for w, h in b.sizes)
    )
    assert stats.counts["device"] == 6
    assert_same_inputs(pil, dev)


# ---------------------------------------------------------------- --decode auto: fall back, don't fail


def _break_second_call(monkeypatch):
    real = fd.decode_jpegs
    calls = []

    def broken(files, device):
        calls.append(len(files))
        if len(calls) == 2:
            raise RuntimeError("nvjpeg: internal error")
        return real(files, device)

    monkeypatch.setattr(fd, "decode_jpegs", broken)


def test_auto_falls_back_to_pil_for_the_images_not_yet_yielded(folder, monkeypatch):
    _break_second_call(monkeypatch)
    transforms = [imagenet_preprocess()]
    plan = dataclasses.replace(plan_decode("tensor", CPU, transforms)[0], fallback=True)
    notes = []
    probe, pil, dev, stats = run(folder, transforms, plan=plan, note=notes.append)
    assert [b.indices.tolist() for b in dev] == [[0, 1, 2, 3], [4, 5]]
    assert_same_inputs(pil, dev)
    assert torch.equal(dev[1].inputs[0], pil[1].inputs[0])  # the second batch came from PIL itself
    assert len(notes) == 1 and "failed after 4 images" in notes[0] and "remaining 2" in notes[0]
    assert stats.fallback == notes[0] and stats.counts["after the device path failed"] == 2


def test_explicit_device_decoding_fails_in_one_line(folder, monkeypatch):
    _break_second_call(monkeypatch)
    transforms = [imagenet_preprocess()]
    with pytest.raises(UserError, match=r"--decode tensor: decoding on cpu failed after 4 images") as info:
        run(folder, transforms)
    assert "\n" not in str(info.value)


def test_plan_for_auto_falls_back_and_gpu_does_not():
    plan, _ = plan_decode("tensor", CPU, [imagenet_preprocess()])
    assert plan is not None and not plan.fallback


# ---------------------------------------------------------------- process state


def test_device_decoding_leaves_the_warning_filters_alone(folder, monkeypatch):
    outside = warnings.filters
    during = []
    real = torchvision.io.decode_jpeg

    def spy(*args, **kwargs):
        during.append(warnings.filters is outside)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    run(folder, [imagenet_preprocess()])
    assert during and all(during)


# ---------------------------------------------------------------- transforms from configuration


def test_our_transforms_map_from_their_configuration(tmp_path, monkeypatch):
    from dissect_tui.clip_backend import load_clip

    clip = load_clip(make_tiny_clip(tmp_path).spec)
    monkeypatch.setattr(fd, "_map_compose", lambda steps: pytest.fail("pattern-matched a Compose"))
    assert map_transform(imagenet_preprocess()).size == (256,)
    spec = map_transform(clip.preprocess)
    assert spec is not None and spec.interpolation == "bicubic" and spec.crop == (32, 32)


def test_open_clip_configurations():
    cfg = {"size": 224, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    assert fd.open_clip_tensor_ops({**cfg, "resize_mode": "shortest"})["crop"] == [224, 224]
    squash = fd.open_clip_tensor_ops({**cfg, "size": (256, 192), "resize_mode": "squash"})
    assert squash["resize"] == [256, 192] and squash["crop"] is None
    assert fd.open_clip_tensor_ops({**cfg, "resize_mode": "longest"}) is None  # pads: PIL path
    assert fd.open_clip_tensor_ops({**cfg, "interpolation": "random"}) is None


def test_presets_map_through_compat_and_fall_back_without_it(monkeypatch):
    from torchvision.models import ResNet50_Weights

    preset = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert map_transform(preset).size == (232,)
    monkeypatch.setattr(compat, "classification_preset_type", lambda: None)
    assert map_transform(preset) is None  # no mapping: that transform runs on the PIL path


def test_rows_are_named_records(folder):
    probe = resolve_probe([str(folder)], folder.parent)
    transforms = [imagenet_preprocess()]
    plan, _ = plan_decode("tensor", CPU, transforms)
    shapes = [(3, 224, 224)]
    dataset = fd._BytesDataset(probe, transforms, shapes, plan.specs, 96, "cpu")
    row = dataset[0]
    assert row.kind == fd._DEVICE and row.tag == "device" and row.size == (300, 200) and row.data
    pil_row = dataset.pil_row(1, "why")
    assert pil_row.kind == fd._PIL and pil_row.tag == "why" and pil_row.cpu[0].shape == shapes[0]


def test_an_index_run_in_auto_mode_survives_a_failing_device_path(folder, tmp_path, monkeypatch):
    from tiny_models import write_tiny_cnn_factory

    from dissect_tui.indexer import IndexSettings, run_index

    real_plan = fd.plan_decode

    def auto_on_this_device(mode, device, transforms):  # what --decode auto does on CUDA
        plan, notes = real_plan("tensor", device, transforms)
        return dataclasses.replace(plan, fallback=True), notes

    monkeypatch.setattr(fd, "plan_decode", auto_on_this_device)
    _break_second_call(monkeypatch)
    settings = IndexSettings(
        model=write_tiny_cnn_factory(tmp_path, factory="build_with_preprocess"),
        probe=[str(folder)],
        concepts="cifar100",
        clip=make_tiny_clip(tmp_path / "clip").spec,
        db=tmp_path / "out.duckdb",
        device="cpu",
        batch_size=4,
        workers=0,
        top_images=3,
        decode="auto",
    )
    result = run_index(settings)
    assert result.n_failed == 0
    fallback = [n for n in result.notes if "device path failed after 4 images" in n]
    assert len(fallback) == 1
    assert any("2 after the device path failed" in n for n in result.notes)
