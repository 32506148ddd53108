"""`index` under torchrun: the images stage split across ranks, one cache written by rank 0.

Sequence (see dissect_tui.distributed for the design):

  rank 0                                   rank r > 0
  checks, write lock, setup (downloads)
  ── barrier ───────────────────────────────────────────────────────────────────
                                           setup
  its batches → the cache (streamed)       its batches → a shard file beside the cache
  ── gather: per-image results, top lists, sums, embeddings (or the rank's one-line error) ──
  merge; copy each shard into the cache
  ── broadcast: the image ids whose thumbnails the cache keeps; gather: those thumbnails ──
  concepts, scoring, write, commit         (done; exit 0)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dissect_tui.activation_stats import merge_stats
from dissect_tui.distributed import Group, Ranks, ReportedElsewhere, device_for, merge_by_owner, rank_order
from dissect_tui.errors import UserError
from dissect_tui.filesafety import remove_db_files
from dissect_tui.image_pass import ImagePass, check_decoded
from dissect_tui.indexer import (
    IndexResult,
    finish_index,
    plan_index,
    prepare_index,
    run_images,
)
from dissect_tui.progress import NullProgress, ProgressSink, StageClock
from dissect_tui.runtime import resolve_device
from dissect_tui.settings import IndexSettings
from dissect_tui.store import CacheWriter
from dissect_tui.store.shards import ShardWriter
from dissect_tui.text import printable


def _payload(images: ImagePass, order: list[int], shard: Path | None) -> dict[str, Any]:
    """What rank 0 needs of a rank's share (everything but the activations, which are in ``shard``)."""
    return {
        "order": order,
        "sizes": [images.sizes[i] for i in order],
        "errors": [images.errors[i] for i in order],
        "ok_ids": images.ok_ids,
        "emb": images.image_emb.cpu(),
        "stats": {k: dataclasses.replace(v, **_cpu(v)) for k, v in images.stats.items()},
        "shapes": images.layer_shapes,
        "shard": None if shard is None else str(shard),
    }


def _cpu(st: Any) -> dict[str, Any]:
    return {
        "top_ids": st.top_ids.cpu(),
        "top_vals": st.top_vals.cpu(),
        "cross": None if st.cross is None else st.cross.cpu(),
        "sq_norm": None if st.sq_norm is None else st.sq_norm.cpu(),
    }


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    return printable(message if isinstance(exc, UserError) else f"{type(exc).__name__}: {message}")


def _merge(
    parts: list[dict[str, Any]], n_listed: int, layers: list[str], keep: int, device: torch.device
) -> ImagePass:
    """The whole probe's ImagePass from every rank's payload."""
    owners = [(p["order"], p["sizes"]) for p in parts]
    sizes = merge_by_owner(owners, n_listed)
    errors = merge_by_owner([(p["order"], p["errors"]) for p in parts], n_listed)
    ids = np.concatenate([p["ok_ids"] for p in parts])
    embs = [p["emb"] for p in parts if p["emb"].numel()]
    emb = torch.cat(embs) if embs else torch.empty(0, 0)
    order = np.argsort(ids, kind="stable")
    stats = {}
    for layer in layers:
        have = [p["stats"][layer] for p in parts if layer in p["stats"]]
        if have:
            stats[layer] = merge_stats(have, keep)
    shapes: dict[str, str] = next((p["shapes"] for p in parts if p["shapes"]), {})
    return ImagePass(
        n_listed=n_listed,
        ok_ids=ids[order],
        stats=stats,
        n_units={k: v.n_units for k, v in stats.items()},
        image_emb=emb[torch.from_numpy(order)].to(device) if len(ids) else emb,
        sizes=sizes,
        errors=errors,
        layer_shapes=shapes,
    )


