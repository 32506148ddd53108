"""clip_backend: spec parsing, loading from files, offline failures, encoders, text truncation."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from tiny_clip import TINY_EMBED_DIM, TINY_IMAGE_SIZE, make_tiny_clip

from dissect_tui import clip_backend, compat
from dissect_tui.clip_backend import load_clip, parse_clip_spec
from dissect_tui.errors import OfflineError, UserError

TEXTS = [
    "dog",
    "a photo of a red sports car parked on a wet street at night",
    "",
    "striped",
    "the quick brown fox jumps over the lazy dog " * 10,  # longer than the context: cut by tokenizer
    "x-ray",
    "sky",
    "a bowl of ramen with a soft boiled egg",
    "wooden",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def clip(tiny):
    return load_clip(tiny.spec)


class SeqLenSpy:
    """Records the sequence length the text transformer is run with."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.handle = transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.lengths.append(args[0].shape[1])


# --------------------------------------------------------------------------- loading


def test_loads_config_and_checkpoint(tiny, clip):
    saved = torch.load(tiny.checkpoint_path, weights_only=True)
    assert torch.equal(clip.model.token_embedding.weight.cpu(), saved["token_embedding.weight"])
    assert torch.equal(clip.model.visual.conv1.weight.cpu(), saved["visual.conv1.weight"])
    assert clip.embed_dim == TINY_EMBED_DIM
    assert clip.pretrained == str(tiny.checkpoint_path)
    assert clip.key.startswith("tiny-clip@") and "tiny-clip.pt#" in clip.key
    assert clip.truncates_text
    assert not clip.model.training


def test_checkpoint_load_leaves_nothing_uninitialised(tiny, clip):
    # weights are not drawn before a checkpoint load (weights_init): every saved tensor must
    # come from the file, and the unsaved buffers (causal mask) must be the normally built ones
    saved = torch.load(tiny.checkpoint_path, weights_only=True)
    state = clip.model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key].cpu(), value), key
    built = dict(load_clip(tiny.random_spec).model.named_buffers())
    unsaved = {k: b for k, b in clip.model.named_buffers() if k not in saved}
    assert unsaved, "the tiny model should have an unsaved buffer (attn_mask)"
    for key, buf in unsaved.items():
        assert torch.equal(buf, built[key]), key


def test_none_is_seeded_random_init(tiny, clip):
    a = load_clip(tiny.random_spec)
    b = load_clip(tiny.random_spec)
    assert a.key.endswith(":none") and a.pretrained == "none"
    assert any("random" in n for n in a.notes)
    # Seeded: same weights every time, and not the checkpoint's.
    assert torch.equal(a.model.token_embedding.weight, b.model.token_embedding.weight)
    assert not torch.equal(a.model.token_embedding.weight, clip.model.token_embedding.weight)


def test_key_identifies_checkpoint_contents(tiny, tmp_path):
    other = make_tiny_clip(tmp_path / "other", seed=1)
    same_content = tmp_path / "copy"
    same_content.mkdir()
    shutil.copy(tiny.checkpoint_path, same_content / tiny.checkpoint_path.name)
    key_a = load_clip(tiny.spec).key
    key_copy = load_clip(f"{tiny.config_path}:{same_content / tiny.checkpoint_path.name}").key
    key_b = load_clip(f"{tiny.config_path}:{other.checkpoint_path}").key
    assert key_a == key_copy
    assert key_a != key_b


def test_key_changes_with_config(tiny, tmp_path):
    other = make_tiny_clip(tmp_path, pool_type="last")
    assert load_clip(tiny.random_spec).key != load_clip(other.random_spec).key


# --------------------------------------------------------------------------- encoders


