"""dissect_tui.compat: each version-dependent path and its fallback; userfiles' size cap."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest
import torch

from dissect_tui import compat
from dissect_tui.concepts import load_concepts
from dissect_tui.errors import UserError


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_extract_tar_refuses_paths_outside_the_target(tmp_path, monkeypatch, has_data_filter):
    if not has_data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)  # Python < 3.11.4
    good, evil = tmp_path / "good.tar.gz", tmp_path / "evil.tar.gz"
    _tar(good, {"cifar-100-python/meta": b"x"})
    _tar(evil, {"../escaped.txt": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(good) as tar:
        compat.extract_tar(tar, out)
    assert (out / "cifar-100-python" / "meta").read_bytes() == b"x"
    with pytest.raises(tarfile.TarError), tarfile.open(evil) as tar:
        compat.extract_tar(tar, out)
    assert not (tmp_path / "escaped.txt").exists()


def test_one_intraop_thread_is_per_thread_and_restored():
    before = torch.get_num_threads()
    seen = []
    with compat.one_intraop_thread() as limited:
        inside = torch.get_num_threads()
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert inside == (1 if limited else before)
    assert seen == [before] and torch.get_num_threads() == before


def test_checkpoint_format_problem(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert compat.checkpoint_format_problem(good) is None
    assert compat.checkpoint_format_problem(legacy) is None
    text = tmp_path / "x.pt"
    text.write_text("hello")
    assert "not a PyTorch checkpoint" in compat.checkpoint_format_problem(text)
    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    assert compat.checkpoint_format_problem(empty) == "it is empty"
    bad_st = tmp_path / "w.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    assert "safetensors" in compat.checkpoint_format_problem(bad_st)


def test_text_pool_without_eos_support_only_does_argmax(monkeypatch):
    import open_clip.transformer as oct

    def old_pool(x, text=None, pool_type="argmax"):  # open_clip < 3.1
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)]

    monkeypatch.setattr(oct, "text_global_pool", old_pool)
    compat.text_pool.cache_clear()
    try:
        assert compat.text_pool_types() == ("argmax",)
        x = torch.randn(2, 5, 3)
        tokens = torch.tensor([[1, 9, 0, 0, 0], [1, 2, 9, 0, 0]])
        assert torch.equal(compat.text_pool()(x, tokens, "argmax", None), x[[0, 1], [1, 2]])
        with pytest.raises(NotImplementedError):
            compat.text_pool()(x, tokens, "eos", 9)
    finally:
        monkeypatch.undo()
        compat.text_pool.cache_clear()
    assert compat.text_pool_types() == ("argmax", "eos")


def test_classification_preset_type_comes_from_the_public_weights_api():
    from torchvision.models import ResNet50_Weights

    assert isinstance(ResNet50_Weights.IMAGENET1K_V2.transforms(), compat.classification_preset_type())


def test_an_oversized_concept_file_is_refused(tmp_path, monkeypatch):
    import dissect_tui.concepts as concepts

    monkeypatch.setattr(concepts, "MAX_TEXT_BYTES", 10)
    path = tmp_path / "c.txt"
    path.write_text("dog\ncat\nbird\n")
    with pytest.raises(UserError, match="more than 0 MiB"):
        load_concepts(str(path))