def run_index_ranks(
    settings: IndexSettings, progress: ProgressSink | None, ranks: Ranks
) -> IndexResult | None:
    """One rank's part of a torchrun index; rank 0 returns the result, the others None."""
    s = dataclasses.replace(settings, device=device_for(ranks, settings.device))
    clock = StageClock((progress or NullProgress()) if ranks.main else NullProgress())
    s.validate()
    group = Group(ranks, resolve_device(s.device))
    try:
        if ranks.main:
            return _rank0(s, clock, group)
        _other_rank(s, clock, group)
        return None
    finally:
        group.close()


def _rank0(s: IndexSettings, clock: StageClock, group: Group) -> IndexResult:
    plan = plan_index(s, clock)
    with clock("setup"):
        setup = prepare_index(s, clock)
    group.barrier()  # the others set up now: downloads (CIFAR-100, weights) happen once
    shards: list[Path] = []
    try:
        with CacheWriter(plan.final_path, stream=True) as writer:
            order = rank_order(len(setup.probe), setup.batch_size, group.ranks)
            with clock("images"):
                mine, decode_used = run_images(
                    setup, s, plan.hp, writer.append_activations, writer.tmp_path.parent, clock, order
                )
                parts = group.gather(_payload(mine, order, None))
                assert parts is not None
                for rank, part in enumerate(parts):
                    if "error" in part:
                        raise UserError(f"rank {rank} failed: {part['error']}")
                shards = [Path(p["shard"]) for p in parts[1:]]
                for rank, shard in enumerate(shards, 1):
                    if not shard.exists():
                        raise UserError(
                            f"rank {rank}'s activations are in {shard}, which rank 0 cannot see: on several "
                            "machines --db must be on a filesystem they all share"
                        )
                    writer.ingest_activations(shard)
                    remove_db_files(shard)
                keep = max(s.top_images, s.thumbnail_top)
                images = _merge(parts, len(setup.probe), setup.layers, _kept(parts, keep), setup.device)
                check_decoded(setup.probe, len(images.ok_ids), images.errors)
            spool = mine.thumbnails

            def thumbnails_of(ids: set[int]) -> dict[int, bytes]:
                group.broadcast(sorted(ids))
                gathered = group.gather(spool.read(ids) if spool else {}) or []
                return {k: v for part in gathered for k, v in part.items()}

            try:
                return finish_index(plan, setup, images, decode_used, writer, clock, thumbnails_of)
            finally:
                if spool is not None:
                    spool.close()
    finally:
        for shard in shards:
            remove_db_files(shard)


def _kept(parts: list[dict[str, Any]], keep: int) -> int:
    """The top list length the ranks kept (every rank keeps the same)."""
    for p in parts:
        for st in p["stats"].values():
            return max(keep, st.top_ids.shape[1])
    return keep


def _other_rank(s: IndexSettings, clock: StageClock, group: Group) -> None:
    group.barrier()
    shard: ShardWriter | None = None
    spool = None
    failure: BaseException | None = None
    try:
        from dissect_tui.methods import get_method

        hp = get_method(s.similarity).validate(s.hyperparameters)
        setup = prepare_index(s, clock)
        order = rank_order(len(setup.probe), setup.batch_size, group.ranks)
        shard = ShardWriter(s.db_path(), group.ranks.rank)
        mine, _ = run_images(setup, s, hp, shard.append_activations, shard.path.parent, clock, order)
        spool = mine.thumbnails
        shard.close()
        payload = _payload(mine, order, shard.path)
    except KeyboardInterrupt:
        if shard is not None:
            shard.remove()
        raise
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the run with it
        if shard is not None:
            shard.remove()
        failure = exc
        payload = {"error": _error_line(exc)}
    group.gather(payload)
    if failure is not None:
        raise ReportedElsewhere(_error_line(failure))
    try:
        ids = group.broadcast(None)  # rank 0 picked the thumbnails to keep
        group.gather(spool.read(ids) if spool is not None else {})
    finally:
        if spool is not None:
            spool.close()