def test_encode_images_normalised_float32(clip):
    images = [Image.new("RGB", (50 + 7 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(4)]
    batch = torch.stack([clip.preprocess(im) for im in images])
    assert batch.shape == (4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    emb = clip.encode_images(batch)
    assert emb.shape == (4, TINY_EMBED_DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    assert (emb[0] - emb[3]).abs().max() > 1e-3


def test_encode_texts_normalised_float32(clip):
    calls: list[int] = []
    emb = clip.encode_texts(TEXTS, batch_size=4, on_batch=calls.append)
    assert emb.shape == (len(TEXTS), TINY_EMBED_DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))
    assert sum(calls) == len(TEXTS) and len(calls) == 3
    assert clip.encode_texts([]).shape == (0, TINY_EMBED_DIM)
    with pytest.raises(UserError):
        clip.encode_texts(TEXTS, batch_size=0)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_truncated_text_encoding_equals_padded(clip, batch_size):
    # The reference is open_clip's own encode_text on 77-token padded inputs.
    reference = clip.encode_texts_padded(TEXTS)
    spy = SeqLenSpy(clip.model.transformer)
    try:
        fast = clip.encode_texts(TEXTS, batch_size=batch_size)
    finally:
        spy.handle.remove()
    assert (fast - reference).abs().max().item() < 1e-5
    # Texts really differ, so a row mix-up in the unsort would show.
    assert (reference[0] - reference[1]).abs().max() > 1e-2
    if batch_size < len(TEXTS):
        assert min(spy.lengths) < 10  # short batches were truncated ...
    assert max(spy.lengths) == 77  # ... and the over-long text kept its full context


def test_text_order_preserved(clip):
    together = clip.encode_texts(TEXTS, batch_size=2)
    alone = torch.cat([clip.encode_texts([t]) for t in TEXTS])
    assert (together - alone).abs().max().item() < 1e-5


def test_non_causal_tower_runs_full_length(tmp_path):
    bidir = load_clip(make_tiny_clip(tmp_path, causal=False).spec)
    assert not bidir.truncates_text and clip_backend._truncating_tower(bidir.model) is None
    spy = SeqLenSpy(bidir.model.transformer)
    try:
        emb = bidir.encode_texts(TEXTS[:4], batch_size=2)
    finally:
        spy.handle.remove()
    assert spy.lengths == [77, 77]
    assert (emb - bidir.encode_texts_padded(TEXTS[:4])).abs().max().item() < 1e-5


def test_last_token_pooling_is_not_truncated(tmp_path):
    last = load_clip(make_tiny_clip(tmp_path, pool_type="last").spec)
    assert not last.truncates_text


def test_truncation_decision_checks_mask_and_class(clip):
    assert clip_backend._is_causal_mask(clip.model.attn_mask)
    assert not clip_backend._is_causal_mask(torch.zeros(5, 5))
    assert not clip_backend._is_causal_mask(None)
    assert clip_backend._truncating_tower(torch.nn.Linear(2, 2)) is None


def test_precision_choices(tiny, clip):
    fp16 = load_clip(tiny.spec, precision="fp16")
    assert fp16.precision == "fp32" and any("fp16" in n for n in fp16.notes)
    bf16 = load_clip(tiny.spec, precision="bf16")
    assert bf16.precision == "bf16"
    assert bf16.model.token_embedding.weight.dtype == torch.float32  # weights stay fp32
    out = bf16.encode_texts(TEXTS)
    assert out.dtype == torch.float32
    assert (out - clip.encode_texts(TEXTS)).abs().max().item() < 0.05
    with pytest.raises(UserError, match="precision"):
        load_clip(tiny.spec, precision="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_user_error(tiny):
    with pytest.raises(UserError, match="CUDA"):
        load_clip(tiny.spec, device="cuda")


# --------------------------------------------------------------------------- spec errors


def test_parse_builtin_names():
    assert parse_clip_spec("ViT-B-16:openai") == ("ViT-B-16", "openai")
    assert parse_clip_spec("ViT-B-16") == ("ViT-B-16", "openai")
    assert parse_clip_spec("ViT-B-16:LAION400M-E32") == ("ViT-B-16", "laion400m_e32")
    assert parse_clip_spec("ViT-B-16:none") == ("ViT-B-16", "none")
    first = open_clip.list_pretrained_tags_by_model("ViT-B-16-SigLIP")[0]
    assert parse_clip_spec("ViT-B-16-SigLIP") == ("ViT-B-16-SigLIP", first)  # no openai tag


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError) as err:
        parse_clip_spec("vit-b-16:openai")
    msg = str(err.value)
    assert "ViT-B-16" in msg and "list_models" in msg and type(err.value) is UserError


def test_unknown_tag_lists_tags():
    with pytest.raises(UserError) as err:
        parse_clip_spec("ViT-B-16:laion")
    assert "laion2b_s34b_b88k" in str(err.value) and "openai" in str(err.value)


def test_missing_checkpoint_file(tiny, tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_clip_spec(f"ViT-B-16:{tmp_path / 'absent.pt'}")
    with pytest.raises(UserError, match="not found"):
        load_clip(f"{tiny.config_path}:{tmp_path / 'absent.safetensors'}")


def test_config_needs_weights(tiny, tmp_path):
    with pytest.raises(UserError, match=":none"):
        parse_clip_spec(str(tiny.config_path))
    with pytest.raises(UserError, match="not found"):
        parse_clip_spec(f"{tmp_path / 'nope.json'}:none")
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 4}')
    with pytest.raises(UserError, match="vision_cfg"):
        load_clip(f"{bad}:none")


def test_mismatched_checkpoint_names_keys(tiny, tmp_path):
    state = torch.load(tiny.checkpoint_path, weights_only=True)
    state["text_projection_renamed"] = state.pop("text_projection")
    renamed = tmp_path / "renamed.pt"
    torch.save(state, renamed)
    with pytest.raises(UserError) as err:
        load_clip(f"{tiny.config_path}:{renamed}")
    assert "missing" in str(err.value) and "text_projection" in str(err.value)
    assert "text_projection_renamed" in str(err.value)

    state = torch.load(tiny.checkpoint_path, weights_only=True)
    state["ln_final.weight"] = torch.ones(7)
    resized = tmp_path / "resized.pt"
    torch.save(state, resized)
    with pytest.raises(UserError, match="ln_final.weight"):
        load_clip(f"{tiny.config_path}:{resized}")


def test_corrupt_checkpoint(tiny, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="junk.pt"):
        load_clip(f"{tiny.config_path}:{junk}")


# --------------------------------------------------------------------------- pretrained tags / offline

FAKE_MODEL = "tiny-tagged-clip"
FAKE_TAG = {"faketag": {"hf_hub": f"nobody/{FAKE_MODEL}/", "url": "", "quick_gelu": False}}


@pytest.fixture
def tagged_model(tmp_path, monkeypatch):
    """A built-in-like model name with one pretrained tag whose weights live on a fake hub repo."""
    made = make_tiny_clip(tmp_path, name=FAKE_MODEL)
    if FAKE_MODEL not in open_clip.list_models():
        open_clip.add_model_config(made.config_path)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, FAKE_MODEL, FAKE_TAG)
    return made


@pytest.fixture
def tagged(tagged_model, monkeypatch):
    """As tagged_model, with nothing in the local caches (whatever this machine holds)."""
    monkeypatch.setattr(clip_backend, "_cached_checkpoint", lambda cfg: None)
    return tagged_model


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")


def test_tag_offline_env_fails_without_network(tagged, monkeypatch):
    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: True)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    with pytest.raises(OfflineError) as err:
        load_clip(FAKE_MODEL)  # NAME alone picks the only tag
    msg = str(err.value)
    assert f"{FAKE_MODEL}:faketag" in msg and "open_clip_pytorch_model.bin" in msg
    assert f"--clip {FAKE_MODEL}:/path/to/" in msg and "\n" not in msg


def test_tag_unreachable_host_fails_fast(tagged, monkeypatch):
    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_backend, "_can_reach", lambda host, **kw: False)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    with pytest.raises(OfflineError, match="huggingface.co/nobody/tiny-tagged-clip"):
        load_clip(f"{FAKE_MODEL}:faketag")


