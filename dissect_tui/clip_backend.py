"""open_clip loading (model names, pretrained tags, local checkpoints, config JSON) and encoders.

``--clip NAME[:PRETRAINED]``:

* NAME is an open_clip model name (``open_clip.list_models()``) or the path of an open_clip
  model-config JSON file (flat ``{"embed_dim", "vision_cfg", "text_cfg"}`` or the hub layout
  ``{"model_cfg": ..., "preprocess_cfg": ...}``), so custom and domain-specific CLIPs work.
* PRETRAINED is an open_clip pretrained tag, a local checkpoint file, or ``none`` (seeded random
  initialisation, for offline smoke runs). NAME alone means ``openai`` where that tag exists,
  else the model's first tag; a config JSON needs ``:path/to/checkpoint`` or ``:none``.

Tag downloads use open_clip's own code (Hugging Face hub or URL). The local caches are looked
up first without touching the network, and an offline machine fails in about a second with an
``OfflineError`` naming the file needed and how to pass a local copy.

Precision: weights always stay fp32. ``bf16``/``fp16`` run under autocast on CUDA; on CPU
``bf16`` runs under CPU autocast, while ``fp16`` falls back to fp32 (CPU half kernels are slow
and lossy) and says so in ``ClipModel.notes``. Encoder outputs are always float32,
L2-normalised, on ``ClipModel.device``.

Text encoding speed: CLIP's text transformer is causal and pools at the end-of-text token, so
the output at that token depends only on the tokens before it. Each batch therefore runs only
up to its longest real length (texts are sorted by length so batches are homogeneous). This is
used only where it is provably identical (``ClipModel.truncates_text``): the standard open_clip
text tower with a causal mask and argmax/eos pooling. Other towers run the full padded length.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dissect_tui import compat
from dissect_tui.errors import OfflineError, UserError
from dissect_tui.network import can_reach
from dissect_tui.settings import DEFAULT_CLIP
from dissect_tui.userfiles import NotRegularFile, non_regular_kind, read_regular
from dissect_tui.weights_init import skipped_weight_init

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")
_FULL_HASH_LIMIT = 64 * 2**20  # hash small files whole; big ones by size + first/last MiB


@dataclass
class ClipModel:
    """A loaded CLIP-style model with float32, L2-normalised encoders."""

    name: str
    pretrained: str
    key: str  # identity of the text tower; keys cached concept embeddings
    model: Any  # an open_clip model (a torch.nn.Module; open_clip has no type information)
    preprocess: Callable[[Any], torch.Tensor]  # RGB PIL image -> float [3, H, W]
    tokenizer: Callable
    device: torch.device
    precision: str  # the precision actually used (see notes when it differs from the request)
    embed_dim: int
    truncates_text: bool = False  # True when encode_texts runs only up to each batch's real length
    context_length: int = 77
    notes: list[str] = field(default_factory=list)  # things the caller should show the user
    _text_tower: _TruncatingTextTower | None = field(default=None, repr=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images (any device) -> [B, D] float32, L2-normalised."""
        batch = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(batch)
        return F.normalize(feats.float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[M, context_length] token ids, padded as the model's tokenizer pads."""
        return self.tokenizer(list(texts))

    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """[M] texts -> [M, D] float32, L2-normalised. ``on_batch(n)`` after each batch of n texts."""
        if batch_size < 1:
            raise UserError(f"text batch size must be at least 1, got {batch_size}")
        texts = list(texts)
        out = torch.empty(len(texts), self.embed_dim, dtype=torch.float32, device=self.device)
        if not texts:
            return out
        tokens = self.tokenize(texts)
        tower = self._text_tower
        if tower is not None:
            lengths = tower.real_lengths(tokens)
            # Sorted by length, each batch carries little padding beyond its own longest text.
            order = torch.argsort(lengths, stable=True)
        else:
            lengths = None
            order = torch.arange(len(texts))
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                tok = tokens[idx]
                if tower is not None and lengths is not None:
                    tok = tok[:, : int(lengths[idx].max())]
                    feats = tower.encode(tok.to(self.device))
                else:
                    feats = self.model.encode_text(tok.to(self.device))
                out[idx.to(self.device)] = F.normalize(feats.float(), dim=-1)
                if on_batch is not None:
                    on_batch(len(idx))
        return out

    def encode_texts_padded(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """The reference computation: open_clip's own encode_text on full padded tokens."""
        tokens = self.tokenize(texts)
        out = torch.empty(len(tokens), self.embed_dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(tokens), batch_size):
                feats = self.model.encode_text(tokens[start : start + batch_size].to(self.device))
                out[start : start + batch_size] = F.normalize(feats.float(), dim=-1)
        return out


# --------------------------------------------------------------------------- truncated text tower


class _TruncatingTextTower:
    """open_clip's causal text tower, run on token tensors shorter than the context length.

    Mirrors ``open_clip.CLIP.encode_text`` / ``TextTransformer.forward`` (open_clip 3.x) with
    the positional embedding and causal mask sliced to the tensor's length. Only built by
    ``_truncating_tower`` after checking that the slicing cannot change the pooled output.
    """

    def __init__(
        self,
        *,
        token_embedding,
        positional_embedding,
        transformer,
        attn_mask,
        ln_final,
        text_projection,
        pool_type: str,
        eos_id: int | None,
    ) -> None:
        self.token_embedding = token_embedding
        self.positional_embedding = positional_embedding
        self.transformer = transformer
        self.attn_mask = attn_mask
        self.ln_final = ln_final
        self.text_projection = text_projection
        self.pool_type = pool_type
        self.eos_id = eos_id

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position each row is pooled at, exactly as open_clip's text_global_pool picks it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        assert self.eos_id is not None  # _truncating_tower builds no 'eos' tower without an eos id
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def real_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        # Everything after the pooled position is invisible to it under a causal mask.
        return self.pool_index(tokens) + 1

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = compat.text_pool()
        if pool is None:  # checked by _truncating_tower
            raise RuntimeError("open_clip's text pooling is not available")
        length = tokens.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = pool(x, tokens, self.pool_type, self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, torch.nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    """An additive mask that is -inf strictly above the diagonal and 0 elsewhere."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), upper) and (mask[~upper] == 0).all())


def _truncating_tower(model: Any) -> _TruncatingTextTower | None:
    """The truncating text path for ``model``, or None where it is not provably exact.

    Exact only for the standard open_clip towers (exact classes, so no overridden forward):
    blocks mix positions only through attention, the mask is causal, and pooling picks the
    end-of-text position (argmax / eos). Non-causal towers (SigLIP), 'last'/'first' pooling,
    CoCa's appended CLS token, padding masks and HF text towers run the full padded length.
    """
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import CustomTransformer, TextTransformer, Transformer

    parts: dict[str, Any]
    if type(model) is CLIP:
        parts = dict(
            token_embedding=model.token_embedding,
            positional_embedding=model.positional_embedding,
            transformer=model.transformer,
            attn_mask=model.attn_mask,
            ln_final=model.ln_final,
            text_projection=model.text_projection,
            pool_type=model.text_pool_type,
            eos_id=getattr(model, "text_eos_id", None),
        )
    elif type(model) is CustomTextCLIP and type(getattr(model, "text", None)) is TextTransformer:
        text = model.text
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            return None
        parts = dict(
            token_embedding=text.token_embedding,
            positional_embedding=text.positional_embedding,
            transformer=text.transformer,
            attn_mask=text.attn_mask,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            pool_type=text.pool_type,
            eos_id=text.eos_id,
        )
    else:
        return None
    if parts["pool_type"] not in ("argmax", "eos") or parts["pool_type"] not in compat.text_pool_types():
        return None
    if parts["pool_type"] == "eos" and parts["eos_id"] is None:
        return None
    if type(parts["transformer"]) not in (Transformer, CustomTransformer):
        return None
    if parts["positional_embedding"].ndim != 2 or not _is_causal_mask(parts["attn_mask"]):
        return None
    tower = _TruncatingTextTower(**parts)
    return tower if _tower_matches(model, tower) else None


def _tower_matches(model: Any, tower: _TruncatingTextTower) -> bool:
    """The mirror of open_clip's encode_text gives its numbers on two short texts (guards against
    an open_clip release that changes the text tower's internals); else the public path runs."""
    context = int(tower.positional_embedding.shape[0])
    vocab = int(tower.token_embedding.num_embeddings)
    end = vocab - 1 if tower.pool_type == "argmax" else int(tower.eos_id or 0)
    if context < 6 or vocab < 4:
        return False
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(2, context, dtype=torch.long)
    for row, length in enumerate((3, 6)):
        body = torch.randint(1, vocab - 1, (length - 1,), generator=g)
        body[body == end] = 1  # the pooled token must be the last real one
        tokens[row, : length - 1] = body
        tokens[row, length - 1] = end
    tokens = tokens.to(tower.positional_embedding.device)
    try:
        with torch.inference_mode():
            full = model.encode_text(tokens).float()
            short = [tower.encode(t[None, : int(tower.real_lengths(t[None]))]).float() for t in tokens]
    except Exception:  # noqa: BLE001 - internals differ from what the mirror expects
        return False
    short_t = torch.cat(short)
    return full.shape == short_t.shape and bool(torch.allclose(full, short_t, rtol=1e-4, atol=1e-5))


# --------------------------------------------------------------------------- spec parsing


def _open_clip():
    # Imported lazily: open_clip pulls in timm and takes seconds to import.
    import open_clip

    return open_clip


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # open_clip's own tag normalisation


def _is_config_path(name: str) -> bool:
    return name.lower().endswith(".json") or os.sep in name or name.startswith(("~", "."))


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.path.exists(value)
    )


def _unknown_model_message(name: str, models: list[str]) -> str:
    by_lower = {m.lower(): m for m in models}  # case slips (vit-b-16) should rank first
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.5)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    examples = [m for m in ("ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "ViT-B-16-SigLIP") if m in models]
    return (
        f"unknown CLIP model {name!r}: {hint}use an open_clip model name ({len(models)} known, e.g. "
        f"{', '.join(examples)}; see `open_clip.list_models()`) or the path of an open_clip "
        "model-config JSON file"
    )


def _default_tag(name: str, tags: list[str]) -> str:
    if not tags:
        raise UserError(
            f"open_clip has no pretrained weights for {name!r}: use --clip {name}:/path/to/checkpoint "
            f"or --clip {name}:none (random weights)"
        )
    return "openai" if "openai" in tags else tags[0]


def parse_clip_spec(spec: str) -> tuple[str, str]:
    """``NAME[:PRETRAINED]`` -> (name, pretrained), validated; pretrained resolved to a tag,
    an existing checkpoint path, or ``none``. Raises UserError with the valid choices."""
    with _quiet_open_clip():
        return _parse_clip_spec(spec)


def _parse_clip_spec(spec: str) -> tuple[str, str]:
    spec = (spec or "").strip()
    if not spec:
        raise UserError(f"empty --clip value: use NAME[:PRETRAINED], e.g. {DEFAULT_CLIP}")
    name, sep, pretrained = spec.partition(":")
    name, pretrained = name.strip(), pretrained.strip()
    if not name:
        raise UserError(f"--clip {spec!r} has no model name: use NAME[:PRETRAINED], e.g. {DEFAULT_CLIP}")

    open_clip = _open_clip()
    models = open_clip.list_models()
    if name in models:
        is_config = False
    elif _is_config_path(name) or Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        if (kind := non_regular_kind(path)) is not None:
            raise UserError(f"CLIP model-config {name} is {kind}, not a regular file")
        if not path.is_file():
            raise UserError(f"CLIP model-config file not found: {name}")
        is_config = True
    else:
        raise UserError(_unknown_model_message(name, models))

    tags = [] if is_config else open_clip.list_pretrained_tags_by_model(name)
    if not sep or not pretrained:
        if is_config:
            raise UserError(
                f"--clip {name} names a model-config file: add the weights, "
                f"--clip {name}:path/to/checkpoint, or {name}:none for random weights"
            )
        return name, _default_tag(name, tags)
    if pretrained.lower() == "none":
        return name, "none"
    if _clean_tag(pretrained) in tags and not os.path.isfile(pretrained):
        return name, _clean_tag(pretrained)
    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if (kind := non_regular_kind(path)) is not None:
            raise UserError(
                f"CLIP checkpoint {pretrained} is {kind}, not a regular file (from --clip {spec})"
            )
        if not path.is_file():
            raise UserError(
                f"CLIP checkpoint file not found: {pretrained} (from --clip {spec}); "
                "pass an existing .pt/.pth/.bin/.safetensors file"
            )
        return name, str(path)
    if is_config:
        raise UserError(
            f"{pretrained!r} is not a file: a model-config JSON takes :path/to/checkpoint or :none"
        )
    shown = ", ".join(tags) if tags else "none (this model has no pretrained tags)"
    close = difflib.get_close_matches(_clean_tag(pretrained), tags, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(
        f"unknown pretrained tag {pretrained!r} for {name}{hint}: valid tags are {shown}; "
        "or pass a checkpoint file path, or none"
    )


# --------------------------------------------------------------------------- downloads


def _hf_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


_can_reach = can_reach  # module attribute, so tests can stand in for the network


def _is_network_error(exc: BaseException) -> bool:
    net_names = {
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "NetworkError",
        "TransportError",
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ProxyError",
    }
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionError | socket.gaierror | TimeoutError | urllib.error.URLError):
            return True
        if type(cur).__name__ in net_names:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _hf_files(cfg: dict) -> tuple[str, list[str]] | None:
    """(repo_id, candidate file names) for a tag's hub source, safetensors first as open_clip does."""
    if not cfg.get("hf_hub"):
        return None
    from open_clip.constants import HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    return repo_id, [*compat.safe_alternatives(filename), filename]


def _cached_checkpoint(cfg: dict) -> str | None:
    """The tag's weights from the local caches (HF hub cache, ~/.cache/clip), no network."""
    hf = _hf_files(cfg)
    if hf is not None:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            for filename in hf[1]:
                hit = try_to_load_from_cache(hf[0], filename)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    url = cfg.get("url")
    if url:
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _local_name_hint(name: str, cfg: dict) -> str:
    """The NAME that loads a tag's file correctly from a path (QuickGELU tags need -quickgelu)."""
    if cfg.get("quick_gelu") and not name.endswith("-quickgelu"):
        if f"{name}-quickgelu" in _open_clip().list_models():
            return f"{name}-quickgelu"
    return name


def _needed_file(name: str, tag: str, cfg: dict) -> tuple[str, str, str]:
    """(file name, where to get it, host download_pretrained will contact)."""
    hf = _hf_files(cfg)
    try:
        from open_clip.pretrained import has_hf_hub

        use_hf = hf is not None and has_hf_hub()
    except ImportError:
        use_hf = False
    if use_hf and hf is not None:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
        return hf[1][-1], f"{endpoint}/{hf[0]}", host
    url = cfg.get("url", "")
    return os.path.basename(url) or "checkpoint", url, urllib.parse.urlparse(url).hostname or ""


def _fetch_tag_checkpoint(name: str, tag: str) -> str:
    """Local path of the weights for an open_clip pretrained tag, downloading when possible."""
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(name, tag)
    if cfg.get("file"):
        return cfg["file"]
    cached = _cached_checkpoint(cfg)
    if cached:
        return cached
    filename, source, host = _needed_file(name, tag, cfg)
    offline_msg = (
        f"CLIP weights {name}:{tag} are not in the local cache and cannot be downloaded "
        f"(offline): fetch {filename} from {source} on a connected machine and pass "
        f"--clip {_local_name_hint(name, cfg)}:/path/to/{filename}"
    )
    if _hf_offline() or not host or not _can_reach(host):
        raise OfflineError(offline_msg)
    try:
        path = oc_pretrained.download_pretrained(cfg)
    except Exception as exc:  # open_clip wraps hub/URL failures in generic exceptions
        if _is_network_error(exc):
            raise OfflineError(offline_msg) from None
        raise UserError(f"downloading CLIP weights {name}:{tag} failed: {exc}") from None
    if not path or not os.path.isfile(path):
        raise UserError(f"downloading CLIP weights {name}:{tag} gave no file")
    return path


# --------------------------------------------------------------------------- identity


def file_fingerprint(path: str | os.PathLike) -> str:
    """``<size>-<sha256[:16]>``: whole-file hash up to 64 MiB, else size + first/last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
        else:
            digest.update(fh.read(2**20))
            fh.seek(size - 2**20)
            digest.update(fh.read(2**20))
    return f"{size}-{digest.hexdigest()[:16]}"


# --------------------------------------------------------------------------- loading


class _QuietLogging:
    """Stands in for the ``logging`` module inside open_clip's modules during a load.

    open_clip logs through the module functions (``logging.warning(...)``, on the root logger),
    e.g. "No pretrained weights loaded ... initialized randomly" when we load the weights
    ourselves. ``logging.disable`` silenced that for every thread of the process, and the first
    such call still ran ``basicConfig()``, leaving a root handler behind. This proxy drops the
    module-function calls made from threads inside ``_quiet_open_clip`` and passes everything
    else (other threads, other attributes) to the real module.
    """

    _CALLS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        if name in self._CALLS and threading.get_ident() in _quiet_threads:
            return _drop
        return getattr(self._real, name)


def _drop(*args: object, **kwargs: object) -> None:
    return None


_quiet_lock = threading.Lock()
_quiet_threads: dict[int, int] = {}  # thread id -> nesting depth
_patched: dict[str, _QuietLogging] = {}  # open_clip module name -> the proxy put there


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Within: open_clip's own log calls from THIS thread are dropped; nothing else changes."""
    me = threading.get_ident()
    _open_clip()  # imported first, so that its modules are there to be patched
    with _quiet_lock:
        if not _quiet_threads:
            for name, module in list(sys.modules.items()):
                if (name == "open_clip" or name.startswith("open_clip.")) and getattr(
                    module, "logging", None
                ) is logging:
                    proxy = _QuietLogging(logging)
                    module.logging = proxy  # type: ignore[attr-defined]
                    _patched[name] = proxy
        _quiet_threads[me] = _quiet_threads.get(me, 0) + 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_threads[me] -= 1
            if not _quiet_threads[me]:
                del _quiet_threads[me]
            if not _quiet_threads:
                for name, proxy in _patched.items():
                    loaded = sys.modules.get(name)
                    if loaded is not None and getattr(loaded, "logging", None) is proxy:
                        loaded.logging = logging  # type: ignore[attr-defined]
                _patched.clear()


def _read_config(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a flat open_clip config or the hub's open_clip_config.json."""
    try:
        data = json.loads(read_regular(path, 16 << 20).decode("utf-8"))
    except NotRegularFile as exc:
        raise UserError(f"CLIP model-config {path} is {exc.kind}, not a regular file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read CLIP model-config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"CLIP model-config {path} is not a JSON object")
    model_cfg = data.get("model_cfg", data)
    preprocess_cfg = data.get("preprocess_cfg", {}) if "model_cfg" in data else {}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise UserError(
            f"CLIP model-config {path} lacks {', '.join(missing)}: it must be an open_clip model "
            "config (like open_clip/model_configs/ViT-B-16.json)"
        )
    return model_cfg, preprocess_cfg


def _register_config(path: Path, model_cfg: dict) -> str:
    """Register a config under a unique name (a file stem could shadow a built-in model)."""
    blob = json.dumps(model_cfg, sort_keys=True).encode()
    reg_name = f"{path.stem}-{hashlib.sha256(blob).hexdigest()[:10]}"
    open_clip = _open_clip()
    if reg_name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            tmp_file = Path(tmp) / f"{reg_name}.json"
            tmp_file.write_bytes(blob)
            open_clip.add_model_config(tmp_file)  # read now; the registry keeps the dict
    return reg_name


def _infer_tag_for_file(name: str, path: str) -> tuple[str, dict] | None:
    """A known tag's file given by path (its URL file name or HF cache folder in the path)."""
    from open_clip import pretrained as oc_pretrained

    for tag in oc_pretrained.list_pretrained_tags_by_model(name):
        cfg = oc_pretrained.get_pretrained_cfg(name, tag)
        url_file = os.path.basename(cfg.get("url", ""))
        repo = os.path.split(cfg.get("hf_hub", ""))[0]
        if (url_file and os.path.basename(path) == url_file) or (
            repo and f"models--{repo.replace('/', '--')}" in path
        ):
            return tag, cfg
    return None


def _file_activation(name: str, path: str, inferred: tuple[str, dict] | None) -> tuple[bool, str | None]:
    """(use QuickGELU, a note) for a local weights file loaded under a built-in model NAME.

    Weights trained with QuickGELU (OpenAI's, some LAION ones) give different embeddings under
    NAME's GELU: every label changes. A file recognised as such a tag's (its name, its Hugging
    Face cache folder, or a TorchScript archive — how OpenAI released CLIP) gets QuickGELU; any
    other file of a model that has QuickGELU tags gets a note saying how to choose."""
    open_clip = _open_clip()
    if open_clip.get_model_config(name).get("quick_gelu"):
        return False, None
    base = os.path.basename(path)
    if inferred is not None:
        tag, cfg = inferred
        if cfg.get("quick_gelu"):
            return True, f"CLIP: {base} looks like {name}:{tag}; using QuickGELU"
        return False, None
    from open_clip import pretrained as oc_pretrained

    quick_tags = [
        t
        for t in oc_pretrained.list_pretrained_tags_by_model(name)
        if oc_pretrained.get_pretrained_cfg(name, t).get("quick_gelu")
    ]
    if not quick_tags:
        return False, None
    if "openai" in quick_tags and compat.is_torchscript_archive(path):
        return True, (
            f"CLIP: {base} is a TorchScript archive, the format of OpenAI's CLIP releases, which use "
            "QuickGELU; using QuickGELU"
        )
    alt = f"{name}-quickgelu" if f"{name}-quickgelu" in open_clip.list_models() else None
    if alt is None:
        return False, None
    return False, (
        f"CLIP: {base} is loaded as {name}, with GELU; if it holds weights trained with QuickGELU "
        f"({', '.join(quick_tags[:3])}{', …' if len(quick_tags) > 3 else ''}), pass --clip {alt}:{path}, "
        "or every embedding differs"
    )


def _shared_tag_preprocess(name: str) -> dict:
    """The preprocessing all of a model's tags agree on, for a local file of unknown origin."""
    from open_clip import pretrained as oc_pretrained
    from open_clip.transform import merge_preprocess_dict

    seen = {
        json.dumps(merge_preprocess_dict({}, oc_pretrained.get_pretrained_cfg(name, tag)), sort_keys=True)
        for tag in oc_pretrained.list_pretrained_tags_by_model(name)
    }
    return json.loads(seen.pop()) if len(seen) == 1 else {}


def _load_weights(model: torch.nn.Module, path: str, label: str) -> None:
    """Load a full CLIP checkpoint strictly; mismatches become one readable UserError."""
    open_clip = _open_clip()
    problem = compat.checkpoint_format_problem(path)
    if problem is not None:
        raise UserError(f"cannot read CLIP checkpoint {path}: {problem}")
    try:
        result = open_clip.load_checkpoint(model, path, strict=False)
    except RuntimeError as exc:
        text = str(exc)
        mismatches = [ln.strip() for ln in text.splitlines() if "size mismatch" in ln]
        if mismatches:
            raise UserError(
                f"CLIP checkpoint {path} does not fit {label}: "
                + "; ".join(m[:160] for m in mismatches[:3])
                + (f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else "")
            ) from None
        if "loading state_dict" in text:
            raise UserError(
                f"CLIP checkpoint {path} does not fit {label}: {text.splitlines()[0][:300]}"
            ) from None
        raise UserError(f"cannot read CLIP checkpoint {path}: {compat.checkpoint_problem(exc)}") from None
    except Exception as exc:  # torch.load / safetensors errors on corrupt or foreign files
        raise UserError(f"cannot read CLIP checkpoint {path}: {compat.checkpoint_problem(exc)}") from None
    missing = list(getattr(result, "missing_keys", []) or [])
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"CLIP checkpoint {path} does not fit {label}: {'; '.join(parts)}; is it an open_clip "
            "checkpoint of this model?"
        )


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available; use --device cpu")
    return dev


def _resolve_precision(precision: str, device: torch.device, notes: list[str]) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        notes.append("CLIP: fp16 is not used on CPU (slow, lossy half kernels); running fp32")
        return "fp32"
    return precision


def _network_guard(what: str, hint: str):
    """Map a network failure inside open_clip (HF tokenizer/config fetches) to OfflineError."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            if _is_network_error(exc) or _hf_offline():
                raise OfflineError(
                    f"{what} needs files from the Hugging Face hub (offline): {hint}"
                ) from None
            raise UserError(f"{what} failed: {type(exc).__name__}: {exc}"[:400]) from None

    return guard()


def load_clip(spec: str = DEFAULT_CLIP, device: str = "cpu", precision: str = "fp32") -> ClipModel:
    """Load ``--clip NAME[:PRETRAINED]`` in eval mode on ``device``; weights stay fp32.

    open_clip's own log lines (from this thread) are dropped: we load weights ourselves, so its
    "initialized randomly" warnings are wrong here; nothing else about logging changes."""
    with _quiet_open_clip():
        return _load_clip(spec, device, precision)


def _load_clip(spec: str, device: str, precision: str) -> ClipModel:
    name, pretrained = parse_clip_spec(spec)
    dev = _resolve_device(device)
    notes: list[str] = []
    precision = _resolve_precision(precision, dev, notes)
    open_clip = _open_clip()

    preprocess_overrides: dict = {}
    quick_gelu = False
    if name in open_clip.list_models():
        reg_name, key_name, label = name, name, name
    else:
        path = Path(name).expanduser()
        model_cfg, preprocess_overrides = _read_config(path)
        reg_name = _register_config(path, model_cfg)
        key_name, label = f"{path.stem}@{reg_name.rsplit('-', 1)[1]}", f"config {path.name}"

    checkpoint: str | None = None
    if pretrained == "none":
        key = f"{key_name}:none"
        notes.append(f"CLIP {label}: random weights (pretrained none); labels will be meaningless")
    elif os.path.isfile(pretrained):
        checkpoint = pretrained
        key = f"{key_name}:{os.path.basename(pretrained)}#{file_fingerprint(pretrained)}"
        inferred = _infer_tag_for_file(name, pretrained) if reg_name == name else None
        if reg_name == name:
            preprocess_overrides = _shared_tag_preprocess(name)
        if inferred is not None:
            preprocess_overrides = inferred[1]
        if reg_name == name:
            quick_gelu, note = _file_activation(name, pretrained, inferred)
            if quick_gelu:
                key += "+quickgelu"
            if note:
                notes.append(note)
    else:
        cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained)
        checkpoint = _fetch_tag_checkpoint(name, pretrained)
        preprocess_overrides = cfg
        quick_gelu = bool(cfg.get("quick_gelu"))
        key = f"{name}:{pretrained}"

    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    hub_hint = f"use a model whose text tower is built in, or a local cache of {name}"
    with _network_guard(f"building CLIP {label}", hub_hint):
        # Seeded so that `none` gives the same random model (and embeddings) on every run; a
        # checkpoint (loaded strictly below) overwrites every weight, so none are drawn for it.
        fills = skipped_weight_init() if checkpoint is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), fills:
            torch.manual_seed(0)
            model = open_clip.create_model(
                reg_name,
                pretrained=None,
                precision="fp32",
                device="cpu",
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=merge_preprocess_dict({}, preprocess_overrides),
                pretrained_image=False,
                pretrained_text=False,
            )
    if checkpoint is not None:
        _load_weights(model, checkpoint, label)
    with _network_guard(f"the tokenizer of CLIP {label}", hub_hint):
        tokenizer = open_clip.get_tokenizer(reg_name)

    model = model.to(dev).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    from dissect_tui.fast_decode import open_clip_tensor_ops, with_tensor_ops

    tensor_ops = open_clip_tensor_ops(dict(model.visual.preprocess_cfg))
    if tensor_ops is not None:  # the device decode path builds its ops from this configuration
        preprocess = with_tensor_ops(preprocess, **tensor_ops)
    model_cfg = open_clip.get_model_config(reg_name)
    tower = _truncating_tower(model)
    return ClipModel(
        name=name,
        pretrained=pretrained,
        key=key,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=dev,
        precision=precision,
        embed_dim=int(model_cfg["embed_dim"]),
        truncates_text=tower is not None,
        context_length=int(
            getattr(tokenizer, "context_length", None) or model_cfg["text_cfg"].get("context_length", 77)
        ),
        notes=notes,
        _text_tower=tower,
    )
