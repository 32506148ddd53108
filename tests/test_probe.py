"""Probe sets: every spec kind, stable ids, robust decoding, the batch loader."""

from __future__ import annotations

import io
import os
import pickle
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from forged_images import tiny_png
from PIL import Image
from tiny_models import BROKEN_FILES, jpeg_bytes, make_image_tree, tiny_preprocess

from dissect_tui import probe as probe_mod
from dissect_tui.errors import OfflineError, UserError
from dissect_tui.probe import BadImage, decode_file, iter_batches, resolve_probe, synthetic_image


def rel_paths(probe, root: Path) -> list[str]:
    return [Path(item.path).relative_to(root).as_posix() for item in probe]


# ---------------------------------------------------------------- folders, lists, unions


def test_folder_is_recursive_sorted_and_filters_extensions(tmp_path):
    root = make_image_tree(tmp_path, 12)
    (root / ".hidden.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (8, 8))))
    probe = resolve_probe([str(root)], tmp_path / "cache")
    rels = rel_paths(probe, root)
    assert len(probe) == 12 + len(BROKEN_FILES)
    assert rels == sorted(rels)
    assert "readme.txt" not in rels and ".hidden.jpg" not in rels
    assert any(r.endswith(".JPG") for r in rels)  # case-insensitive extensions
    assert set(BROKEN_FILES) <= set(rels)
    assert [item.image_id for item in probe] == list(range(len(probe)))
    assert all(item.source == str(root) for item in probe)
    assert all(os.path.isabs(item.path) for item in probe)


def test_ids_do_not_depend_on_creation_order(tmp_path):
    names = ["b/x.png", "a/z.png", "a/y.png", "c.png", "a/b/w.png"]
    roots = []
    for label, order in (("one", names), ("two", list(reversed(names)))):
        root = tmp_path / label
        for name in order:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(root / name)
        roots.append(root)
    first, second = (rel_paths(resolve_probe([str(r)], tmp_path), r) for r in roots)
    assert first == second == ["a/b/w.png", "a/y.png", "a/z.png", "b/x.png", "c.png"]
    again = resolve_probe([str(roots[0])], tmp_path)
    assert rel_paths(again, roots[0]) == first


def test_list_file_relative_paths_comments_and_missing(tmp_path):
    root = make_image_tree(tmp_path, 4, broken=False)
    listing = tmp_path / "lists" / "probe.txt"
    listing.parent.mkdir()
    absolute = sorted(root.rglob("*.jpg"))[0]
    listing.write_text(
        f"# my probe\n\n../images/a/img_0001.png\n  ../images/c/img_0003.bmp  \n{absolute}\nmissing/nope.jpg\n"
    )
    probe = resolve_probe([str(listing)], tmp_path)
    assert [Path(i.path).name for i in probe] == ["img_0001.png", "img_0003.bmp", absolute.name, "nope.jpg"]
    assert probe.open(0).mode == "RGB"
    with pytest.raises(BadImage, match="not found"):
        probe.open(3)
    assert any("1 listed file" in note for note in probe.notes)


def test_union_keeps_order_and_dedupes_same_file(tmp_path):
    root = make_image_tree(tmp_path, 6, broken=False)
    listing = tmp_path / "list.txt"
    listing.write_text("images/a/img_0001.png\nimages/img_0000.jpg\n")
    single = tmp_path / "extra.png"
    Image.new("RGB", (10, 10), "red").save(single)
    probe = resolve_probe([str(single), str(root), str(listing), str(root)], tmp_path)
    paths = [i.path for i in probe]
    assert paths[0] == str(single)
    assert len(paths) == len(set(paths)) == 1 + 6
    assert [i.image_id for i in probe] == list(range(7))
    assert any("8 duplicate" in note for note in probe.notes)  # 2 from the list + 6 from the repeat


def test_symlinked_duplicate_is_dropped(tmp_path):
    root = make_image_tree(tmp_path, 3, broken=False)
    link = tmp_path / "link.jpg"
    link.symlink_to(root / "img_0000.jpg")
    probe = resolve_probe([str(root), str(link)], tmp_path)
    assert len(probe) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "nowhere"), "not found"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no images"),
        (lambda p: (p / "l.txt").write_text("# nothing\n\n") and str(p / "l.txt"), "names no images"),
        (lambda p: (p / "b.dat").write_bytes(b"\xff\xfe\x00\x81" * 10) and str(p / "b.dat"), "neither"),
        (lambda p: "synthetic:0", "synthetic:N"),
        (lambda p: "synthetic:lots", "synthetic:N"),
    ],
)
def test_bad_specs_are_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        resolve_probe([make(tmp_path)], tmp_path)