def test_tag_download_network_error_is_offline(tagged, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline_download(cfg, **kwargs):
        # The chain open_clip + huggingface_hub produce here when DNS fails.
        try:
            try:
                raise OSError(-2, "Name or service not known")
            except OSError as dns:
                raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from dns
        except Exception as e:
            raise FileNotFoundError(f"Failed to download file for nobody/x. Last error: {e}") from None

    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_backend, "_can_reach", lambda host, **kw: True)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline_download)
    with pytest.raises(OfflineError, match="faketag"):
        load_clip(f"{FAKE_MODEL}:faketag")


def test_tag_download_other_error_is_user_error(tagged, monkeypatch):
    def broken(cfg, **kwargs):
        raise RuntimeError("checksum does not match")

    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_backend, "_can_reach", lambda host, **kw: True)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", broken)
    with pytest.raises(UserError, match="checksum") as err:
        load_clip(f"{FAKE_MODEL}:faketag")
    assert not isinstance(err.value, OfflineError)


def test_tag_download_success_loads_weights(tagged, monkeypatch):
    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_backend, "_can_reach", lambda host, **kw: True)
    monkeypatch.setattr(
        open_clip.pretrained, "download_pretrained", lambda cfg, **kw: str(tagged.checkpoint_path)
    )
    loaded = load_clip(f"{FAKE_MODEL}:faketag")
    assert loaded.key == f"{FAKE_MODEL}:faketag"
    saved = torch.load(tagged.checkpoint_path, weights_only=True)
    assert torch.equal(loaded.model.token_embedding.weight, saved["token_embedding.weight"])


