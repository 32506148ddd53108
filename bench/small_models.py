"""Small models for the CPU end-to-end benchmark (random weights, nothing downloaded).

`build()` is a ResNet-18 fed 64-px images (a small CNN with real ResNet layers);
`SMALL_CLIP_CONFIG` is an open_clip config for a small CLIP-like model (64-px ViT, 4+4 layers).
"""

from __future__ import annotations

import torch
import torchvision
from torchvision import transforms as T

SMALL_CLIP_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def build():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    preprocess = T.Compose(
        [
            T.Resize(72),
            T.CenterCrop(64),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return model, preprocess