def test_no_specs_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        resolve_probe([], tmp_path)


def test_synthetic_is_deterministic_and_prefix_stable(tmp_path):
    small = resolve_probe(["synthetic:3"], tmp_path)
    large = resolve_probe(["synthetic:5"], tmp_path)
    assert [i.path for i in small] == [i.path for i in large][:3]
    for i in range(3):
        assert np.array_equal(np.asarray(small.open(i)), np.asarray(large.open(i)))
    assert not np.array_equal(np.asarray(large.open(0)), np.asarray(large.open(1)))
    assert large.open(4).mode == "RGB"
    both = resolve_probe(["synthetic:3", "synthetic:5"], tmp_path)
    assert len(both) == 5
    assert np.array_equal(np.asarray(synthetic_image(2)), np.asarray(both.open(2)))


# ---------------------------------------------------------------- CIFAR-100


def write_fake_cifar(parent: Path, train: int = 7, test: int = 5) -> Path:
    """A tiny folder with the layout and pickle format of cifar-100-python."""
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": list(range(n))}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)
    return folder


def test_cifar_from_given_folder_and_from_cache(tmp_path):
    folder = write_fake_cifar(tmp_path / "data")
    probe = resolve_probe([f"cifar100-test:{folder}", f"cifar100:{folder.parent}"], tmp_path / "cache")
    assert len(probe) == 5 + 7
    assert probe[0].path == "cifar100-test/00000" and probe[5].path == "cifar100-train/00000"
    with open(folder / "test", "rb") as fh:
        raw = pickle.load(fh)["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(probe.open(3)), raw)
    cached = write_fake_cifar(tmp_path / "cache2")
    in_cache = resolve_probe(["cifar100"], cached.parent)  # found in cache_dir, no download
    assert len(in_cache) == 7


def test_cifar_from_archive(tmp_path):
    folder = write_fake_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    probe = resolve_probe([f"cifar100-test:{archive}"], tmp_path / "cache")
    assert len(probe) == 5 and probe.open(0).size == (32, 32)


def test_cifar_offline_names_archive_and_option(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(probe_mod, "can_reach", lambda host: True)  # let the download itself fail
    with pytest.raises(OfflineError) as info:
        resolve_probe(["cifar100"], tmp_path / "cache")
    message = str(info.value)
    assert "cifar-100-python.tar.gz" in message and str(tmp_path / "cache") in message
    assert "cifar100:" in message and "\n" not in message


def test_cifar_unreachable_host_fails_before_any_download_attempt(tmp_path, monkeypatch, capfd):
    def no_download(*args, **kwargs):
        raise AssertionError("no download may start when the host cannot be reached")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.setattr(probe_mod, "can_reach", lambda host: host == "elsewhere")
    with pytest.raises(OfflineError) as info:
        resolve_probe(["cifar100"], tmp_path / "cache")
    assert "www.cs.toronto.edu cannot be reached" in str(info.value)
    assert "--probe cifar100:/path/to/cifar-100-python" in str(info.value)
    assert "Downloading" not in capfd.readouterr().out


def test_cifar_rows_are_not_pickled_to_workers(tmp_path):
    folder = write_fake_cifar(tmp_path)
    probe = resolve_probe([f"cifar100:{folder}"], tmp_path)
    clone = pickle.loads(pickle.dumps(probe))
    assert clone._cifar == {}
    assert np.array_equal(np.asarray(clone.open(6)), np.asarray(probe.open(6)))


# ---------------------------------------------------------------- decoding


def save(img: Image.Image, path: Path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def test_mode_conversions_give_rgb_with_sane_values(tmp_path):
    grey = Image.new("L", (6, 4), 100)
    cases = {}
    cases["L"] = (save(grey, tmp_path / "l.png"), (100, 100, 100))
    la = Image.merge("LA", [grey, Image.new("L", (6, 4), 0)])  # fully transparent
    cases["LA"] = (save(la, tmp_path / "la.png"), (255, 255, 255))
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 255))
    cases["RGBA"] = (save(rgba, tmp_path / "rgba.png"), (10, 20, 30))
    half = Image.new("RGBA", (6, 4), (0, 0, 0, 128))  # half-transparent black on white
    cases["RGBA-half"] = (save(half, tmp_path / "half.png"), (127, 127, 127))
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    cases["P"] = (save(pal, tmp_path / "p.png"), (200, 10, 10))
    cases["P-transparent"] = (save(pal, tmp_path / "pt.png", transparency=1), (255, 255, 255))
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red
    cases["CMYK"] = (save(cmyk, tmp_path / "cmyk.tif"), (255, 0, 0))
    cases["CMYK-jpeg"] = (save(cmyk, tmp_path / "cmyk.jpg", quality=100), (255, 0, 0))
    i16 = Image.fromarray(np.full((4, 6), 257 * 200, dtype=np.uint16))
    assert i16.mode == "I;16"
    cases["I;16"] = (save(i16, tmp_path / "i16.png"), (200, 200, 200))
    i32 = Image.fromarray(np.full((4, 6), 257 * 50, dtype=np.int32), "I")
    cases["I"] = (save(i32, tmp_path / "i32.tif"), (50, 50, 50))
    bw = Image.new("1", (6, 4), 1)
    cases["1"] = (save(bw, tmp_path / "bw.png"), (255, 255, 255))
    flt = Image.fromarray(np.full((4, 6), 0.5, dtype=np.float32), "F")
    cases["F"] = (save(flt, tmp_path / "f.tif"), (128, 128, 128))
    for mode, (path, expected) in cases.items():
        img, size = decode_file(path)
        assert img.mode == "RGB", mode
        assert size == (6, 4), mode
        got = np.asarray(img)[1, 1].astype(int)
        assert np.abs(got - np.array(expected)).max() <= 3, (mode, got, expected)


def test_broken_files_raise_bad_image(tmp_path):
    root = make_image_tree(tmp_path, 0)
    for name in BROKEN_FILES:
        with pytest.raises(BadImage) as info:
            decode_file(str(root / name))
        assert info.value.reason and "\n" not in info.value.reason
    assert isinstance(BadImage("x"), UserError)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = save(img, tmp_path / "rot.jpg", exif=exif)
    rgb, size = decode_file(path)
    assert rgb.size == (20, 40) and size == (20, 40)


def png_header_bomb(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side pixels; tiny on disk, 1.2 GB if decoded to RGB."""
    tiny_png(path, side, side)


def test_huge_png_is_refused_not_decoded(tmp_path):
    path = tmp_path / "huge.png"
    png_header_bomb(path, 20_000)
    assert path.stat().st_size < 1_000_000
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="too large"):
        decode_file(str(path))
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global policy is restored


def test_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    arr = np.zeros((3072, 4096, 3), dtype=np.uint8)
    arr[:, :2048] = (200, 30, 30)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=80)
    # Pillow's bomb check would refuse this at open(); our policy decodes it reduced instead
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    img, size = decode_file(str(path))
    assert size == (4096, 3072)
    assert min(img.size) >= probe_mod.DECODE_MIN_SIDE and img.size[0] < 4096
    assert tuple(np.asarray(img)[10, 10]) == pytest.approx((200, 30, 30), abs=4)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000


# ---------------------------------------------------------------- batches


def collect(probe, transforms, batch_size, workers, **kw):
    return list(iter_batches(probe, transforms, batch_size, workers, **kw))


def test_iter_batches_counts_broken_and_keeps_going(tmp_path):
    root = make_image_tree(tmp_path, 10)
    probe = resolve_probe([str(root)], tmp_path)
    batches = collect(probe, [tiny_preprocess(32), tiny_preprocess(16)], 4, 0)
    indices = torch.cat([b.indices for b in batches])
    ok = torch.cat([b.ok for b in batches])
    assert indices.tolist() == list(range(len(probe)))
    assert batches[0].inputs[0].shape == (4, 3, 32, 32) and batches[0].inputs[1].shape == (4, 3, 16, 16)
    broken = {
        i for i, item in enumerate(probe) if Path(item.path).relative_to(root).as_posix() in BROKEN_FILES
    }
    assert {i for i, good in enumerate(ok.tolist()) if not good} == broken
    for batch in batches:
        for row, good in enumerate(batch.ok.tolist()):
            if good:
                assert batch.errors[row] is None and batch.sizes[row] is not None
                thumb = Image.open(io.BytesIO(batch.thumbnails[row]))
                assert thumb.format == "JPEG" and max(thumb.size) <= 96
            else:
                assert batch.errors[row] and batch.thumbnails[row] is None
                assert all(float(x[row].abs().sum()) == 0.0 for x in batch.inputs)


def test_iter_batches_decodes_each_image_once(tmp_path, monkeypatch):
    probe = resolve_probe(["synthetic:6"], tmp_path)
    calls = []
    original = probe.open_with_size
    monkeypatch.setattr(probe, "open_with_size", lambda i: calls.append(i) or original(i))
    batches = collect(probe, [tiny_preprocess(32), tiny_preprocess(24)], 4, 0)
    assert sorted(calls) == list(range(6))
    assert all(b.thumbnails[0] for b in batches)


def test_thumbnail_size_and_off(tmp_path):
    probe = resolve_probe(["synthetic:2"], tmp_path)
    batch = collect(probe, [tiny_preprocess()], 2, 0, thumbnail_px=40)[0]
    assert max(Image.open(io.BytesIO(batch.thumbnails[0])).size) == 40
    assert batch.sizes[0] == probe.open(0).size
    batch = collect(probe, [tiny_preprocess()], 2, 0, thumbnail_px=0)[0]
    assert batch.thumbnails == [None, None]


def test_workers_give_identical_batches(tmp_path):
    root = make_image_tree(tmp_path, 9)
    probe = resolve_probe([str(root), "synthetic:3"], tmp_path)
    transforms = [tiny_preprocess(32), tiny_preprocess(20)]
    in_process = collect(probe, transforms, 5, 0)
    workers = collect(probe, transforms, 5, 2)
    assert len(in_process) == len(workers) == 4
    for a, b in zip(in_process, workers, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.ok, b.ok)
        assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
        assert a.thumbnails == b.thumbnails and a.sizes == b.sizes and a.errors == b.errors


def test_variable_size_transform_is_rejected(tmp_path):
    from torchvision import transforms as T

    probe = resolve_probe(["synthetic:1"], tmp_path)
    with pytest.raises(UserError, match="fixed size"):
        collect(probe, [T.ToTensor()], 1, 0)


def test_failed_transform_counts_as_failed_image(tmp_path):
    def picky(img: Image.Image) -> torch.Tensor:
        if img.size == (30, 30):
            raise ValueError("cannot handle 30x30")
        return torch.ones(3, 8, 8)

    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (31, 30)).save(tmp_path / "b.png")
    probe = resolve_probe([str(tmp_path)], tmp_path)
    batch = collect(probe, [picky], 2, 0)[0]
    assert batch.ok.tolist() == [False, True]
    assert "30x30" in batch.errors[0]
    assert batch.inputs[0][0].abs().sum() == 0 and batch.inputs[0][1].sum() == 3 * 64


def test_batch_pin_memory_is_used_by_the_loader(monkeypatch):
    """DataLoader(pin_memory=True) calls Batch.pin_memory; fake pinning so this runs without CUDA."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(
        torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self.shape) or self.clone()
    )
    batch = probe_mod.Batch(
        torch.arange(2),
        torch.tensor([True, False]),
        [torch.ones(2, 3, 4, 4)],
        [b"x", None],
        [(4, 4), None],
        [None, "bad"],
    )
    out = pin_memory(batch)
    assert isinstance(out, probe_mod.Batch) and len(pinned) == 3
    assert torch.equal(out.inputs[0], batch.inputs[0]) and out.errors == batch.errors
