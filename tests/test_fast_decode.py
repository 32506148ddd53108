"""The device decode path (``--decode gpu``) run on the CPU: decode_jpeg + tensor preprocessing
must match the PIL path (values within a few 8-bit levels, same ok/error flags, same labels),
fall back to PIL for what it cannot do, and map exactly the standard transforms."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from tiny_clip import make_tiny_clip
from tiny_models import write_tiny_cnn_factory

from dissect_tui.cli import main
from dissect_tui.errors import UserError
from dissect_tui.fast_decode import (
    DecodeStats,
    TensorPreprocess,
    iter_device_batches,
    map_transform,
    plan_decode,
)
from dissect_tui.indexer import IndexSettings, run_index
from dissect_tui.probe import DECODE_MIN_SIDE, iter_batches, resolve_probe, synthetic_image
from dissect_tui.store import open_cache
from dissect_tui.targets import IMAGENET_MEAN, IMAGENET_STD, imagenet_preprocess

CPU = torch.device("cpu")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# One 8-bit level is 1/255/std ~ 0.017 after normalisation; resize kernels round differently.
MAX_DIFF = 0.05
MAX_DIFF_DRAFTED = 0.25  # measured 0.15: PIL's DCT-scaled decode of a 2200x1100 JPEG vs a full one
MEAN_DIFF = 0.005


def clip_like() -> T.Compose:
    """open_clip's eval transform for a 224-px ViT, as its image_transform builds it."""
    return T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def preset():
    """torchvision's ImageClassification preset (weights.transforms()); no weights downloaded."""
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V2.transforms()


def cmyk_jpeg(img: Image.Image, path: Path) -> None:
    img.convert("CMYK").save(path, format="JPEG", quality=90)


def exif_rotated_jpeg(img: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(path, format="JPEG", quality=90, exif=exif.tobytes())


SIZES = [(500, 375), (375, 500), (97, 61), (640, 480), (300, 300), (230, 240), (2200, 1100)]


def make_folder(root: Path, n_jpeg: int = 21) -> Path:
    """JPEGs of varied sizes, qualities and colour modes, a PNG, an EXIF-rotated JPEG and broken files."""
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(n_jpeg):
        img = synthetic_image(i).resize(SIZES[i % len(SIZES)])
        path = folder / f"{i:03d}.jpg"
        if i % 3 == 2:
            cmyk_jpeg(img, path)
        else:
            img.convert("RGB" if i % 3 == 0 else "L").save(path, format="JPEG", quality=(95, 75)[i % 2])
    synthetic_image(100).save(folder / "png_image.png")
    exif_rotated_jpeg(synthetic_image(101), folder / "rotated.jpg")
    rng = np.random.default_rng(7)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(600))
    (folder / "text.jpg").write_text("not a picture\n")
    good = io.BytesIO()
    synthetic_image(102).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("fastdecode"))


# ---------------------------------------------------------------- mapping


