"""Target networks: registry, weights (names, none, files, offline), custom factories, layers, hooks."""

from __future__ import annotations

import socket
import sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from tiny_models import TinyCNN, tiny_cnn, write_tiny_cnn_factory
from torch import nn

from dissect_tui import targets
from dissect_tui.errors import OfflineError, UserError
from dissect_tui.recording import LayerRecorder, summarize
from dissect_tui.targets import (
    Target,
    final_linear,
    imagenet_preprocess,
    list_target_models,
    load_target,
    resolve_layers,
)

RESNET_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


@pytest.fixture(scope="module")
def resnet18() -> Target:
    return load_target("resnet18", weights="none")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that fails like it does without internet."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(targets, "can_reach", lambda host: True)  # let the download itself fail
    return tmp_path / "hub" / "checkpoints", calls


def same_params(a: nn.Module, b: nn.Module | dict) -> bool:
    other = b if isinstance(b, dict) else b.state_dict()
    own = a.state_dict()
    return own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)


# ---------------------------------------------------------------- torchvision models


def test_registry_has_the_papers_models():
    names = list_target_models()
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vit_b_16"]:
        assert name in names


def test_resnet18_random_init(resnet18):
    assert resnet18.default_layers == RESNET_LAYERS
    assert (resnet18.final_layer, resnet18.final_layer_input) == ("fc", "layer4")
    assert resnet18.weights == "none" and not resnet18.model.training
    assert next(resnet18.model.parameters()).device.type == "cpu"
    x = resnet18.preprocess(Image.new("RGB", (300, 200), "green"))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    again = load_target("resnet18", weights="none")  # seeded: the same network every run
    assert same_params(resnet18.model, again.model)


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UserError) as info:
        load_target("resnet05", weights="none")
    message = str(info.value)
    assert "resnet50" in message and "file.py:factory" in message and "list_models" in message


def test_weights_names_resolve_and_offline_error(offline_hub):
    checkpoints, calls = offline_hub
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    for spelling in [None, "DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "imagenet1k_v1"]:
        with pytest.raises(OfflineError) as info:
            load_target("resnet18", weights=spelling)
        message = str(info.value)
        assert "ResNet18_Weights.IMAGENET1K_V1" in message and url in message
        assert "--weights path/to/resnet18-f37072fd.pth" in message and str(checkpoints) in message
        assert "--weights none" in message
        assert "\n" not in message
    assert calls == [url] * 5


def test_unreachable_host_fails_before_torch_hub_says_downloading(offline_hub, monkeypatch, capfd):
    checkpoints, calls = offline_hub
    probed = []
    monkeypatch.setattr(targets, "can_reach", lambda host: probed.append(host) or False)
    with pytest.raises(OfflineError) as info:
        load_target("resnet18", weights="IMAGENET1K_V1")
    assert probed == ["download.pytorch.org"] and calls == []
    assert "download.pytorch.org cannot be reached" in str(info.value)
    assert "--weights path/to/resnet18-f37072fd.pth" in str(info.value)
    assert "Downloading" not in capfd.readouterr().err


def test_weights_in_hub_cache_are_used_without_download(offline_hub):
    checkpoints, calls = offline_hub
    checkpoints.mkdir(parents=True)
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    target = load_target("resnet18", weights="IMAGENET1K_V1")
    assert calls == []
    assert target.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert same_params(target.model, state)
    # the weights' own preprocessing, not the generic one
    assert isinstance(target.preprocess, torchvision.transforms._presets.ImageClassification)


def test_corrupt_file_in_hub_cache(offline_hub):
    checkpoints, calls = offline_hub
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"half a download")
    with pytest.raises(UserError, match="corrupt.*delete it") as info:
        load_target("resnet18")
    assert calls == [] and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "weights, message",
    [("IMAGENET1K_V9", "IMAGENET1K_V1"), ("ResNet50_Weights.IMAGENET1K_V2", "belong to ResNet50_Weights")],
)
def test_bad_weight_names(weights, message):
    with pytest.raises(UserError, match=message):
        load_target("resnet18", weights=weights)


def test_state_dict_file_with_wrapper_prefix_and_365_classes(tmp_path):
    torch.manual_seed(5)
    source = torchvision.models.resnet18(num_classes=365)
    wrapped = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches" not in k},
    }
    path = tmp_path / "resnet18_places365.pth.tar"
    torch.save(wrapped, path)
    target = load_target("resnet18", weights=str(path))
    assert target.model.fc.out_features == 365
    assert target.weights == str(path.resolve())
    own = target.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if "num_batches" not in k)
    assert final_linear(target)[0].shape == (365, 512)
    assert torch.equal(final_linear(target)[0], source.fc.weight)
    # generic ImageNet preprocessing for local files
    assert target.preprocess.transforms[0].size == 256


def test_safetensors_file(tmp_path):
    torch.manual_seed(6)
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = load_target("resnet18", weights=str(path))
    assert same_params(target.model, source)