def test_tag_found_in_hf_cache_without_network(tagged_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    tagged = tagged_model
    # The real cache lookup, in a hub cache laid out as huggingface_hub writes it.
    repo = tmp_path / "hub" / f"models--nobody--{FAKE_MODEL}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(tagged.checkpoint_path, snap / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(clip_backend, "_can_reach", _no_download)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    loaded = load_clip(f"{FAKE_MODEL}:faketag")
    saved = torch.load(tagged.checkpoint_path, weights_only=True)
    assert torch.equal(loaded.model.token_embedding.weight, saved["token_embedding.weight"])


def test_network_error_detection():
    assert clip_backend._is_network_error(ConnectionError("refused"))
    wrapped = RuntimeError("download failed")
    wrapped.__cause__ = TimeoutError()
    assert clip_backend._is_network_error(wrapped)
    assert not clip_backend._is_network_error(ValueError("bad checksum"))


def test_offline_message_for_quickgelu_tag_names_quickgelu_model(monkeypatch):
    monkeypatch.setattr(clip_backend, "_cached_checkpoint", lambda cfg: None)
    monkeypatch.setattr(clip_backend, "_hf_offline", lambda: True)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    with pytest.raises(OfflineError) as err:
        clip_backend._fetch_tag_checkpoint("ViT-B-32", "openai")
    assert "--clip ViT-B-32-quickgelu:/path/to/" in str(err.value)


def test_file_fingerprint_depends_on_content(tmp_path: Path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"\0" * 1000)
    b.write_bytes(b"\0" * 999 + b"\1")
    assert clip_backend.file_fingerprint(a) != clip_backend.file_fingerprint(b)
    assert clip_backend.file_fingerprint(a).startswith("1000-")


# -- QuickGELU weights under a GELU model name (issue 11) ---------------------------------------
def test_a_recognised_quickgelu_file_gets_quickgelu(tmp_path: Path):
    for path in (
        tmp_path / "ViT-B-32.pt",  # the file name of OpenAI's release
        tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "x" / "m.bin",
    ):
        inferred = clip_backend._infer_tag_for_file("ViT-B-32", str(path))
        assert inferred is not None and inferred[0] == "openai"
        quick, note = clip_backend._file_activation("ViT-B-32", str(path), inferred)
        assert quick and "looks like ViT-B-32:openai; using QuickGELU" in note


def test_a_torchscript_archive_is_taken_for_openai_weights(tmp_path: Path):
    path = tmp_path / "renamed.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files are in its format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    plain = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert compat.is_torchscript_archive(path) and not compat.is_torchscript_archive(plain)
    assert clip_backend._infer_tag_for_file("ViT-B-32", str(path)) is None
    quick, note = clip_backend._file_activation("ViT-B-32", str(path), None)
    assert quick and "TorchScript archive" in note
    # an unrecognised state dict: GELU as named, and a note saying how to choose QuickGELU
    quick, note = clip_backend._file_activation("ViT-B-32", str(plain), None)
    assert not quick and f"pass --clip ViT-B-32-quickgelu:{plain}" in note
    # names without QuickGELU weights, or already QuickGELU: nothing to say
    assert clip_backend._file_activation("ViT-B-16-SigLIP", str(plain), None) == (False, None)
    assert clip_backend._file_activation("ViT-B-32-quickgelu", str(path), None) == (False, None)
