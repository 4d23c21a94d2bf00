"""How a stage's batches are sized and spread: the batch size per device and the out-of-memory back-off
(``BatchSizer``, ``split_on_oom``, ``fit_batch``), and the threads that finish a batch's CPU work
(``writer_pool``).
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from pipeline.lazy import lazy_module

torch = lazy_module("torch")


if TYPE_CHECKING:
    from pipeline.run.stage import Models


class BatchSizer:
    """Each stage's batch size, and the smaller size an out-of-memory back-off settled on."""

    def __init__(self, models: Models, log: logging.Logger):
        self.models, self.log = models, log
        self.settled: dict[str, int] = {}

    def size(self, stage: str, configured: int, cuda: int, cpu: int, bytes_per_image: int | None = None) -> int:
        """The size a back-off settled on, else the configured one, else a default for the device
        (``configured == 0`` means automatic).

        On CUDA the automatic size is also capped by ``fit_batch`` when the stage can estimate its
        memory per image, so a small GPU starts at a size that fits instead of at an out-of-memory.
        """
        fixed = self.settled.get(stage) or configured
        if fixed:
            return fixed
        dev = self.models.clip.device
        if dev.type != "cuda":
            return cpu
        if bytes_per_image:
            free, _total = torch.cuda.mem_get_info(dev)
            free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # the last batch's cached blocks are free to reuse
            return fit_batch(free, bytes_per_image, cuda)
        return cuda

    def run(self, stage: str, fn: Callable[[int, int], list], n: int) -> list:
        """``fn`` over a batch's index range ``[0, n)``, in chunks of the size a back-off settled on (when one did),
        halved again on CUDA out-of-memory (``split_on_oom``).

        The runner cuts the next batch before this one is on the model, so a batch can still be of the size that
        ran out of memory; it runs at the settled size at once, without failing first.
        """
        return split_on_oom(fn, 0, n, self.on_split(stage), size=self.settled.get(stage))

    def on_split(self, stage: str) -> Callable[[int], None]:
        """The ``on_split`` for ``split_on_oom``: later batches of ``stage`` use the size that fitted."""
        def remember(size: int) -> None:
            self.settled[stage] = size
            self.log.warning("%s: CUDA out of memory; retrying with batches of %d", stage, size)

        return remember


def fit_batch(free_bytes: int, bytes_per_image: int, cap: int, share: float = 0.5) -> int:
    """The largest batch, at most ``cap``, whose estimated memory fits in ``share`` of the free memory.

    The rest of the free memory is left for what the estimate leaves out (activations,
    the allocator's slack); the out-of-memory back-off still guards the estimate.
    """
    return max(1, min(cap, int(free_bytes * share) // max(1, bytes_per_image)))


WRITER_THREADS = 8  # at most; fewer on a machine with fewer cores


@functools.cache
def writer_pool() -> ThreadPoolExecutor:
    """Threads for a batch's per-image CPU work after the model has run: drawing, PNG and npz
    encoding, writing. These release the GIL, so a batch's images are finished side by side."""
    return ThreadPoolExecutor(max(1, min(WRITER_THREADS, os.cpu_count() or 1)), thread_name_prefix="writer")


def split_on_oom(fn: Callable[[int, int], list], start: int, end: int,
                 on_split: Callable[[int], None] | None = None, size: int | None = None) -> list:
    """``fn(start, end)`` over a batch's index range in chunks of ``size`` (default: the whole range); on CUDA
    out-of-memory, the chunk is halved and the rest of the range runs at the smaller size.

    ``fn`` returns one result per index. ``on_split`` is told each smaller size, so a
    stage can use it for later batches. A single item that does not fit re-raises.
    """
    size = max(1, size or end - start)
    out: list = []
    a = start
    while a < end:
        b = min(end, a + size)
        failed = False
        try:
            part = fn(a, b)
        except torch.OutOfMemoryError:
            if b - a <= 1:
                raise
            failed = True
        if failed:
            # Retry outside the handler: while it runs, the traceback keeps the failed attempt's frames,
            # and so its tensors, alive, and the smaller chunks would run beside them.
            torch.cuda.empty_cache()
            size = (b - a + 1) // 2
            if on_split is not None:
                on_split(size)
            continue
        out += part
        a = b
    return out
