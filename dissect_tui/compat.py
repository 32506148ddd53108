"""The few private or version-dependent library interfaces dissect-tui uses, in one place.

Each function checks what the installed version offers (attribute, signature) and falls back to
a public path, or to "not available" (the caller then takes its slower, public path), instead of
failing on an upgrade:

- torchvision's classification preset class (``weights.transforms()``), found through the public
  weights API rather than ``torchvision.transforms._presets``;
- open_clip's ``_convert_to_rgb`` step, ``_get_safe_alternatives`` (safetensors names on the hub)
  and ``text_global_pool`` (text tower pooling; ``eos_token_id=`` since open_clip 3.1);
- a per-thread OpenMP thread limit (torch's ``set_num_threads`` also changes the default of every
  thread started later, i.e. the whole process);
- tarfile's ``data`` extraction filter (Python 3.11.4+; a manual member check before that).
- TorchScript archives (OpenAI's CLIP release format) told apart from ``torch.save`` files.

No module here is imported at import time of this one (torchvision, open_clip load lazily).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- torchvision


@functools.cache
def classification_preset_type() -> type | None:
    """The class of torchvision's ``weights.transforms()`` for classification weights, or None.

    Taken from a weights enum (public API, no download: ``transforms`` is a partial of the
    class), so a moved or renamed private module does not matter; the attributes the callers
    read (resize_size, crop_size, interpolation, mean, std) are checked on an instance.
    """
    try:
        from torchvision.models import ResNet18_Weights

        preset = ResNet18_Weights.IMAGENET1K_V1.transforms()
    except Exception:  # noqa: BLE001 - any failure means: no preset mapping
        return None
    needed = ("resize_size", "crop_size", "interpolation", "mean", "std")
    return type(preset) if all(hasattr(preset, name) for name in needed) else None


# ---------------------------------------------------------------- open_clip


def open_clip_rgb_steps() -> tuple[Any, ...]:
    """open_clip's "convert to RGB" transform steps (no-ops on our RGB decodes), where present."""
    try:
        import open_clip.transform as oct
    except ImportError:
        return ()
    step = getattr(oct, "_convert_to_rgb", None)
    return (step,) if callable(step) else ()


def open_clip_transform_types() -> dict[str, type]:
    """open_clip 3.3+'s ``MaybeToTensor`` / ``MaybeConvertMode`` classes, where present."""
    try:
        import open_clip.transform as oct
    except ImportError:
        return {}
    out = {}
    for name in ("MaybeToTensor", "MaybeConvertMode"):
        cls = getattr(oct, name, None)
        if isinstance(cls, type):
            out[name] = cls
    return out


def safe_alternatives(filename: str) -> list[str]:
    """The ``.safetensors`` names open_clip tries on the hub before ``filename``, safest first."""
    try:
        from open_clip.pretrained import _get_safe_alternatives  # open_clip >= 2.27

        return list(_get_safe_alternatives(filename))
    except (ImportError, TypeError):
        pass
    try:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    except ImportError:
        HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"  # noqa: N806
    out = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
        out.append(filename[:-4] + ".safetensors")
    return out


@functools.cache
def text_pool() -> Callable[..., Any] | None:
    """``pool(x, tokens, pool_type, eos_id)`` exactly as the installed open_clip pools its text
    tower, or None when its ``text_global_pool`` is missing or has an unknown signature."""
    try:
        from open_clip.transformer import text_global_pool
    except ImportError:
        return None
    try:
        params = inspect.signature(text_global_pool).parameters
    except (TypeError, ValueError):
        return None
    if list(params)[:3] != ["x", "text", "pool_type"]:
        return None
    if "eos_token_id" in params:

        def pool(x: Any, tokens: Any, pool_type: str, eos_id: int | None) -> Any:
            return text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)

        return pool

    def pool_argmax(x: Any, tokens: Any, pool_type: str, eos_id: int | None) -> Any:
        if pool_type != "argmax":  # open_clip < 3.1 knows no eos pooling
            raise NotImplementedError(pool_type)
        return text_global_pool(x, tokens, pool_type)

    return pool_argmax


