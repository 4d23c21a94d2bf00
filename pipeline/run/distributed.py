"""Runs under ``torchrun``: which process this is, the image shard it owns, and barriers.

``torchrun --nproc_per_node N runall.py --input ...`` (and multi-node with the usual
rendezvous flags) starts N copies of the same command. Each rank takes every N-th
image of the run's sorted image list, writes its own manifest shard and outputs,
and waits at a barrier; rank 0 then merges the shards and runs the whole-run stages.
Results do not depend on the sharding, because every image's randomness comes from
the run seed and the image id alone.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here starts a
process group, and the run is the ordinary single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

from pipeline.lazy import lazy_module

torch = lazy_module("torch")
dist = lazy_module("torch.distributed")


T = TypeVar("T")

# Ranks finish their shards at different times over a night; a barrier must outwait that.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T], group: Callable[[T], str] | None = None) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank``; with ``group``, every ``world_size``-th
        group of items (in order of first appearance), so that items of one group (a webdataset shard's samples)
        go to one rank together."""
        if group is None:
            return list(items[self.rank :: self.world_size])
        order: dict[str, int] = {}
        for item in items:
            order.setdefault(group(item), len(order))
        return [item for item in items if order[group(item)] % self.world_size == self.rank]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def device(self, device: torch.device) -> torch.device:
        """Each rank on its own GPU (``LOCAL_RANK``); CPU stays CPU."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPUs), or return the single-process info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return info


def agree(info: DistInfo, ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (so all ranks stop together)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def from_main(info: DistInfo, value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself in one process."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
