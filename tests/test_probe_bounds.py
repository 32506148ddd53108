"""Probe decoding is bounded per image and leaves process-wide state alone (issue 9 §7, §8)."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch
from forged_images import forged_jpeg, tiny_png
from PIL import Image
from tiny_models import tiny_preprocess

from dissect_tui import compat
from dissect_tui import probe as probe_mod
from dissect_tui.errors import UserError
from dissect_tui.probe import BadImage, decode_file, iter_batches, resolve_probe

# ---------------------------------------------------------------- bounds


def test_an_extreme_aspect_ratio_is_refused_before_any_resize(tmp_path):
    path = tiny_png(tmp_path / "line.png", 20_000, 1)
    assert path.stat().st_size < 200
    with pytest.raises(BadImage, match="aspect ratio"):
        decode_file(str(path))
    tall = tiny_png(tmp_path / "tall.png", 3, 3 * probe_mod.MAX_ASPECT + 3)
    with pytest.raises(BadImage, match="aspect ratio"):
        decode_file(str(tall))
    ok = tiny_png(tmp_path / "banner.png", 20 * 30, 30)  # 1:20 banners still decode
    assert decode_file(str(ok))[1] == (600, 30)


def test_a_forged_jpeg_header_is_refused_not_decoded(tmp_path):
    path = forged_jpeg(tmp_path / "forged.jpg", 20_000, 20_000)
    with pytest.raises(BadImage, match="forged or truncated header"):
        decode_file(str(path))


def test_flat_real_jpegs_pass_the_bytes_per_pixel_check(tmp_path):
    for mode, kw in (("L", {"optimize": True}), ("RGB", {"optimize": True, "progressive": True})):
        path = tmp_path / f"flat_{mode}.jpg"
        Image.new(mode, (3000, 2000), "white" if mode == "RGB" else 255).save(path, format="JPEG", **kw)
        img, size = decode_file(str(path))
        assert size == (3000, 2000) and min(img.size) >= probe_mod.DECODE_MIN_SIDE


def test_pillows_limit_is_never_changed_while_decoding(tmp_path, monkeypatch):
    """Image.MAX_IMAGE_PIXELS is process-wide: loader threads and other code read it concurrently."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (10, 200, 30)).save(path, quality=80)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # a caller's own, stricter policy
    seen = []
    real = probe_mod.to_rgb
    monkeypatch.setattr(probe_mod, "to_rgb", lambda im: seen.append(Image.MAX_IMAGE_PIXELS) or real(im))
    img, size = decode_file(str(path))
    assert size == (2400, 1800) and img.size[0] < 2400  # the JPEG is still decoded at reduced scale
    assert seen == [1_000_000]
    png = tiny_png(tmp_path / "square.png", 1100, 1100)  # 1.2 MP: Pillow's limit applies to other formats
    with pytest.raises(BadImage, match="too large"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decode_file(str(png))


# ---------------------------------------------------------------- files that are not files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_among_the_images_is_a_failed_image_not_a_hang(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")  # nobody writes: opening it for reading would block
    probe = resolve_probe([str(folder)], tmp_path)
    (batch,) = list(iter_batches(probe, [tiny_preprocess()], 4, 0))
    assert batch.ok.tolist() == [True, False]
    assert batch.errors[1] == "not a regular file: a FIFO (named pipe)"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_device_as_probe_spec_is_named(tmp_path):
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"is a FIFO \(named pipe\)"):
        resolve_probe([str(fifo)], tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(UserError, match="is a character device"):
            resolve_probe(["/dev/null"], tmp_path)


# ---------------------------------------------------------------- process state


def test_in_process_decoding_limits_only_its_own_thread(tmp_path):
    """torch.set_num_threads(1) also made every thread started meanwhile run on one thread."""
    default = torch.get_num_threads()
    seen: dict[str, list[int]] = {"decoder": [], "new thread": []}

    def transform(img: Image.Image) -> torch.Tensor:
        seen["decoder"].append(torch.get_num_threads())
        other = threading.Thread(target=lambda: seen["new thread"].append(torch.get_num_threads()))
        other.start()
        other.join()
        return tiny_preprocess()(img)

    probe = resolve_probe(["synthetic:2"], tmp_path)
    for _batch in iter_batches(probe, [transform], 2, 0):
        assert torch.get_num_threads() == default  # the consumer's forward has its threads
    assert seen["new thread"] and set(seen["new thread"]) == {default}
    with compat.one_intraop_thread() as limited:
        pass
    if limited:  # the decoding thread itself runs on one thread (after the two shape probes)
        assert seen["decoder"][2:] and set(seen["decoder"][2:]) == {1}
    assert torch.get_num_threads() == default
    new_after = []
    t = threading.Thread(target=lambda: new_after.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert new_after == [default]


def test_decoding_leaves_the_warning_filters_alone(tmp_path):
    """warnings.catch_warnings swaps the process-wide filter list: another thread's filters
    would be dropped meanwhile, and overlapping uses in two threads can leave one installed."""
    outside = warnings.filters
    during = []

    def transform(img: Image.Image) -> torch.Tensor:
        during.append(warnings.filters is outside)
        return tiny_preprocess()(img)

    probe = resolve_probe(["synthetic:2"], tmp_path)
    list(iter_batches(probe, [transform], 2, 0))
    assert during and all(during)
    assert warnings.filters is outside
