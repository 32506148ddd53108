"""Target networks: torchvision registry, weights, custom factories, layers, hooks, pooling.

A target is named either as a torchvision classification model (``resnet50``, ``vit_b_16``,
anything in ``torchvision.models.list_models(module=torchvision.models)``) or as a custom
factory ``path/to/file.py:build`` / ``package.module:build``.

Weights (``--weights``): a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``,
``ResNet50_Weights.IMAGENET1K_V2``; default ``DEFAULT``), ``none`` (random init, seeded so the
same model comes back every time), or a local state-dict file (.pth/.pt/.pth.tar/.bin/
.safetensors). torchvision looks in the torch hub cache (``$TORCH_HOME/hub/checkpoints``) before
downloading; when the download fails the error names the file to put there or pass with
``--weights``.

Default layers:
- torchvision ResNet family (resnet*, resnext*, wide_resnet*): conv1, layer1-4, fc;
- torchvision VisionTransformer (vit_*): encoder (its CLS token, after the final LayerNorm) and
  heads;
- swin_*: ``permute`` (the final feature map in NCHW) and ``head`` -- the ``features.*`` stages
  of Swin emit channels-last maps that ``summarize`` would pool over the wrong axes;
- other torchvision models: the last four of the top-level children that have parameters, where
  the largest Sequential/ModuleList trunk (``features``, ``trunk_output``, ``blocks`` ...) is
  replaced by its last three parameterised stages (vgg16: features.24/26/28, classifier);
  auxiliary heads (aux1, AuxLogits) are skipped since they do not run in eval mode;
- custom models: every top-level child (unless it is a ResNet / VisionTransformer instance, which
  get the family defaults above).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pickle
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dissect_tui import compat
from dissect_tui.errors import OfflineError, UserError
from dissect_tui.network import can_reach
from dissect_tui.userfiles import non_regular_kind
from dissect_tui.weights_init import skipped_weight_init

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt", ".safetensors")
_RANDOM_INIT_SEED = 0
# Wrapper keys seen in training checkpoints ({"state_dict": ...} from Places365 / Lightning).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel and torch.compile
# Models that warn (FutureWarning) unless init_weights is given when built without weights.
_INIT_WEIGHTS_MODELS = frozenset({"googlenet", "inception_v3"})


def _brief(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line: library messages can span paragraphs."""
    text = " ".join(str(exc).split()) or "no details"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


@dataclass
class Target:
    name: str  # as given on the command line
    model: nn.Module  # eval mode, on CPU
    preprocess: Callable[[Image.Image], torch.Tensor]  # RGB PIL -> float [3,H,W]
    default_layers: list[str]
    weights: str  # what was loaded: "ResNet50_Weights.IMAGENET1K_V2", "none", a path
    final_layer: str | None  # the layer whose units are classes (fc / heads), when known
    final_layer_input: str | None  # recorded layer whose pooled output feeds final_layer


def imagenet_preprocess() -> Callable[[Image.Image], torch.Tensor]:
    """Standard ImageNet evaluation preprocessing (picklable, for DataLoader workers); carries its
    parameters for the device decode path (``fast_decode.with_tensor_ops``)."""
    from dissect_tui.fast_decode import with_tensor_ops

    transform = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return with_tensor_ops(
        transform, resize=256, interpolation="bilinear", crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def list_target_models() -> list[str]:
    """Names of the torchvision classification models that load_target accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


# ---------------------------------------------------------------- loading


def load_target(spec: str, weights: str | None = None) -> Target:
    """Build the target network named by ``spec`` with ``weights``; eval mode, on CPU."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty model name; try resnet50 or path/to/file.py:factory")
    if ":" in spec:
        target = _load_custom(spec, weights)
    else:
        target = _load_torchvision(spec, weights)
    target.model.eval()
    return target


def _is_none_weights(weights: str | None) -> bool:
    return weights is not None and weights.strip().lower() in ("none", "random")


def _looks_like_file(weights: str) -> bool:
    return (
        weights.lower().endswith(WEIGHT_FILE_SUFFIXES)
        or os.sep in weights
        or "/" in weights
        or Path(weights).expanduser().exists()  # a folder too, so it fails as one
    )


