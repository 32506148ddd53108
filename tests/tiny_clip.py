"""Build a tiny random open_clip model on disk, for hermetic tests.

    from tiny_clip import make_tiny_clip
    tiny = make_tiny_clip(tmp_path)           # config JSON + checkpoint in tmp_path
    clip = load_clip(tiny.spec)               # "<tmp>/tiny-clip.json:<tmp>/tiny-clip.pt"

The model is a real ``open_clip.CLIP`` (32-px images, 2-layer width-32 text tower with the full
49,408-token vocabulary so open_clip's tokenizer works), so every loading and encoding path of
``dissect_tui.clip_backend`` runs for real. Loading takes well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_EMBED_DIM = 16
TINY_IMAGE_SIZE = 32


def tiny_clip_config(causal: bool = True, pool_type: str = "argmax") -> dict:
    """An open_clip model config (the contents of a model_configs/*.json file)."""
    text_cfg: dict = {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "pool_type": pool_type,
    }
    if not causal:
        text_cfg["no_causal_mask"] = True
    return {
        "embed_dim": TINY_EMBED_DIM,
        "vision_cfg": {
            "image_size": TINY_IMAGE_SIZE,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
        },
        "text_cfg": text_cfg,
    }


@dataclass(frozen=True)
class TinyClip:
    config_path: Path  # open_clip model-config JSON
    checkpoint_path: Path  # torch.save'd state_dict of a random model built from that config
    spec: str  # the --clip value that loads exactly these weights
    embed_dim: int = TINY_EMBED_DIM
    image_size: int = TINY_IMAGE_SIZE

    @property
    def random_spec(self) -> str:
        """--clip value for the same architecture with seeded random weights (pretrained none)."""
        return f"{self.config_path}:none"


def make_tiny_clip(
    tmp_path: Path | str,
    name: str = "tiny-clip",
    seed: int = 0,
    causal: bool = True,
    pool_type: str = "argmax",
) -> TinyClip:
    """Write ``<name>.json`` and ``<name>.pt`` (weights drawn with ``seed``) into ``tmp_path``."""
    from open_clip.model import CLIP

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_clip_config(causal=causal, pool_type=pool_type)
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(cfg, indent=1), "utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**cfg)
        # open_clip initialises the text tower at small scale; widen it so that texts give
        # clearly different embeddings and equality tests are not trivially satisfied.
        with torch.no_grad():
            model.token_embedding.weight.normal_(0, 1.0)
            model.positional_embedding.normal_(0, 0.5)
    checkpoint_path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint_path)
    return TinyClip(config_path, checkpoint_path, f"{config_path}:{checkpoint_path}")