def text_pool_types() -> tuple[str, ...]:
    """Pool types ``text_pool()`` supports here (the truncated text path needs one of them)."""
    pool = text_pool()
    if pool is None:
        return ()
    return ("argmax", "eos") if pool.__name__ == "pool" else ("argmax",)


# ---------------------------------------------------------------- threads


def _omp_functions() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """omp_set_num_threads / omp_get_max_threads of the OpenMP runtime torch runs on, if any."""
    try:
        import torch

        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        lib = ctypes.CDLL(None)  # torch's OpenMP runtime is already loaded into the process
        set_fn, get_fn = lib.omp_set_num_threads, lib.omp_get_max_threads
    except (AttributeError, OSError, ImportError):
        return None
    set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
    get_fn.argtypes, get_fn.restype = [], ctypes.c_int
    return set_fn, get_fn


_omp: list[Any] = []
_omp_lock = threading.Lock()


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[bool]:
    """Within: torch ops of THIS thread run on one intra-op thread; yields whether that was done.

    Small per-image tensor ops only contend for intra-op threads (several times slower on a busy
    machine). ``torch.set_num_threads`` would also set the default that every thread started
    later inherits; OpenMP's own ``omp_set_num_threads`` changes only the calling thread. Where
    torch does not run on OpenMP, nothing is changed (yields False).
    """
    with _omp_lock:
        if not _omp:
            _omp.append(_omp_functions())
    fns = _omp[0]
    if fns is None:
        yield False
        return
    import torch

    set_fn, get_fn = fns
    torch.get_num_threads()  # let torch initialise this thread's count first, or it would override ours
    before = int(get_fn())
    set_fn(1)
    try:
        yield True
    finally:
        set_fn(before)


# ---------------------------------------------------------------- tarfile


def extract_tar(tar: tarfile.TarFile, dest: Path) -> None:
    """``tar.extractall(dest)`` without links, devices or paths outside ``dest``."""
    if hasattr(tarfile, "data_filter"):  # Python 3.11.4+, 3.12+
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    members = []
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(root, member.name))
        if not (member.isfile() or member.isdir()) or os.path.commonpath([root, target]) != root:
            raise tarfile.TarError(f"refusing archive member {member.name!r}")
        members.append(member)
    tar.extractall(dest, members=members)  # noqa: S202 - members checked above


# ---------------------------------------------------------------- checkpoints


def checkpoint_problem(exc: BaseException) -> str:
    """Why ``torch.load`` / safetensors refused a file, in a few words.

    torch's own messages run to paragraphs and advise re-running with ``weights_only=False``,
    i.e. executing whatever the file holds: that advice is never passed on.
    """
    import pickle
    import re

    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds pickled Python objects ({found.group(1)}), not only tensors"
        return "it is damaged or not a PyTorch checkpoint (unreadable pickle data)"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "it is damaged: its zip container is incomplete or corrupt"
    if isinstance(exc, EOFError):
        return "it is damaged: the data ends too early"
    if type(exc).__name__ == "SafetensorError":
        detail = text.split(":")[-1].strip()[:80]
        return f"it is damaged or not a safetensors file ({detail})"
    return f"it is damaged or not a checkpoint ({type(exc).__name__})"


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6, TorchScript archives
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # pickled magic number of the legacy format


def checkpoint_format_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a torch / safetensors checkpoint, from its first bytes, or None.

    Checked before ``torch.load`` sees the file, so foreign data (a text file, some other pickle)
    never reaches an unpickler and torch's warnings about it never reach the terminal.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not head:
        return "it is empty"
    if str(path).endswith(".safetensors"):
        header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not (0 < header <= size - 8 and head[8:9] == b"{"):
            return "it is damaged or not a safetensors file (bad header)"
        return None
    if head.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)) or head[257:262] == b"ustar":
        return None
    return "it is not a PyTorch checkpoint (neither a torch.save archive nor its legacy format)"


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with ``code/`` and
    ``constants.pkl`` under its top folder), not a ``torch.save`` state dict."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in names) and any(
        "/code/" in f"/{n}" for n in names
    )
