"""Text-tower throughput: full 77-token padding vs per-batch truncation (clip_backend).

Random-weight CLIP (``--clip ViT-B-16:none`` by default: same FLOPs as the paper's model) on
texts from the shipped 20k concept list. Prints texts/s, the time extrapolated to 20k
concepts, and the largest absolute difference between the two embeddings.

    python bench/bench_text_encoding.py              # 512 random texts of the 20k list
    python bench/bench_text_encoding.py --all        # all 20k (slow for the padded run)
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from dissect_tui.clip_backend import load_clip
from dissect_tui.concepts import load_concepts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="ViT-B-16:none")
    ap.add_argument("-n", type=int, default=512, help="texts to encode (random sample, seeded)")
    ap.add_argument("--all", action="store_true", help="encode the whole 20k list")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    concepts = load_concepts("20k").texts
    texts = concepts if args.all else random.Random(0).sample(concepts, min(args.n, len(concepts)))
    clip = load_clip(args.clip, device=args.device, precision=args.precision)
    tokens = clip.tokenize(texts)
    tower = clip._text_tower
    real_len = (tower.real_lengths(tokens) if tower else (tokens != 0).sum(1)).float()

    def timed(fn):
        clip.encode_texts(texts[:8])  # warm-up (allocator, kernels)
        if clip.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if clip.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0, time.process_time() - c0

    load_before = os.getloadavg()[0]
    padded, t_pad, c_pad = timed(lambda: clip.encode_texts_padded(texts, batch_size=args.batch_size))
    fast, t_fast, c_fast = timed(lambda: clip.encode_texts(texts, batch_size=args.batch_size))
    diff = (padded - fast).abs().max().item()

    print(
        f"clip {args.clip}  device {clip.device}  precision {clip.precision}  threads "
        f"{torch.get_num_threads()} (cpus {os.cpu_count()})  batch {args.batch_size}"
    )
    print(
        f"texts {len(texts)}  token length mean {real_len.mean():.1f}  max {int(real_len.max())}  "
        f"context {tokens.shape[1]}  truncation {'on' if clip.truncates_text else 'off (not exact here)'}"
    )
    # CPU seconds / threads estimates the wall time on an otherwise idle machine.
    threads = torch.get_num_threads()
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (cpus {os.cpu_count()})")
    print()
    print(f"{'mode':<14}{'wall s':>9}{'texts/s':>10}{'20k wall':>12}{'cpu s':>9}{'20k idle-est':>14}")
    for mode, secs, cpu in (("padded to 77", t_pad, c_pad), ("truncated", t_fast, c_fast)):
        rate = len(texts) / secs
        est = 20000 / len(texts) * cpu / threads
        print(
            f"{mode:<14}{secs:>9.2f}{rate:>10.1f}{20000 / rate / 60:>8.2f} min"
            f"{cpu:>9.1f}{est / 60:>10.2f} min"
        )
    print()
    print(f"speed-up {t_pad / t_fast:.1f}x   max |padded - truncated| = {diff:.2e}")


if __name__ == "__main__":
    main()
