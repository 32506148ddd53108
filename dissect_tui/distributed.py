"""Several processes, one cache: `torchrun --nproc_per_node=G -m dissect_tui index MODEL …`.

torchrun starts G processes ("ranks", on one or several machines) with RANK, WORLD_SIZE and
LOCAL_RANK in their environment. Every rank resolves the same probe; rank r decodes and runs the
batches r, r + G, r + 2G, … (the same batches a single process would form, so the activations
are the same) on its own device (``cuda:LOCAL_RANK``, or the CPU with the gloo backend). What
scoring needs travels between ranks as small objects (top images, Σa·I, embeddings, per-image
sizes); each rank's activations go to a temporary DuckDB file beside the cache, which rank 0
copies into the one cache file (so the cache's folder must be one every machine sees). Rank 0
alone encodes concepts, scores, writes, prints progress and the summary.

A rank that fails reports its one-line error to rank 0, which fails the run with it; torchrun
then stops the others. When rank 0 fails, the others find out in a collective (RankLost) and end
without a line of their own. No cache and no temporary file is left.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from dissect_tui.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# Rank 0 encodes concepts and scores while the others wait: allow long runs.
TIMEOUT = datetime.timedelta(hours=24)


class ReportedElsewhere(UserError):
    """This rank's failure was handed to rank 0, which reports it: exit 2 without a second line."""


class RankLost(UserError):
    """A collective failed because another rank is gone (it failed, was killed, or its machine
    left). Rank 0 says so in one line; the other ranks exit quietly, since rank 0 (or torchrun's
    own report, when rank 0 is the one that vanished) says which rank ended the run."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks:
    """The ranks torchrun describes in the environment (one process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the run")
    return Ranks(rank, world, local)


def device_for(ranks: Ranks, requested: str) -> str:
    """Each rank its own accelerator: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when CUDA exists."""
    if ranks.active and requested in ("auto", "cuda") and torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"rank {ranks.rank} is local rank {ranks.local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA devices: use --nproc_per_node ≤ that"
            )
        return f"cuda:{ranks.local_rank}"
    return requested


class Group:
    """The process group of a run and the object collectives the indexer uses."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        import torch.distributed as dist

        self.ranks = ranks
        self._dist = dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"cannot join the torchrun group ({backend}): {str(exc).splitlines()[0]}"
            ) from None
        # Objects (top lists, embeddings) travel through a CPU group whatever the device. Every
        # rank joins it, so new_group never answers GroupMember.NON_GROUP_MEMBER (-100).
        self._objects = cast(
            "ProcessGroup | None",
            dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None,
        )

    def barrier(self) -> None:
        with _peers_needed():
            self._dist.barrier(group=self._objects)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` at rank 0 (in rank order); None elsewhere."""
        out: list[Any] | None = [None] * self.ranks.world if self.ranks.main else None
        with _peers_needed():
            self._dist.gather_object(obj, out, dst=0, group=self._objects)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with _peers_needed():
            self._dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def close(self) -> None:
        try:
            self._dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may already be broken by a failed rank
            pass


@contextlib.contextmanager
def _peers_needed() -> Iterator[None]:
    """A collective's failure (gloo: "Connection closed by peer", NCCL: a DistError; both
    RuntimeErrors) means another rank is gone: RankLost, one line instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first.split("] ", 1)[-1] if first.startswith("[") else first  # gloo's source location
        raise RankLost(f"another rank of the run stopped ({first.split('. ')[0][:200]})") from None


def rank_order(n_images: int, batch_size: int, ranks: Ranks) -> list[int]:
    """The probe images of this rank: batches r, r + G, … of ``batch_size`` consecutive images."""
    out: list[int] = []
    n_batches = -(-n_images // batch_size)
    for b in range(ranks.rank, n_batches, ranks.world):
        out.extend(range(b * batch_size, min((b + 1) * batch_size, n_images)))
    return out


def merge_by_owner(parts: Sequence[tuple[list[int], list[Any]]], n: int) -> list[Any]:
    """Per-image values of all ranks ([(their image ids, their values)]) as one list of length n."""
    out: list[Any] = [None] * n
    for ids, values in parts:
        for i, v in zip(ids, values, strict=True):
            out[i] = v
    return out