def test_mismatched_keys_are_named(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_cnn().state_dict(), path)
    with pytest.raises(UserError) as info:
        load_target("resnet18", weights=str(path))
    message = str(info.value)
    assert "missing" in message and "unexpected" in message and "layer1.0.weight" in message
    assert "\n" not in message


def test_weight_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_target("resnet18", weights=str(tmp_path / "nope.pth"))
    whole = tmp_path / "whole_model.pt"
    torch.save(tiny_cnn(), whole)
    with pytest.raises(UserError, match="state_dict"):
        load_target("resnet18", weights=str(whole))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file") as info:
        load_target("resnet18", weights=str(junk))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_vit_b_16_layers_and_head():
    target = load_target("vit_b_16", weights="none")
    assert target.default_layers == ["encoder", "heads"]
    assert (target.final_layer, target.final_layer_input) == ("heads", "encoder")
    x = target.preprocess(Image.new("RGB", (256, 256), "white"))[None]
    with torch.no_grad(), LayerRecorder(target.model, target.default_layers) as rec:
        logits = target.model(x)
        out = rec.pop()
    assert out["encoder"].shape == (1, 768) and out["heads"].shape == (1, 1000)
    weight, bias = final_linear(target)
    assert weight.shape == (1000, 768)
    # the CLS token of encoder is exactly what the head sees
    torch.testing.assert_close(out["encoder"] @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)


def test_other_torchvision_defaults_run():
    target = load_target("mobilenet_v3_small", weights="none")
    assert target.default_layers[-1] == "classifier" and target.final_layer == "classifier"
    assert len(target.default_layers) == 4
    with torch.no_grad(), LayerRecorder(target.model, target.default_layers) as rec:
        target.model(torch.randn(2, 3, 64, 64))
        out = rec.pop()
    assert all(v.shape[0] == 2 and v.ndim == 2 for v in out.values())


# ---------------------------------------------------------------- custom models


def test_custom_factory_file(tmp_path):
    spec = write_tiny_cnn_factory(tmp_path)
    target = load_target(spec)
    assert isinstance(target.model, nn.Module) and not target.model.training
    assert target.default_layers == ["conv1", "layer1", "layer2", "fc"]
    assert (target.final_layer, target.final_layer_input) == ("fc", None)
    assert target.weights == "none" and target.name == spec
    assert target.preprocess(Image.new("RGB", (300, 300))).shape == (3, 224, 224)
    assert final_linear(target)[0].shape == (10, 24)


def test_custom_factory_with_preprocess(tmp_path):
    target = load_target(write_tiny_cnn_factory(tmp_path, factory="build_with_preprocess"))
    assert target.preprocess(Image.new("RGB", (50, 70))).shape == (3, 32, 32)


