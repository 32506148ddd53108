"""`dissect-tui index MODEL`: run CLIP-Dissect on a model and write the DuckDB cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

from dissect_tui import signals
from dissect_tui.commands._options import add_scoring_options, scoring_options, split_list
from dissect_tui.concepts import SHIPPED
from dissect_tui.settings import (
    BATCH_SIZE_ACCELERATOR,
    BATCH_SIZE_CPU,
    DECODES,
    DEFAULT_CLIP,
    POOLS,
    PRECISIONS,
    IndexSettings,
    default_of,
)


def _d(name: str) -> object:
    return default_of(IndexSettings, name)


EXAMPLES = """examples:
  dissect-tui index resnet50
  dissect-tui index resnet18 --weights places365.pth --probe ~/broden/images --probe ~/imagenet/val --concepts broden
  dissect-tui index mynet.py:build --layers block1,block2,head --probe ./imgs --clip ViT-B-32:./clip.safetensors
  dissect-tui index resnet18 --weights none --clip ViT-B-32:none --probe synthetic:256 --concepts 3k   # offline smoke run
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="label every neuron of a model and write the cache",
        description="Record activations of the chosen layers on a probe image set, embed images and "
        "concepts with CLIP, score every neuron against every concept and write one DuckDB file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="torchvision model name (resnet50, vit_b_16, …) or path/file.py:factory / package.module:factory",
    )
    p.add_argument(
        "--weights",
        help="torchvision weights name (default: the model's default), 'none' (random init) or a local "
        "state-dict file (.pth/.pt/.safetensors)",
    )
    p.add_argument(
        "--layers", action="append", metavar="A,B,…", help="layers to record (default per model family)"
    )
    p.add_argument(
        "--probe",
        action="append",
        metavar="SPEC",
        help="probe images, repeatable (union): a folder, a text file listing image paths, cifar100, "
        "cifar100-test, cifar100:/path/to/cifar-100-python, synthetic:N "
        f"(default: {', '.join(cast('list[str]', _d('probe')))})",
    )
    p.add_argument(
        "--concepts", help=f"concept set: {', '.join(SHIPPED)} or a text file (default {_d('concepts')})"
    )
    p.add_argument(
        "--clip",
        metavar="NAME[:PRETRAINED]",
        help="open_clip model and pretrained tag, local checkpoint path or 'none'; NAME may be a model-config "
        f"JSON file (default {DEFAULT_CLIP}; with --embeddings-from, that cache's CLIP)",
    )
    p.add_argument(
        "--embeddings-from",
        type=Path,
        metavar="CACHE",
        help="take the image and concept embeddings from another cache built on the same probe images "
        "(CLIP is not run, not even loaded unless concepts are missing there); records the source",
    )
    p.add_argument("--pool", choices=POOLS, help=f"summary of conv maps over space (default {_d('pool')})")
    add_scoring_options(p, defaults=True)
    p.add_argument(
        "--top-images", type=int, help=f"top images stored per neuron (default {_d('top_images')})"
    )
    p.add_argument("--db", type=Path, help="output file (default CACHE_DIR/MODEL.duckdb)")
    p.add_argument(
        "--cache-dir", type=Path, help=f"home of caches and downloads (default ./{_d('cache_dir')})"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto (the default): bf16 on CUDA, fp32 elsewhere",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"images per batch (default {BATCH_SIZE_ACCELERATOR} on an accelerator, {BATCH_SIZE_CPU} on CPU)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="image decoding processes (default min(8, cores) on an accelerator, 0 on CPU)",
    )
    p.add_argument(
        "--decode",
        choices=DECODES,
        help="where JPEGs are decoded and preprocessed: gpu = nvJPEG + tensor ops on CUDA (workers only "
        "read files; other formats and custom preprocessing fall back to PIL), cpu = PIL in the workers; "
        "auto (the default): gpu on CUDA when the preprocessing is standard, else cpu",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.console import RichProgress, print_summary
    from dissect_tui.indexer import run_index

    settings = IndexSettings.from_options(
        {
            "model": args.model,
            "weights": args.weights,
            "layers": split_list(args.layers),
            "probe": args.probe,
            "concepts": args.concepts,
            "clip": args.clip,
            "embeddings_from": args.embeddings_from,
            "pool": args.pool,
            "top_images": args.top_images,
            "db": args.db,
            "cache_dir": args.cache_dir,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "decode": args.decode,
            **scoring_options(args),
        }
    )
    from dissect_tui import distributed

    # Under torchrun only rank 0 prints progress and the summary; a rank whose failure rank 0
    # reports exits 2 without a second line.
    main_rank = distributed.from_env().main
    try:
        with RichProgress(quiet=args.quiet or not main_rank) as progress:
            result = run_index(settings, progress)
    except distributed.ReportedElsewhere:
        return 2
    except BaseException as exc:
        if main_rank:
            raise
        # The other ranks end quietly when rank 0 speaks for the run: after a signal (the Ctrl-C
        # every rank got, or torchrun stopping them because a rank failed) and when rank 0 is gone.
        if signals.is_interrupt(exc) or signals.received_signal() is not None:
            return signals.exit_code(exc)
        if isinstance(exc, distributed.RankLost):
            return 2
        raise
    if result is None:
        return 0
    print_summary(result, quiet=args.quiet)
    print(result.path)
    return 0
