"""Setup time: building the target and CLIP models from local weight files, with and without
drawing random weights first (dissect_tui.weights_init), in one run.

Random-weight ResNet-50 and CLIP ViT-B-16 checkpoints are written to a temporary folder (about
700 MB), then each variant is timed in its own subprocess (fresh imports, no warm caches of the
other variant), twice, alternating.

    python bench/bench_setup.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import contextlib, logging, sys, time
logging.disable(logging.WARNING)
import dissect_tui.clip_backend as cb
import dissect_tui.targets as tg
if sys.argv[1] == "drawn":  # the behaviour before weights_init: weights drawn, then overwritten
    cb.skipped_weight_init = tg.skipped_weight_init = contextlib.nullcontext
t = time.perf_counter(); cb.load_clip("ViT-B-16:" + sys.argv[2]); a = time.perf_counter() - t
t = time.perf_counter(); tg.load_target("resnet50", weights=sys.argv[3]); b = time.perf_counter() - t
print(f"{a:.2f} {b:.2f}")
"""


def main() -> None:
    import logging

    import open_clip
    import torch
    import torchvision

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        clip_file, target_file = Path(tmp) / "vit_b_16.pt", Path(tmp) / "resnet50.pth"
        torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), clip_file)
        torch.save(torchvision.models.resnet50().state_dict(), target_file)
        print("| variant | CLIP ViT-B-16 from file s | ResNet-50 from file s |")
        print("|---|---:|---:|")
        for variant in ("drawn", "skipped", "drawn", "skipped"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, variant, str(clip_file), str(target_file)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(f"| weights {variant} before the load | {out[-2]} | {out[-1]} |")


if __name__ == "__main__":
    main()