def test_custom_factory_module_path(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_tiny_cnn_factory(package, name="nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        target = load_target("mypkg.nets:build")
        assert type(target.model).__name__ == "TinyCNN"
    finally:
        for name in ("mypkg", "mypkg.nets"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "suffix, message",
    [
        ("build_raises", "raised ValueError: factory exploded"),
        ("build_wrong_type", "returned dict"),
        ("no_such_factory", "has no attribute 'no_such_factory'"),
        ("NOT_CALLABLE", "not callable"),
    ],
)
def test_custom_factory_errors(tmp_path, suffix, message):
    spec = write_tiny_cnn_factory(tmp_path, factory=suffix)
    with pytest.raises(UserError, match=message) as info:
        load_target(spec)
    assert "\n" not in str(info.value)


def test_custom_factory_import_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_target(f"{tmp_path}/missing.py:build")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(UserError, match="importing .* failed: ModuleNotFoundError"):
        load_target(f"{bad}:build")
    with pytest.raises(UserError, match="importing"):
        load_target("no_such_package_xyz.mod:build")


def test_custom_factory_bad_preprocess(tmp_path):
    path = tmp_path / "badpre.py"
    path.write_text(
        "from torch import nn\ndef build():\n    return nn.Sequential(nn.Flatten()), lambda img: img\n"
    )
    with pytest.raises(UserError, match=r"float \[3,H,W\]"):
        load_target(f"{path}:build")


def test_custom_model_with_state_dict_file(tmp_path):
    spec = write_tiny_cnn_factory(tmp_path)
    torch.manual_seed(11)
    source = TinyCNN()
    path = tmp_path / "tiny.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = load_target(spec, weights=str(path))
    assert same_params(target.model, source)
    assert target.weights == str(path.resolve())
    with pytest.raises(UserError, match="custom models take a local state-dict file"):
        load_target(spec, weights="IMAGENET1K_V1")
    other = tmp_path / "other.pt"
    torch.save(TinyCNN(num_classes=3).state_dict(), other)
    with pytest.raises(UserError, match=r"another shape \(fc.weight file \[3, 24\] vs model \[10, 24\]"):
        load_target(spec, weights=str(other))


# ---------------------------------------------------------------- layers


def test_resolve_layers(resnet18):
    model = resnet18.model
    assert resolve_layers(model, None, RESNET_LAYERS) == RESNET_LAYERS
    assert resolve_layers(model, [], ["fc"]) == ["fc"]
    assert resolve_layers(model, ["layer4.1.conv2", "fc,layer1", "fc"], RESNET_LAYERS) == [
        "layer4.1.conv2",
        "fc",
        "layer1",
    ]
    with pytest.raises(UserError) as info:
        resolve_layers(model, ["layer5"], RESNET_LAYERS)
    message = str(info.value)
    assert "layer5" in message and "layer4" in message and "in all" in message  # abbreviated list
    small = tiny_cnn()
    with pytest.raises(UserError) as info:
        resolve_layers(small, ["conv2"], ["conv1"])
    assert "conv1, layer1, layer1.0, layer1.1" in str(info.value)


# ---------------------------------------------------------------- summarize and hooks


def test_summarize_shapes_and_pooling():
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(summarize(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(summarize(x, "max"), x.amax(dim=(2, 3)))
    tokens = torch.randn(2, 7, 6)
    torch.testing.assert_close(summarize(tokens), tokens[:, 0])
    flat = torch.randn(2, 9)
    torch.testing.assert_close(summarize(flat, "max"), flat)
    torch.testing.assert_close(summarize((x, flat)), x.mean(dim=(2, 3)))
    assert summarize(torch.randn(3)).shape == (3, 1)
    vol = torch.randn(2, 4, 2, 3, 3)
    torch.testing.assert_close(summarize(vol), vol.mean(dim=(2, 3, 4)))
    half = x.to(torch.bfloat16)
    assert summarize(half).dtype == torch.float32
    with pytest.raises(UserError, match="pooling"):
        summarize(x, "median")
    with pytest.raises(UserError, match="not a tensor"):
        summarize("nope")
    with pytest.raises(UserError, match="scalar"):
        summarize(torch.tensor(1.0))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_layer_recorder_matches_manual_pooling(pool):
    model = tiny_cnn()
    x = torch.randn(3, 3, 32, 32)
    layers = ["conv1", "layer1", "layer2.0", "fc"]
    with torch.no_grad(), LayerRecorder(model, layers, pool=pool) as rec:
        model(x)
        out = rec.pop()
        with pytest.raises(UserError, match="did not run"):
            rec.pop()  # the buffer is cleared after each pop
    with torch.no_grad():
        c1 = model.conv1(x)
        l1 = model.layer1(c1)
        l2conv = model.layer2[0](l1)
        logits = model(x)

    def pooled(t):
        return t.mean(dim=(2, 3)) if pool == "mean" else t.amax(dim=(2, 3))

    torch.testing.assert_close(out["conv1"], pooled(c1))
    torch.testing.assert_close(out["layer1"], pooled(l1))
    torch.testing.assert_close(out["layer2.0"], pooled(l2conv))
    torch.testing.assert_close(out["fc"], logits)
    assert list(out) == layers and not any(v.requires_grad for v in out.values())


def test_recorder_removes_hooks_even_on_errors():
    model = tiny_cnn()
    with pytest.raises(RuntimeError), LayerRecorder(model, ["conv1", "fc"]):
        assert len(model.conv1._forward_hooks) == 1
        model(torch.randn(1, 5, 32, 32))  # wrong channel count
    assert not model.conv1._forward_hooks and not model.fc._forward_hooks
    with pytest.raises(UserError, match="unknown layer"), LayerRecorder(model, ["conv1", "nope"]):
        pass
    assert not model.conv1._forward_hooks


def test_resnet_layer4_mean_feeds_fc(resnet18):
    """final_layer_input's pooled output times final_linear reproduces the recorded logits."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), LayerRecorder(resnet18.model, RESNET_LAYERS) as rec:
        resnet18.model(x)
        out = rec.pop()
    weight, bias = final_linear(resnet18)
    torch.testing.assert_close(out["layer4"] @ weight.T + bias, out["fc"], rtol=1e-4, atol=1e-4)
    assert {k: v.shape[1] for k, v in out.items()} == {
        "conv1": 64,
        "layer1": 64,
        "layer2": 128,
        "layer3": 256,
        "layer4": 512,
        "fc": 1000,
    }


def test_final_linear_absent_without_linear_head(tmp_path):
    path = tmp_path / "convhead.py"
    path.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1))\n"
    )
    target = load_target(f"{path}:build")
    assert target.final_layer is None and final_linear(target) is None
    assert target.default_layers == ["0", "2"]  # the pooling child has no parameters


def test_imagenet_preprocess_values():
    x = imagenet_preprocess()(Image.new("RGB", (400, 300), (124, 116, 104)))
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.02  # the ImageNet mean colour maps to about zero