def _seeded_build(build: Callable[[], nn.Module]) -> nn.Module:
    """Random init with a fixed seed, so `--weights none` gives the same network every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        return build()


def _random_model(name: str, **kwargs: Any) -> nn.Module:
    """``get_model(name, weights=None)``; googlenet / inception_v3 get their (current) default
    init scheme named, which is what keeps them from warning on every build."""
    if name in _INIT_WEIGHTS_MODELS:
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def check_target_spec(spec: str, weights: str | None = None) -> None:
    """Cheap checks of a torchvision model name and its weights (no download, no build), so a
    typo fails before slower setup steps such as a probe download. Custom models are checked
    when load_target imports them; a weights file is checked for both."""
    spec = spec.strip()
    if not spec:
        return
    custom = ":" in spec
    name = None if custom else _torchvision_name(spec)
    if _is_none_weights(weights):
        return
    if weights is not None and _looks_like_file(weights):
        _existing_file(weights)
    elif name is not None:
        _resolve_weights_enum(name, weights)


def _torchvision_name(spec: str) -> str:
    available = list_target_models()
    name = spec.lower()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model '{spec}'.{hint} Any of the {len(available)} torchvision classification "
            "models in torchvision.models.list_models(module=torchvision.models) works, or pass your "
            "own as path/to/file.py:factory or package.module:factory"
        )
    return name


def _load_torchvision(spec: str, weights: str | None) -> Target:
    name = _torchvision_name(spec)
    if _is_none_weights(weights):
        model = _seeded_build(lambda: _random_model(name))
        preprocess, recorded = imagenet_preprocess(), "none"
    elif weights is not None and _looks_like_file(weights):
        path = _existing_file(weights)
        state = _read_state_dict(path)
        model = _fit_torchvision_model(name, state, path)
        preprocess, recorded = imagenet_preprocess(), str(path)
    else:
        enum_member = _resolve_weights_enum(name, weights)
        model = _download_build(name, enum_member)
        preprocess, recorded = enum_member.transforms(), str(enum_member)
    layers, final, final_in = _family_defaults(model, torchvision_model=True)
    return Target(spec, model, preprocess, layers, recorded, final, final_in)


def _resolve_weights_enum(name: str, weights: str | None) -> Any:
    enum_cls = torchvision.models.get_model_weights(name)
    members = enum_cls.__members__  # includes the DEFAULT alias
    wanted = (weights or "DEFAULT").strip()
    prefix, _, member = wanted.rpartition(".")
    if prefix and prefix.lower() != enum_cls.__name__.lower():
        raise UserError(
            f"weights '{wanted}' belong to {prefix}, not {name} ({enum_cls.__name__}); "
            f"choose one of {', '.join(members)}, none, or a local file"
        )
    by_upper = {k.upper(): v for k, v in members.items()}
    if member.upper() not in by_upper:
        raise UserError(
            f"unknown weights '{wanted}' for {name}: choose one of {', '.join(members)}, "
            "none (random init), or a local state-dict file (.pth/.pt/.safetensors)"
        )
    return by_upper[member.upper()]


def _download_build(name: str, enum_member: Any) -> nn.Module:
    """Let torchvision build and fetch (the hub cache is checked first); offline -> OfflineError."""
    url: str = enum_member.url
    file_name = os.path.basename(url)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    cached = checkpoints / file_name

    def offline(reason: object) -> OfflineError:
        return OfflineError(
            f"could not download {enum_member} ({file_name} from {url}): {reason}. Put {file_name} "
            f"in {checkpoints}, pass --weights path/to/{file_name}, or try --weights none (random init)"
        )

    host = urllib.parse.urlparse(url).hostname
    if host and not cached.exists() and not can_reach(host):
        raise offline(f"{host} cannot be reached")  # before torch.hub prints "Downloading: ..."
    if cached.exists() and (problem := compat.checkpoint_format_problem(cached)) is not None:
        raise UserError(
            f"cached weights file {cached} is unusable: {problem}; delete it and retry, "
            f"or pass --weights path/to/{file_name}"
        )
    try:
        with skipped_weight_init():  # torchvision loads strictly
            return torchvision.models.get_model(name, weights=enum_member)
    except OSError as exc:  # URLError, socket errors, timeouts, disk full
        raise offline(getattr(exc, "reason", None) or exc) from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        if cached.exists():
            raise UserError(
                f"cached weights file {cached} is unusable: {compat.checkpoint_problem(exc)}; delete it "
                f"and retry, or pass --weights path/to/{file_name}"
            ) from None
        raise


# ---------------------------------------------------------------- local state-dict files


def _existing_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        raise UserError(
            f"--weights {weights} is a folder: give the state-dict file (.pth/.pt/.safetensors) in it"
        )
    if (kind := non_regular_kind(path)) is not None:
        raise UserError(f"--weights {weights} is {kind}, not a regular file")
    if not path.is_file():
        raise UserError(f"weights file not found: {weights}")
    return path.resolve()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict, unwrap {"state_dict": ...}/{"model": ...}, strip module. prefixes."""
    problem = compat.checkpoint_format_problem(path)
    if problem is not None:
        raise UserError(f"cannot read weights file {path}: {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a class refused by weights_only
            raise UserError(f"cannot read weights file {path}: {compat.checkpoint_problem(exc)}") from None
        raise UserError(
            f"{path} holds pickled Python objects, not just tensors (a whole saved model?); "
            "save model.state_dict() with torch.save and pass that file"
        ) from None
    except Exception as exc:  # corrupt zip, wrong safetensors header
        raise UserError(f"cannot read weights file {path}: {compat.checkpoint_problem(exc)}") from None
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
            inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
            if inner is None:
                break
            raw = inner
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. "epoch" or "arch" left next to the tensors
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    if not state:
        raise UserError(f"{path} does not contain any tensors")
    return state


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def _fit_torchvision_model(name: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Build `name` for `state`, resizing the classifier when the file has another class count."""
    with skipped_weight_init():  # _load_checked overwrites every weight or refuses the file
        model = _random_model(name)
        head = _last_linear(model)
        if head is not None:
            file_w = state.get(f"{head[0]}.weight")
            if file_w is not None and file_w.ndim == 2 and file_w.shape[0] != head[1].out_features:
                classes = int(file_w.shape[0])  # e.g. 365 for the Places365 ResNet-18
                model = _random_model(name, num_classes=classes)
    _load_checked(model, state, path, name)
    return model


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = model.state_dict()
    # old checkpoints lack BatchNorm's counter; load_state_dict fills it in
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} file {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", reshaped),
        ):
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        raise UserError(f"weights file {path} does not fit {what}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- custom factories


def _load_custom(spec: str, weights: str | None) -> Target:
    location, _, attr = spec.rpartition(":")
    if not location or not attr:
        raise UserError(
            f"custom model '{spec}' must look like path/to/file.py:factory or package.module:factory"
        )
    module = _import_location(location)
    factory = getattr(module, attr, None)
    if factory is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(
            f"{location} has no attribute '{attr}' (callables there: {', '.join(sorted(names)[:10])})"
        )
    if not callable(factory):
        raise UserError(f"{location}:{attr} is not callable")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            result = factory()
    except Exception as exc:
        raise UserError(f"model factory {spec} raised {_brief(exc)}") from exc
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    if isinstance(result, tuple) and len(result) == 2:
        result, preprocess = result
        if not callable(preprocess):
            raise UserError(f"model factory {spec} returned a preprocess that is not callable")
    if not isinstance(result, nn.Module):
        raise UserError(
            f"model factory {spec} returned {type(result).__name__}; expected an nn.Module "
            "or (nn.Module, preprocess)"
        )
    model = result.cpu()
    recorded = "none"
    if weights is not None and not _is_none_weights(weights):
        if not _looks_like_file(weights):
            raise UserError(
                f"--weights {weights}: custom models take a local state-dict file (.pth/.pt/.safetensors) or none"
            )
        path = _existing_file(weights)
        _load_checked(model, _read_state_dict(path), path, spec)
        recorded = str(path)
    if preprocess is None:
        preprocess = imagenet_preprocess()
    else:
        _check_preprocess(preprocess, spec)
    layers, final, final_in = _family_defaults(model, torchvision_model=False)
    if not layers:
        raise UserError(f"model {spec} has no submodules to record; wrap its layers in named child modules")
    return Target(spec, model, preprocess, layers, recorded, final, final_in)


def _import_location(location: str) -> Any:
    is_file = location.endswith(".py") or "/" in location or os.sep in location
    try:
        if not is_file:
            return importlib.import_module(location)
        path = Path(location).expanduser().resolve()
        if (kind := non_regular_kind(path)) is not None:
            raise UserError(f"model file {location} is {kind}, not a regular file")
        if not path.is_file():
            raise UserError(f"model file not found: {location}")
        mod_name = f"dissect_tui_user_{path.stem}_{abs(hash(str(path))) % 10**8}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"cannot import {location}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        # registered so pickle finds its functions (DataLoader workers)
        sys.modules[mod_name] = module
        try:
            with _sibling_imports(path.parent):
                module_spec.loader.exec_module(module)
        except BaseException:
            if sys.modules.get(mod_name) is module:
                del sys.modules[mod_name]
            raise
        return module
    except UserError:
        raise
    except Exception as exc:  # SyntaxError, ImportError, anything the file raises at import
        raise UserError(f"importing {location} failed: {_brief(exc)}") from exc


class _FolderFinder(importlib.abc.MetaPathFinder):
    """Top-level imports from one folder, for one thread: a sys.path entry no other thread sees."""

    def __init__(self, folder: Path, thread: int) -> None:
        self.thread = thread
        self.finder = importlib.machinery.FileFinder(
            str(folder),
            (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
        )

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or threading.get_ident() != self.thread:
            return None  # submodules go through their package; other threads see nothing
        return self.finder.find_spec(fullname, target)


@contextlib.contextmanager
def _sibling_imports(folder: Path) -> Iterator[None]:
    """Within: this thread's imports find modules next to a model file (``import helpers``) first,
    as if the folder led sys.path, which itself is never changed."""
    finder = _FolderFinder(folder, threading.get_ident())
    at = next(
        (i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path)
    )
    sys.meta_path.insert(at, finder)
    try:
        yield
    finally:
        for i, f in enumerate(sys.meta_path):
            if f is finder:
                del sys.meta_path[i]
                break


def _check_preprocess(preprocess: Callable[[Image.Image], torch.Tensor], spec: str) -> None:
    try:
        out = preprocess(Image.new("RGB", (256, 192), (128, 128, 128)))
    except Exception as exc:
        raise UserError(f"the preprocess of {spec} failed on a 256x192 RGB image: {_brief(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 3 or not out.is_floating_point():
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"the preprocess of {spec} must turn an RGB PIL image into a float [3,H,W] tensor, got {shape}"
        )


# ---------------------------------------------------------------- layers


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_head(module: nn.Module) -> bool:
    """A Linear, or a Sequential ending in a Linear (vgg/efficientnet classifier, vit heads)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(module[-1], nn.Linear)


def _family_defaults(model: nn.Module, torchvision_model: bool) -> tuple[list[str], str | None, str | None]:
    """(default layers, final_layer, final_layer_input) for this architecture."""
    tvm = torchvision.models
    if isinstance(model, tvm.ResNet):
        return ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"], "fc", "layer4"
    if isinstance(model, tvm.VisionTransformer):
        return ["encoder", "heads"], "heads", "encoder"
    children = list(model.named_children())
    last = children[-1] if children else None
    final = last[0] if last is not None and _is_head(last[1]) else None
    if not torchvision_model:
        # Parameter-free children (pooling, flatten, activations) only repeat a neighbour's units.
        param_names = [n for n, m in children if _has_params(m)]
        return param_names or [n for n, _ in children], final, None
    if isinstance(model, tvm.SwinTransformer):
        return ["permute", "head"], "head", None
    with_params = [(n, m) for n, m in children if _has_params(m) and "aux" not in n.lower()]
    trunks = [
        (sum(p.numel() for p in m.parameters()), n, m)
        for n, m in with_params[:-1]
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and sum(_has_params(c) for c in m.children()) >= 3
    ]
    layers = [n for n, _ in with_params]
    if trunks and len(with_params) < 4:  # one big trunk (vgg features): use its last stages
        _, trunk_name, trunk = max(trunks, key=lambda t: t[0])
        stages = [f"{trunk_name}.{n}" for n, c in trunk.named_children() if _has_params(c)][-3:]
        i = layers.index(trunk_name)
        layers[i : i + 1] = stages
    return layers[-4:], final, None


def _layer_listing(names: list[str], wanted: str, limit: int = 40) -> str:
    """``names`` (network order) for an error message; a long list is cut to the top-level names
    and the ones closest to ``wanted``, still in network order."""
    if len(names) <= limit:
        return ", ".join(names)
    top = [n for n in names if "." not in n]
    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.6)
    order = {name: i for i, name in enumerate(names)}
    shown = sorted(list(dict.fromkeys(close + top))[:limit], key=order.__getitem__)
    return f"{', '.join(shown)}, ... ({len(names)} in all: dotted names from model.named_modules())"


def resolve_layers(model: nn.Module, requested: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Validate the requested layer names (dotted, comma lists accepted) or fall back to default."""
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    wanted: list[str] = []
    for item in requested or ():
        wanted.extend(part.strip() for part in item.split(",") if part.strip())
    if not wanted:
        wanted = list(default)
    for layer in wanted:
        if layer not in known:
            raise UserError(f"unknown layer '{layer}'; valid layers: {_layer_listing(names, layer)}")
    if not wanted:
        raise UserError("no layers to record; pass --layers with names from model.named_modules()")
    return list(dict.fromkeys(wanted))


# ---------------------------------------------------------------- activations


def final_linear(target: Target) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The classifier's (W [C, K], b [C]) when the final layer is a Linear, else None."""
    if target.final_layer is None:
        return None
    module = target.model.get_submodule(target.final_layer)
    if isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    if not isinstance(module, nn.Linear):
        return None
    bias = module.bias.detach() if module.bias is not None else None
    return module.weight.detach(), bias