def test_standard_transforms_map_to_their_parameters():
    spec = map_transform(imagenet_preprocess())
    assert spec == TensorPreprocess((256,), "bilinear", None, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    spec = map_transform(preset())
    assert spec is not None and spec.size == (232,) and spec.crop == (224, 224)
    assert spec.interpolation == "bilinear"
    spec = map_transform(clip_like())
    assert spec is not None and spec.interpolation == "bicubic" and spec.mean == pytest.approx(CLIP_MEAN)


def test_open_clips_own_transform_maps(tmp_path):
    from dissect_tui.clip_backend import load_clip

    clip = load_clip(make_tiny_clip(tmp_path).spec)
    spec = map_transform(clip.preprocess)
    assert spec is not None and spec.interpolation == "bicubic"
    assert spec.crop is not None and spec.std is not None


class OddResize(T.Resize):
    def forward(self, img):  # a subclass that does something else must not be mapped
        return super().forward(img.rotate(90))


@pytest.mark.parametrize(
    "transform",
    [
        lambda img: torch.zeros(3, 8, 8),  # custom callable
        T.Compose([T.Resize(64), T.CenterCrop(48), T.Grayscale(3), T.ToTensor()]),  # unknown step
        T.Compose([T.Resize(64), T.ToTensor()]),  # output size varies with the image
        T.Compose([T.Resize(64, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(48), T.ToTensor()]),
        T.Compose([OddResize(64), T.CenterCrop(48), T.ToTensor()]),
    ],
)
def test_unmappable_transforms_are_refused(transform):
    assert map_transform(transform) is None


def test_plan_modes():
    standard = [imagenet_preprocess(), clip_like()]
    assert plan_decode("cpu", CPU, standard) == (None, [])
    assert plan_decode("auto", CPU, standard)[0] is None  # auto = gpu only on CUDA
    with pytest.raises(UserError, match="needs a CUDA device"):
        plan_decode("gpu", CPU, standard)
    with pytest.raises(UserError, match="unknown decode mode"):
        plan_decode("nvjpeg", CPU, standard)
    plan, notes = plan_decode("tensor", CPU, [imagenet_preprocess(), lambda im: torch.zeros(3, 4, 4)])
    assert plan is not None and plan.specs[0] is not None and plan.specs[1] is None
    assert len(notes) == 1 and "#1" in notes[0]
    plan, notes = plan_decode("tensor", CPU, [lambda im: torch.zeros(3, 4, 4)])
    assert plan is None and "PIL" in notes[0]


# ---------------------------------------------------------------- batches


def assert_close(a, b, t: int) -> None:
    """Inputs of transform t agree row by row (drafted big JPEGs within the looser bound)."""
    diff = (a.inputs[t] - b.inputs[t]).abs().flatten(1).max(1).values
    for j, size in enumerate(a.sizes):
        drafted = size is not None and min(size) >= 2 * DECODE_MIN_SIDE
        assert float(diff[j]) < (MAX_DIFF_DRAFTED if drafted else MAX_DIFF)


def both_paths(folder: Path, transforms, batch_size: int = 8):
    probe = resolve_probe([str(folder)], folder)
    plan, _ = plan_decode("tensor", CPU, transforms)
    stats = DecodeStats()
    pil = list(iter_batches(probe, transforms, batch_size, 0))
    dev = list(iter_device_batches(probe, transforms, plan, batch_size, 0, 96, stats))
    return probe, pil, dev, stats


def test_device_path_matches_pil_path(folder):
    transforms = [imagenet_preprocess(), preset(), clip_like()]
    probe, pil, dev, stats = both_paths(folder, transforms)
    assert len(pil) == len(dev)
    worst = [[0.0] * len(transforms), [0.0] * len(transforms)]
    for a, b in zip(pil, dev, strict=True):
        assert a.indices.tolist() == b.indices.tolist()
        assert a.ok.tolist() == b.ok.tolist()
        assert a.errors == b.errors
        assert a.sizes == b.sizes
        assert [t is None for t in a.thumbnails] == [t is None for t in b.thumbnails]
        for t in range(len(transforms)):
            assert b.inputs[t].shape == a.inputs[t].shape and b.inputs[t].dtype == torch.float32
            diff = (a.inputs[t] - b.inputs[t]).abs().flatten(1)
            assert float(b.inputs[t][~b.ok].abs().sum()) == 0.0  # failed rows are zeros
            for j, size in enumerate(a.sizes):
                # the PIL path decodes big JPEGs at reduced scale (draft); the device decodes them whole
                drafted = size is not None and min(size) >= 2 * DECODE_MIN_SIDE
                k = 1 if drafted else 0
                worst[k][t] = max(worst[k][t], float(diff[j].max()))
                assert float(diff[j].mean()) < MEAN_DIFF
    print("max |PIL - device path| per transform, normal / drafted JPEGs:", worst)
    assert max(worst[0]) < MAX_DIFF
    assert max(worst[1]) < MAX_DIFF_DRAFTED
    # most images went through the device path, the rest said why
    names = [Path(it.path).name for it in probe]
    assert stats.counts["device"] == 21
    assert stats.counts["not JPEG"] == 1  # the PNG (the text file named .jpg counts as failed)
    assert stats.counts["EXIF rotation"] == 1
    assert stats.counts["failed"] == 3
    failed = {
        names[i] for b in dev for i, ok in zip(b.indices.tolist(), b.ok.tolist(), strict=True) if not ok
    }
    assert failed == {"corrupt.jpg", "text.jpg", "truncated.jpg"}


def test_thumbnails_are_small_jpegs_of_the_image(folder):
    probe, pil, dev, _ = both_paths(folder, [imagenet_preprocess()])
    for a, b in zip(pil, dev, strict=True):
        for ta, tb in zip(a.thumbnails, b.thumbnails, strict=True):
            if tb is None:
                continue
            ia, ib = Image.open(io.BytesIO(ta)), Image.open(io.BytesIO(tb))
            assert ib.format == "JPEG" and ib.size == ia.size and max(ib.size) == 96
            diff = np.abs(np.asarray(ia, dtype=float) - np.asarray(ib, dtype=float)).mean()
            assert diff < 6.0  # same picture (a different picture differs by tens of levels)


def test_device_decode_failure_falls_back_to_pil(folder, monkeypatch):
    """A file the device decoder rejects (but PIL reads) is decoded by PIL, not dropped."""
    import dissect_tui.fast_decode as fd

    real = fd.decode_jpegs

    def flaky(files, device):
        out = real(files, device)
        return [None if k == 0 else x for k, x in enumerate(out)]  # first file of each batch

    monkeypatch.setattr(fd, "decode_jpegs", flaky)
    transforms = [imagenet_preprocess()]
    probe, pil, dev, stats = both_paths(folder, transforms)
    assert stats.counts["device decode failed"] > 0
    for a, b in zip(pil, dev, strict=True):
        assert a.ok.tolist() == b.ok.tolist()
        assert_close(a, b, 0)


def test_unmapped_transform_runs_on_pil_next_to_mapped_one(folder):
    custom = T.Compose([T.Resize(40), T.CenterCrop(32), T.Grayscale(3), T.ToTensor()])
    transforms = [imagenet_preprocess(), custom]
    probe, pil, dev, stats = both_paths(folder, transforms)
    for a, b in zip(pil, dev, strict=True):
        assert a.ok.tolist() == b.ok.tolist()
        assert torch.equal(a.inputs[1], b.inputs[1])  # the very same PIL computation
        assert_close(a, b, 0)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_tiny_cnn_factory(root, factory="build_with_preprocess"), make_tiny_clip(root).spec


def test_index_with_the_device_path_agrees_with_pil(folder, models, tmp_path):
    factory, clip = models
    runs = {}
    for decode in ("cpu", "tensor"):
        settings = IndexSettings(
            model=factory,
            probe=[str(folder)],
            concepts="cifar100",
            clip=clip,
            db=tmp_path / f"{decode}.duckdb",
            device="cpu",
            batch_size=8,
            workers=0,
            top_images=5,
            decode=decode,
        )
        result = run_index(settings)
        with open_cache(result.path) as r:
            run = r.run()
            neurons = r.neurons(run["run_id"])
            _, top = r.query(
                "SELECT layer, unit, image_id FROM top_images "
                "WHERE rank = (SELECT min(rank) FROM top_images) ORDER BY ALL"
            )
            _, images = r.query("SELECT image_id, error IS NULL FROM images ORDER BY image_id")
            _, thumbs = r.query("SELECT count(*) FROM thumbnails")
        runs[decode] = (result, run, list(neurons["label"]), top, images, thumbs)
    (res_c, run_c, labels_c, top_c, images_c, thumbs_c) = runs["cpu"]
    (res_t, run_t, labels_t, top_t, images_t, thumbs_t) = runs["tensor"]
    assert res_t.n_failed == res_c.n_failed == 3
    assert images_t == images_c
    assert thumbs_t == thumbs_c
    assert run_t["settings"]["decode_used"] == "tensor" and run_c["settings"]["decode_used"] == "cpu"
    assert any("decoded on the device" in n for n in res_t.notes)
    same_labels = np.mean([a == b for a, b in zip(labels_c, labels_t, strict=True)])
    assert len(top_t) == len(top_c) == len(labels_c)
    same_top = np.mean([a == b for a, b in zip(top_c, top_t, strict=True)])
    print(f"labels identical {same_labels:.1%}, top-1 image identical {same_top:.1%}")
    assert same_labels >= 0.9 and same_top >= 0.9


def test_cli_decode_gpu_on_cpu_is_one_clear_line(folder, models, tmp_path, capsys):
    factory, clip = models
    args = ["index", factory, "--probe", str(folder), "--clip", clip, "--concepts", "cifar100"]
    args += ["--db", str(tmp_path / "x.duckdb"), "--device", "cpu", "--decode", "gpu", "--quiet"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and "needs a CUDA device" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.duckdb").exists()
