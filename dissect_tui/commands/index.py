"""`dissect-tui index MODEL`: run CLIP-Dissect on a model and write the DuckDB cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from dissect_tui.commands._options import add_scoring_options, parse_hyperparameters, split_list
from dissect_tui.concepts import SHIPPED

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
        "cifar100-test, cifar100:/path/to/cifar-100-python, synthetic:N (default: cifar100)",
    )
    p.add_argument(
        "--concepts", default="20k", help=f"concept set: {', '.join(SHIPPED)} or a text file (default 20k)"
    )
    p.add_argument(
        "--clip",
        default="ViT-B-16:openai",
        metavar="NAME[:PRETRAINED]",
        help="open_clip model and pretrained tag, local checkpoint path or 'none'; NAME may be a model-config "
        "JSON file (default ViT-B-16:openai)",
    )
    p.add_argument("--pool", choices=("mean", "max"), default="mean", help="summary of conv maps over space")
    add_scoring_options(p, defaults=True)
    p.add_argument("--top-images", type=int, default=100, help="top images stored per neuron (default 100)")
    p.add_argument("--db", type=Path, help="output file (default cache/MODEL.duckdb)")
    p.add_argument(
        "--cache-dir", type=Path, default=Path("cache"), help="home of caches and downloads (default ./cache)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--batch-size", type=int, help="images per batch (default 256 on CUDA, 32 on CPU)")
    p.add_argument(
        "--workers", type=int, help="image decoding processes (default min(8, cores) on CUDA, 0 on CPU)"
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=("auto", "cpu", "gpu"),
        help="where JPEGs are decoded and preprocessed: gpu = nvJPEG + tensor ops on CUDA (workers only "
        "read files; other formats and custom preprocessing fall back to PIL), cpu = PIL in the workers; "
        "auto: gpu on CUDA when the preprocessing is standard, else cpu",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dissect_tui.console import RichProgress, print_summary
    from dissect_tui.indexer import IndexSettings, run_index

    settings = IndexSettings(
        model=args.model,
        weights=args.weights,
        layers=split_list(args.layers),
        probe=args.probe or ["cifar100"],
        concepts=args.concepts,
        clip=args.clip,
        template=args.template,
        pool=args.pool,
        similarity=args.similarity,
        hyperparameters=parse_hyperparameters(args.hp),
        cutoff=args.cutoff,
        top_images=args.top_images,
        top_concepts=args.top_concepts,
        db=args.db,
        cache_dir=args.cache_dir,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        decode=args.decode,
    )
    with RichProgress(quiet=args.quiet) as progress:
        result = run_index(settings, progress)
    print_summary(result, quiet=args.quiet)
    print(result.path)
    return 0
